"""From GPTQ's logical layout to what torch's int4 "tinygemm" kernels take, exactly.

GPTQ stores ``w = scale * (q - z)`` with an integer zero ``z`` per (group, output row) and lets
act-order scatter a group's columns anywhere (``g_idx``). The tinygemm kernels
(``aten._weight_int4pack_mm`` on CUDA, ``aten._weight_int4pack_mm_for_cpu`` on CPU) compute
``w = (q - 8) * scale + zero_f`` with a *float* zero and contiguous groups of 32/64/128/256
columns. Both forms describe the same numbers when

* ``zero_f = (8 - z) * scale`` (expand ``scale * (q - z)``),
* the columns are permuted so that every group is contiguous (then ``x`` is permuted the same
  way at run time: ``x[:, perm] @ W[:, perm]^T == x @ W^T``),
* a GPTQ group of ``g`` columns becomes ``g / kg`` kernel groups of ``kg`` columns that repeat
  its (scale, zero): exact, and it lets per-channel (``group_size=-1``) and g=512/1024 layers
  run on the same kernel,
* rows are padded to the kernel's tile (16) and columns to a whole number of kernel groups; padded
  columns meet zero activations, padded rows are sliced off the output.

The only loss is the kernel's own: scales and zeros are bfloat16 and the accumulation order
differs. Everything here is plain torch on the host and is checked against dequantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_format import QuantizedWeight

KERNEL_GROUP_SIZES = (256, 128, 64, 32)
ROW_TILE = 16  # the CPU kernel needs N % 16 == 0, the CUDA one N % 8 == 0
MID_CODE = 8  # tinygemm's implicit zero for 4-bit codes


class LayoutError(ValueError):
    """A quantized weight that the tinygemm layout cannot represent exactly."""


@dataclass
class TinygemmLayout:
    """A 4-bit weight rearranged for tinygemm, before the device-specific packing call."""

    codes: torch.Tensor  # [out_padded, in_padded] int32 in [0, 15], columns in kernel order
    scale_and_zero: torch.Tensor  # [in_padded / group, out_padded, 2] float32
    group: int  # kernel group size (32/64/128/256)
    perm: torch.Tensor | None  # [in] int64 column order for x, None when natural
    in_features: int
    out_features: int

    @property
    def in_padded(self) -> int:
        return self.codes.shape[1]

    @property
    def out_padded(self) -> int:
        return self.codes.shape[0]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def contiguous_group_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The column permutation that makes groups contiguous; None when they already are.

    Raises `LayoutError` when sorting by group does not give blocks of exactly `group_size`
    columns (as act-order GPTQ always does), because tinygemm groups have one fixed size.
    """
    in_f = g_idx.numel()
    natural = torch.arange(in_f) // group_size
    if torch.equal(g_idx.long(), natural):
        return None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], natural):
        raise LayoutError(
            f"g_idx does not split the {in_f} input columns into groups of {group_size}; "
            "tinygemm needs equal-sized groups"
        )
    return perm


def kernel_group_size(group_size: int, in_features: int | None = None) -> int | None:
    """The largest tinygemm group size that divides `group_size` (None: no exact mapping), preferring
    one that also divides `in_features`: then the input needs no zero padding at run time (576
    columns in GPTQ groups of 128 run as kernel groups of 64, not padded to 640)."""
    exact = [kg for kg in KERNEL_GROUP_SIZES if group_size % kg == 0]
    unpadded = [kg for kg in exact if in_features is not None and in_features % kg == 0]
    return (unpadded or exact or [None])[0]


def _group_columns(qw: QuantizedWeight) -> int:
    """Columns per GPTQ group; per-channel counts as one group over K rounded up to 32."""
    in_f = qw.shape[1]
    return qw.group_size if qw.group_size != -1 else _round_up(in_f, KERNEL_GROUP_SIZES[-1])


def _kernel_grouping(qw: QuantizedWeight) -> tuple[int, int, torch.Tensor | None]:
    """(GPTQ group columns, kernel group size, column order) for `qw`; `LayoutError` if inexact."""
    if qw.bits != 4:
        raise LayoutError(f"bits={qw.bits} (tinygemm kernels are 4-bit only)")
    group = _group_columns(qw)
    kg = kernel_group_size(group, qw.shape[1])
    if kg is None:
        raise LayoutError(f"group_size={qw.group_size} is not a multiple of 32")
    return group, kg, contiguous_group_order(qw.g_idx, group)


def unsupported_reason(qw: QuantizedWeight) -> str | None:
    """Why `qw` cannot use a tinygemm kernel, or None when it can."""
    try:
        _kernel_grouping(qw)
    except LayoutError as e:
        return str(e)
    return None


def tinygemm_layout(qw: QuantizedWeight) -> TinygemmLayout:
    """Rearrange `qw` for tinygemm (see the module docstring); `LayoutError` if it cannot be exact."""
    _, kg, perm = _kernel_grouping(qw)
    out_f, in_f = qw.shape
    g_idx = qw.g_idx.long() if perm is None else qw.g_idx.long()[perm]
    codes = qw.codes.to(torch.int32) if perm is None else qw.codes[:, perm].to(torch.int32)

    in_pad = _round_up(in_f, kg)
    out_pad = _round_up(out_f, ROW_TILE)
    # Columns past in_f meet zero-padded activations, so whatever they decode to adds nothing.
    codes = torch.nn.functional.pad(codes, (0, in_pad - in_f, 0, out_pad - out_f), value=MID_CODE)

    # Per kernel group: the GPTQ group it belongs to, then (scale, float zero) for every row.
    n_kgroups = in_pad // kg
    first_col = torch.arange(n_kgroups) * kg
    src_group = torch.where(first_col < in_f, g_idx[first_col.clamp(max=in_f - 1)], g_idx[-1])
    scale = qw.scales.float()[src_group]  # [n_kgroups, out]
    zero = qw.zeros.float()[src_group]
    zero_f = (MID_CODE - zero) * scale
    sz = torch.stack([scale, zero_f], dim=-1)  # [n_kgroups, out, 2]
    # Padded rows: scale 1, zero 0 (their outputs are discarded, but keep them finite).
    pad_rows = torch.zeros(n_kgroups, out_pad - out_f, 2)
    pad_rows[..., 0] = 1.0
    sz = torch.cat([sz, pad_rows], dim=1)
    return TinygemmLayout(
        codes=codes.contiguous(),
        scale_and_zero=sz.contiguous(),
        group=kg,
        perm=perm,
        in_features=in_f,
        out_features=out_f,
    )


def nibbles_high_first(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes -> [N, K/2] uint8 with column 2j in the high nibble (the CUDA op's input)."""
    c = codes.to(torch.int32)
    return ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8)


def dequantize_layout(layout: TinygemmLayout) -> torch.Tensor:
    """The float32 [out, in] weight that `layout` stands for, in the original column order.

    Used by tests to prove the rearrangement exact before any kernel runs.
    """
    sz = layout.scale_and_zero.repeat_interleave(layout.group, dim=0)  # [in_pad, out_pad, 2]
    w = (layout.codes.float() - MID_CODE) * sz[..., 0].t() + sz[..., 1].t()
    w = w[: layout.out_features, : layout.in_features]
    if layout.perm is not None:
        w = w[:, torch.argsort(layout.perm)]
    return w
