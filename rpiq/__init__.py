"""rpiq: RPIQ 4-bit quantization and an assistive edge inference server."""

__version__ = "0.1.0"
