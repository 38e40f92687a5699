"""The GPTQ checkpoint format: quantized weights, int32 packing, writing and reading.

The bottom layer of rpiq: it imports nothing from `models`, `quantizer` or `server`.
"""

from .reader import CheckpointStream, QuantizedCheckpoint, checkpoint_bytes, load_quantized_state, open_checkpoint
from .spec import CHECKPOINT_FORMATS, CheckpointError, CheckpointFormat
from .weight import SUPPORTED_BITS, QuantizedWeight, column_groups, dequantize_codes
from .writer import save_quantized

__all__ = [
    "CHECKPOINT_FORMATS",
    "SUPPORTED_BITS",
    "CheckpointError",
    "CheckpointFormat",
    "CheckpointStream",
    "QuantizedCheckpoint",
    "QuantizedWeight",
    "checkpoint_bytes",
    "column_groups",
    "dequantize_codes",
    "load_quantized_state",
    "open_checkpoint",
    "save_quantized",
]
