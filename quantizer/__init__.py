"""quantizer."""
