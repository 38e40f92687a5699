"""The b-bit integer grid: fitting (scale, zero) and rounding onto it.

`w ~= scale * (q - zero)` with integer codes `q` in [0, 2^b - 1]. Parameters are per output row
and column group; the min/max fit includes 0 in the range (as GPTQ does) so that exact zeros
stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_format.weight import dequantize_codes

from .config import GridConfig


@dataclass
class GroupParams:
    """Grid parameters of one column group: one scale and one zero point per output row."""

    scale: torch.Tensor  # [out] float32
    zero: torch.Tensor  # [out] float32 holding integers


def fit_params(w: torch.Tensor, grid: GridConfig) -> GroupParams:
    """Min/max fit of (scale, zero) for the columns `w` [out, cols] of one group."""
    w = w.float()
    xmin = torch.clamp(w.amin(dim=1), max=0.0)
    xmax = torch.clamp(w.amax(dim=1), min=0.0)
    if grid.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(flat, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / grid.maxq
    if grid.fp16_scales:
        # fp16 is what a GPTQ checkpoint stores: quantize with exactly that value.
        scale = scale.half().float()
        scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(torch.float16).tiny))
    if grid.sym:
        zero = torch.full_like(scale, (grid.maxq + 1) / 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), grid.min_zero, grid.maxq)
    return GroupParams(scale=scale, zero=zero)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of `w` on the grid; `scale`/`zero` broadcast against `w`."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round `w` to the nearest grid point (the value the int4 kernel will compute with)."""
    return dequantize_codes(quantize_codes(w, scale, zero, maxq), scale, zero)
