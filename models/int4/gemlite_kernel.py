"""GemLite's Triton int4 GEMV/GEMM as a `QuantLinear` backend (``--kernel gemlite``, CUDA only).

Why GemLite: it is a maintained, pure-Python + Triton library (``pip install gemlite``, no CUDA
extension to build, so it runs wherever Triton runs, Jetson Orin included), its decode path is a
split-K GEMV that reads the packed weight once per token, and its grouped asymmetric mode
computes exactly GPTQ's formula::

    W_group_mode 3:  w = (q - zero) * scale      (q, zero integers; scale in the compute dtype)

so no float zero point has to be invented (tinygemm needs ``zero_f = (8 - z) * scale``). The
conversion (`gemlite_layout`) is plain torch and exact:

* act-order ``g_idx`` becomes a column permutation that makes every group contiguous; ``x`` is
  permuted the same way at run time (``x[:, perm] @ W[:, perm]^T == x @ W^T``),
* a GPTQ group of ``g`` columns becomes ``g / kg`` kernel groups that repeat its (scale, zero);
  per-channel (``group_size=-1``) is one group over K; there are always >= 2 kernel groups,
  because GemLite reads a single group as "channel-wise" and then applies the scale after the
  dot product (a different rounding),
* K is padded to a whole number of groups (GemLite needs ``K % 32 == 0`` and ``K % group == 0``);
  padded columns meet zero activations.

The only loss is the kernel's own: the scale is rounded to the compute dtype (exact for fp16,
as GPTQ scales are fp16 by construction; bf16 rounds it, like tinygemm) and the accumulation
order differs. `dequantize_gemlite_layout` reproduces the kernel's dequantization arithmetic
bit for bit, which is what the CPU tests check against `QuantizedWeight.dequantize`.

The library is an optional extra (``pip install .[gpu]``) imported only when a layer is packed
on CUDA: GemLite queries the GPU at import time, so importing it on a CPU-only torch fails.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from gptq_format import QuantizedWeight

from .layout import LayoutError, contiguous_group_order
from .linear import QuantLinear

SUPPORTED_BITS = (2, 4, 8)  # GemLite packs 1/2/4/8-bit codes into int32; GPTQ's 3-bit does not fit
K_MULTIPLE = 32  # GemLite's minimum K granularity
KERNEL_GROUP_SIZES = (128, 64, 32, 16)  # 16 is GemLite's smallest group
GROUPED_ASYMMETRIC_MODE = 3  # GemLite's W_group_mode for (q - zero) * scale
COMPUTE_DTYPES = (torch.float16, torch.bfloat16)
# GemLite's split-K loops run over ceil(K / (BLOCK_K * SPLIT_K)) blocks and load each block's
# scale/zero row without a mask, so where K is no multiple of that (4864, 11008: common) the last
# blocks read up to BLOCK_K * SPLIT_K (<= 128 * 8 in its configs) columns' worth of groups past
# the end of the arrays. Their activations are masked to 0, but 0 * (garbage NaN/Inf) = NaN
# (reproduced under Triton's interpreter). Padding scales/zeros with zero groups up to a multiple
# of this many columns (twice that bound) makes those reads finite zeros.
META_TAIL_COLUMNS = 2048


@dataclass
class GemliteLayout:
    """A GPTQ weight rearranged for GemLite, before the library's int32 bit-packing."""

    codes: torch.Tensor  # [out, in_padded] uint8, columns in kernel order
    scales: torch.Tensor  # [out, in_padded / group] float32
    zeros: torch.Tensor  # [out, in_padded / group] float32, integer-valued
    group: int  # kernel group size
    perm: torch.Tensor | None  # [in] int64 column order for x, None when natural
    in_features: int
    bits: int

    @property
    def in_padded(self) -> int:
        return self.codes.shape[1]

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _grouping(qw: QuantizedWeight) -> tuple[int, int, int, torch.Tensor | None]:
    """(GPTQ group columns, padded K, kernel group, column order); `LayoutError` if inexact."""
    if qw.bits not in SUPPORTED_BITS:
        raise LayoutError(f"bits={qw.bits} (gemlite packs {SUPPORTED_BITS}-bit codes)")
    in_f = qw.shape[1]
    group = qw.group_size if qw.group_size != -1 else _round_up(in_f, K_MULTIPLE)
    in_pad = _round_up(in_f, max(group, K_MULTIPLE))
    kg = next((k for k in KERNEL_GROUP_SIZES if group % k == 0 and in_pad // k >= 2), None)
    if kg is None or in_pad % K_MULTIPLE:
        raise LayoutError(f"group_size={qw.group_size} does not split into groups of {KERNEL_GROUP_SIZES}")
    return group, in_pad, kg, contiguous_group_order(qw.g_idx, group)


def unsupported_reason(qw: QuantizedWeight) -> str | None:
    """Why `qw` cannot use GemLite exactly, or None when it can."""
    try:
        _grouping(qw)
    except LayoutError as e:
        return str(e)
    return None


def gemlite_layout(qw: QuantizedWeight) -> GemliteLayout:
    """Rearrange `qw` for GemLite's grouped asymmetric mode (see the module docstring)."""
    _, in_pad, kg, perm = _grouping(qw)
    in_f = qw.shape[1]
    g_idx = qw.g_idx.long() if perm is None else qw.g_idx.long()[perm]
    codes = qw.codes if perm is None else qw.codes[:, perm]
    # Per kernel group: the GPTQ group it belongs to (padding columns borrow the last one).
    first_col = (torch.arange(in_pad // kg) * kg).clamp(max=in_f - 1)
    src_group = g_idx[first_col]
    scales = qw.scales.float()[src_group].t()  # [out, n_kgroups]
    zeros = qw.zeros.float()[src_group].t()
    # Padded columns: code == the last group's zero, so they decode to 0 (and meet x == 0 anyway).
    pad_codes = zeros[:, -1:].to(torch.uint8).expand(-1, in_pad - in_f)
    codes = torch.cat([codes.to(torch.uint8), pad_codes], dim=1)
    return GemliteLayout(
        codes=codes.contiguous(),
        scales=scales.contiguous(),
        zeros=zeros.contiguous(),
        group=kg,
        perm=perm,
        in_features=in_f,
        bits=qw.bits,
    )


def dequantize_gemlite_layout(layout: GemliteLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in] weight GemLite computes with in `dtype`, in the original column order.

    Mirrors the kernel: ``(q.to(dtype) - zero.to(dtype)) * scale.to(dtype)``, each op rounded to
    `dtype`, so comparing it to `QuantizedWeight.dequantize` proves the conversion exact.
    """
    scales = layout.scales.to(dtype).repeat_interleave(layout.group, dim=1)
    zeros = layout.zeros.to(dtype).repeat_interleave(layout.group, dim=1)
    w = (layout.codes.to(dtype) - zeros) * scales
    w = w[:, : layout.in_features]
    if layout.perm is not None:
        w = w[:, torch.argsort(layout.perm)]
    return w


@functools.cache
def _import_error() -> str | None:
    """Why GemLite cannot be imported here (None: it can). Only called on a CUDA device."""
    for name in ("triton", "gemlite"):
        if importlib.util.find_spec(name) is None:
            return f"the {name!r} package is not installed (pip install 'rpiq[gpu]')"
    try:
        importlib.import_module("gemlite")
    except Exception as e:  # GemLite probes the GPU and Triton's driver at import time
        return f"gemlite failed to import: {type(e).__name__}: {e}"
    return None


def _gemlite() -> Any:
    """The GemLite core module, imported on first use (it needs a GPU, or Triton's interpreter)."""
    return importlib.import_module("gemlite.core")


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """GemLite's activation dtype for a model in `dtype`: fp16/bf16 as given, else bf16 (like tinygemm)."""
    return dtype if dtype in COMPUTE_DTYPES else torch.bfloat16


class GemliteLinear(QuantLinear):
    """GemLite (Triton) A16W4 GEMV/GEMM with GPTQ's integer zeros: ``(q - z) * s`` in the kernel.

    Holds only the library's tensors (int32-packed codes, scales and zeros in the compute dtype)
    as non-persistent buffers, and calls GemLite's functional custom op, which torch.compile and
    CUDA-graph capture can see through; no nested GemLite module is kept in the model.
    """

    kernel = "gemlite"
    device_type = "cuda"
    _forward: ClassVar[Callable[..., torch.Tensor] | None] = None

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int) -> None:
        super().__init__(in_features, out_features, bits, group_size)
        self.compute_dtype = torch.bfloat16
        self.meta_args: list[int] = []

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        reason = super().unavailable(device)
        if reason is None and torch.cuda.get_device_capability(device) < (8, 0):
            return f"kernel {cls.kernel!r} needs compute capability 8.0 or newer (bf16 Triton dots)"
        return reason or _import_error()

    @classmethod
    def unsupported(cls, qw: QuantizedWeight) -> str | None:
        return unsupported_reason(qw)

    def _pack(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> None:
        """The packed scales follow the model's dtype (fp16 stays exact; anything else computes in bf16)."""
        self.compute_dtype = compute_dtype_for(dtype)
        device = torch.device(device)
        layout = gemlite_layout(qw)
        core = _gemlite()
        dt = self.compute_dtype
        lib_dtype = core.DType.FP16 if dt == torch.float16 else core.DType.BF16
        lib = core.GemLiteLinearTriton(
            W_nbits=layout.bits,
            group_size=layout.group,
            in_features=layout.in_padded,
            out_features=layout.out_features,
            input_dtype=lib_dtype,
            output_dtype=lib_dtype,
        )
        tail = (_round_up(layout.in_padded, META_TAIL_COLUMNS) - layout.in_padded) // layout.group
        lib.pack(
            layout.codes.to(device),
            F.pad(layout.scales, (0, tail)).to(device=device, dtype=dt),
            F.pad(layout.zeros, (0, tail)).to(device=device, dtype=dt),
            fma_mode=False,  # keep (q - z) * s: the fma mode would store -z * s, rounded
        )
        w_q, scales, zeros, meta_scale = (t.detach() for t in lib.get_tensor_args())
        self.meta_args = [int(a) for a in lib.get_meta_args()]
        self.kernel_group = layout.group
        self.in_padded = layout.in_padded
        self.register_buffer("qweight", w_q, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("zeros", zeros, persistent=False)
        self.register_buffer("meta_scale", meta_scale, persistent=False)
        perm = None if layout.perm is None else layout.perm.to(device=device, dtype=torch.int32)
        self.register_buffer("perm", perm, persistent=False)
        type(self)._forward = core.forward_functional

    @property
    def w_group_mode(self) -> int:
        """GemLite's dequantization mode for this layer (3: grouped ``(q - z) * s``)."""
        return self.meta_args[10]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.in_padded != self.in_features:
            x = F.pad(x, (0, self.in_padded - self.in_features))
        forward = type(self)._forward
        assert forward is not None, "GemliteLinear used before any layer was packed"
        tensors = [self.qweight, self.scales, self.zeros, self.meta_scale]
        return forward(x.contiguous(), None, tensors, self.meta_args)
