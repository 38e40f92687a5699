"""`auto`'s choice between several fast int4 kernels, by timing them on the layer's own shape.

Which int4 kernel is fastest depends on the GPU and on the layer's shape: a split-K GEMV (GemLite)
wins where K is large and N small, a tensor-core tile kernel (tinygemm) where N is large; on a
bandwidth-poor Jetson the order can flip again. A fixed preference order would be right on one
machine only, so where more than one fast kernel can represent a layer, each packs it once and runs
a batch-1 product (the decode case) a few times, and the fastest is kept. Results are cached per
shape, so a model's seven projection shapes cost seven measurements, not one per layer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from gptq_format import QuantizedWeight

if TYPE_CHECKING:
    from .linear import QuantLinear

WARMUP_CALLS = 3  # first calls compile / autotune (Triton) and fill caches
TIMED_CALLS = 20

_CACHE: dict[tuple, type[QuantLinear] | None] = {}
_LOCK = threading.Lock()


def _shape_key(candidates: Sequence[type[QuantLinear]], qw: QuantizedWeight, device: torch.device, dtype) -> tuple:
    act_order = bool((qw.g_idx[1:] < qw.g_idx[:-1]).any())
    return (tuple(c.kernel for c in candidates), qw.shape, qw.bits, qw.group_size, act_order, str(device), dtype)


def seconds_per_call(layer: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean seconds of ``layer(x)`` over `TIMED_CALLS` calls after `WARMUP_CALLS` (device-synchronised)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda *_: None)
    with torch.inference_mode():
        for _ in range(WARMUP_CALLS):
            layer(x)
        sync(x.device)
        t0 = time.perf_counter()
        for _ in range(TIMED_CALLS):
            layer(x)
        sync(x.device)
    return (time.perf_counter() - t0) / TIMED_CALLS


def fastest(
    candidates: Sequence[type[QuantLinear]], qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
) -> type[QuantLinear] | None:
    """The candidate kernel class whose batch-1 product on `qw`'s shape is fastest on `device` (cached per
    shape, bits, group size and act-order); None if none of them packs and runs it."""
    key = _shape_key(candidates, qw, device, dtype)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    x = torch.randn(1, qw.shape[1], generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    times: dict[type[QuantLinear], float] = {}
    for cls in candidates:
        try:
            times[cls] = seconds_per_call(cls.from_weight(qw, None, device, dtype), x)
        except Exception:  # a kernel that cannot take this layer here is simply not chosen
            continue
    best = min(times, key=times.get) if times else None
    with _LOCK:
        _CACHE[key] = best
    return best


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
