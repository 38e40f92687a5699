"""Decoder layers that live in host memory and visit the accelerator only for their own forward.

Single-instance pass 1 streams every calibration window through the whole model. With the model
resident on the GPU that costs the whole model's weights for the whole pass; here each layer's
weights are copied in just before its forward and dropped right after. The layer's own parameter
objects never leave the host, so nothing is copied back and outside references stay valid. The
GPU then holds the embeddings, one layer and one window's activations; the price is one
host-to-device copy of the decoder layers per window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def _visit(module: nn.Module, device: torch.device) -> tuple:
    held: list[tuple[dict, str, torch.Tensor]] = []  # (owner's _parameters or _buffers, name, host tensor)

    def arrive(mod: nn.Module, args: tuple) -> None:
        for sub in mod.modules():
            for table, wrap in ((sub._parameters, True), (sub._buffers, False)):
                for name, host in list(table.items()):
                    if host is None:
                        continue
                    held.append((table, name, host))
                    moved = host.to(device, non_blocking=True)
                    table[name] = nn.Parameter(moved, requires_grad=host.requires_grad) if wrap else moved

    def leave(mod: nn.Module, args: tuple, output: object) -> None:
        for table, name, host in held:
            table[name] = host
        held.clear()

    # always_call: the layer also leaves when a hook stops the forward early (StopForward).
    return module.register_forward_pre_hook(arrive), module.register_forward_hook(leave, always_call=True)


@contextlib.contextmanager
def layers_visit(layers: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Within the block, each of `layers` (kept on the host) is on `device` only while it runs.

    On a CPU the visit moves nothing (the same storage is re-wrapped), so the path is the same
    one an accelerator takes."""
    handles = [h for layer in layers for h in _visit(layer, device)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
