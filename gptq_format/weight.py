"""A quantized weight in GPTQ's logical layout, and the grid arithmetic every layer shares.

`w ~= scale * (q - zero)` with integer codes `q` in [0, 2^b - 1], one (scale, zero) pair per
output row and column group. The quantizer produces these, the packer and the checkpoint files
store them, the int4 kernels consume them: this is the one place that defines them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def column_groups(in_features: int, group_size: int) -> torch.Tensor:
    """Group index of each column in natural order; the last group may be shorter."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


@dataclass
class QuantizedWeight:
    """A weight in GPTQ's logical layout (before int32 packing).

    `codes[o, i]` is the integer code of `W[o, i]`; column `i` uses group `g_idx[i]`, whose
    parameters are `scales[g_idx[i], o]` and `zeros[g_idx[i], o]`.
    """

    codes: torch.Tensor  # [out, in] uint8
    scales: torch.Tensor  # [groups, out] float32 (fp16-representable by default)
    zeros: torch.Tensor  # [groups, out] int32
    g_idx: torch.Tensor  # [in] int32
    bits: int
    group_size: int
    sym: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] that these codes stand for."""
        g = self.g_idx.long()
        scale = self.scales[g].t()
        zero = self.zeros[g].t().float()
        return dequantize_codes(self.codes.float(), scale, zero)
