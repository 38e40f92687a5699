"""Quantized linear layers: one `nn.Module` class per kernel, chosen per device by name.

Like GPTQModel's ``QuantLinear`` family, each kernel is its own module class holding the
weight in that kernel's packed form, so a layer never keeps a full-precision copy. All of them
compute ``y = x @ W^T + b`` for the W that a `QuantizedWeight` (GPTQ's logical layout) stands
for; `DequantLinear` does it the obvious way and is the reference the others are tested against.

Kernel buffers are registered non-persistent: a model holding these layers is for inference,
and its checkpoint is the GPTQ directory it was loaded from (`models.checkpoint`), not its
``state_dict``.
"""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from gptq_format import QuantizedWeight

from . import autotune
from .layout import nibbles_high_first, tinygemm_layout, unsupported_reason

_DEVICE_TYPES = ("cpu", "cuda")


class KernelUnavailableError(ValueError):
    """The requested kernel cannot run here or cannot represent a layer exactly."""


class QuantLinear(nn.Module):
    """Common parts: shapes, bias, and the (kernel-specific) `_matmul` on a 2-D input."""

    kernel: ClassVar[str]
    device_type: ClassVar[str | None]  # None: any device

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.bias: nn.Parameter | None = None

    # ------------------------------------------------------------------ selection
    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why this kernel cannot run on `device` at all (None: it can)."""
        if cls.device_type is not None and device.type != cls.device_type:
            return f"kernel {cls.kernel!r} runs on {cls.device_type}, not {device.type}"
        return None

    @classmethod
    def unsupported(cls, qw: QuantizedWeight) -> str | None:
        """Why this kernel cannot compute `qw` exactly (None: it can)."""
        return None

    @classmethod
    def from_weight(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype
    ) -> QuantLinear:
        """Pack `qw` for this kernel on `device`; `dtype` is the bias (and output) dtype."""
        out_f, in_f = qw.shape
        layer = cls(in_f, out_f, qw.bits, qw.group_size)
        layer._pack(qw, device, dtype)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False)
        return layer

    def _pack(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        """Bytes this layer keeps for its weight (packed codes, scales, zeros, permutation)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, kernel={self.kernel}, bias={self.bias is not None}"
        )


class DequantLinear(QuantLinear):
    """Reference: dequantize the whole weight in the input's dtype, then a dense matmul.

    Any bit width and any g_idx; slow and transiently as large as the dense weight. It is the
    fallback for layers no fast kernel can take and the yardstick of the kernel tests.
    """

    kernel = "dequant"
    device_type = None

    def _pack(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> None:
        self.register_buffer("codes", qw.codes.to(device=device, dtype=torch.uint8), persistent=False)
        self.register_buffer("scales", qw.scales.to(device=device, dtype=torch.float32), persistent=False)
        self.register_buffer("zeros", qw.zeros.to(device=device, dtype=torch.uint8), persistent=False)
        self.register_buffer("g_idx", qw.g_idx.to(device=device, dtype=torch.int32), persistent=False)

    def dequantized_weight(self) -> torch.Tensor:
        g = self.g_idx.long()
        return self.scales[g].t() * (self.codes.float() - self.zeros[g].t().float())

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype))


class _Tinygemm(QuantLinear):
    """Shared parts of torch's two int4 tinygemm ops: bf16 activations, padding, act-order."""

    device_type: ClassVar[str]

    @classmethod
    def unsupported(cls, qw: QuantizedWeight) -> str | None:
        return unsupported_reason(qw)

    def _pack(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> None:
        layout = tinygemm_layout(qw)
        self.kernel_group = layout.group
        self.in_padded = layout.in_padded
        self.out_padded = layout.out_padded
        self.register_buffer("packed", self._convert(layout.codes, device), persistent=False)
        sz = layout.scale_and_zero.to(device=device, dtype=torch.bfloat16)
        self.register_buffer("scale_and_zero", sz, persistent=False)
        perm = None if layout.perm is None else layout.perm.to(device=device, dtype=torch.int32)
        self.register_buffer("perm", perm, persistent=False)

    def _convert(self, codes: torch.Tensor, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.in_padded != self.in_features:
            x = F.pad(x, (0, self.in_padded - self.in_features))
        y = self._op(x.contiguous())
        return y[:, : self.out_features] if self.out_padded != self.out_features else y


class TinygemmCPULinear(_Tinygemm):
    """``aten._weight_int4pack_mm_for_cpu``: int4 weights, bf16 activations, on the CPU."""

    kernel = "tinygemm-cpu"
    device_type = "cpu"

    def _convert(self, codes: torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(device), 1)

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.kernel_group, self.scale_and_zero)


class TinygemmCUDALinear(_Tinygemm):
    """``aten._weight_int4pack_mm``: torchao's tensor-core int4 layout (sm_80+, Jetson Orin included)."""

    kernel = "tinygemm-cuda"
    device_type = "cuda"

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        reason = super().unavailable(device)
        if reason is None and torch.cuda.get_device_capability(device) < (8, 0):
            return f"kernel {cls.kernel!r} needs compute capability 8.0 or newer"
        return reason

    def _convert(self, codes: torch.Tensor, device: torch.device) -> torch.Tensor:
        # Largest inner-K tiling that divides the padded K (always a multiple of 32 here).
        inner_k_tiles = next(t for t in (8, 4, 2) if codes.shape[1] % (t * 16) == 0)
        return torch.ops.aten._convert_weight_to_int4pack(nibbles_high_first(codes).to(device), inner_k_tiles)

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.kernel_group, self.scale_and_zero)


# GemLite (Triton, optional extra `gpu`) subclasses QuantLinear, so it is imported once that exists;
# the module itself is plain torch and imports the library only when a layer is packed on CUDA.
from .gemlite_kernel import GemliteLinear  # noqa: E402

KERNELS: dict[str, type[QuantLinear]] = {
    cls.kernel: cls for cls in (GemliteLinear, TinygemmCUDALinear, TinygemmCPULinear, DequantLinear)
}
# The names a user may pick (CLI options, server settings): "auto" or one kernel above.
KernelName = Literal["auto", "tinygemm-cuda", "tinygemm-cpu", "dequant", "gemlite"]
KERNEL_CHOICES: tuple[str, ...] = get_args(KernelName)
assert set(KERNEL_CHOICES) == {"auto", *KERNELS}, "KernelName must list every kernel"
# `auto`'s fast kernels per device: of those that can run on the device and represent a layer, one is taken
# as it is, several are timed on the layer's shape (`autotune`), none leaves the dequantizing reference.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("gemlite", "tinygemm-cuda"),  # gemlite only where the library imports
    "cpu": ("tinygemm-cpu",),
}


def kernel_for(
    name: KernelName | str, qw: QuantizedWeight, device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> type[QuantLinear]:
    """The QuantLinear class that computes `qw` on `device` (`name` a kernel or "auto").

    An explicitly named kernel that cannot run is an error saying why; "auto" takes the fast kernels
    that can run on the device and represent the layer and, where there are several (CUDA: GemLite and
    tinygemm), the one measured fastest on this layer's shape (`autotune`, activations in `dtype`);
    where there are none, the dequantizing reference, which always works.
    """
    device = torch.device(device)
    if device.type not in _DEVICE_TYPES:
        raise KernelUnavailableError(f"device {device.type!r} is not supported; use one of {_DEVICE_TYPES}")
    if name == "auto":
        candidates = [KERNELS[c] for c in _AUTO_ORDER[device.type]]
        fits = [c for c in candidates if c.unavailable(device) is None and c.unsupported(qw) is None]
        if len(fits) > 1:
            return autotune.fastest(fits, qw, device, dtype) or DequantLinear
        return fits[0] if fits else DequantLinear
    if name not in KERNELS:
        raise KernelUnavailableError(f"unknown kernel {name!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    cls = KERNELS[name]
    reason = cls.unavailable(device) or cls.unsupported(qw)
    if reason is not None:
        raise KernelUnavailableError(f"kernel {name!r} cannot be used: {reason}")
    return cls
