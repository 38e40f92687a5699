"""What a GPTQ checkpoint directory holds: file names, tensor suffixes, formats and shape rules.

Shared by the writer and the reader, so that both agree on every rule by construction.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .weight import column_groups

CheckpointFormat = Literal["gptq", "gptq_v2"]
CHECKPOINT_FORMATS: tuple[str, ...] = ("gptq", "gptq_v2")

CONFIG_NAME = "config.json"
QUANT_CONFIG_NAME = "quantize_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
WORD_BITS = 32

PROCESSOR_FILES: tuple[str, ...] = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
"""Files a transformers processor reads besides the tokenizer's own (which the tokenizer saves)."""


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, unreadable or inconsistent.

    A `ValueError` so that callers treating bad input uniformly keep working; its own type so
    that the CLI can tell a broken checkpoint from a bad argument.
    """


def pack_block(bits: int) -> tuple[int, int]:
    """(values, int32 words) per packing block; 3 bits packs 32 values into 3 words."""
    g = math.gcd(bits, WORD_BITS)
    return WORD_BITS // g, bits // g


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The g_idx of a layer quantized in natural column order (no act-order permutation)."""
    return column_groups(in_features, group_size)
