"""Running a model one decoder layer at a time, and catching what its linears receive.

Only the decoder layers are quantized, and each needs exactly the inputs the full model would
give it (hidden states plus whatever the model computes once: rotary embeddings, masks,
position ids). Rather than re-implementing each architecture's preamble, the first layer is
swapped for a catcher that records its call and stops the forward: embeddings, norms and mask
construction run through the model's own code, whatever the architecture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .hessian import HessianAccumulator


class StopForward(Exception):
    """Raised by hooks once everything needed from a forward pass has been captured."""


@dataclass
class LayerInputs:
    """The hidden states entering a decoder layer, one tensor per calibration batch, and the
    keyword arguments the model passes to every layer (identical for equal-shaped batches)."""

    hidden: list[torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def capture_first_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: Iterable[torch.Tensor], device: torch.device
) -> LayerInputs:
    """Run the model's preamble on each batch of token ids and record layer 0's inputs."""
    captured = LayerInputs(hidden=[])
    first = layers[0]

    class Catcher(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # Some models read attributes of their layers (e.g. `attention_type`) while building masks.
            self.__dict__.update({k: v for k, v in first.__dict__.items() if not k.startswith("_")})

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            captured.hidden.append(hidden_states)
            if not captured.kwargs:
                captured.kwargs = dict(kwargs)
            raise StopForward

    layers[0] = Catcher()
    try:
        for ids in batches:
            with contextlib.suppress(StopForward):
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        layers[0] = first
    captured.kwargs.pop("past_key_values", None)
    captured.kwargs.pop("past_key_value", None)
    captured.kwargs["use_cache"] = False
    return captured


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


class GroupInputCatcher:
    """Hooks on the linears of one group: collects their inputs, stops the forward when done.

    Linears that receive the very same input tensor (q/k/v, gate/up) share one Hessian, so a
    group costs one `X^T X` however many members it has.
    """

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        *,
        stop: bool = True,
        streaming: bool = False,
        hessian_dtype: torch.dtype = torch.float32,
    ):
        """`stop`: end the forward once every member has its input (nothing after is needed).
        `streaming`: fold inputs into the Hessians as soon as the group is complete and drop
        them, so a full-model pass never holds more than one group's activations."""
        self.modules = modules
        self.stop = stop
        self.streaming = streaming
        self.inputs: dict[str, torch.Tensor] = {}
        self.hessians: dict[str, HessianAccumulator] = {}
        self.share: dict[str, str] = {}  # member -> member whose Hessian it shares
        self._dtype = hessian_dtype
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.inputs[name] = args[0]
            if len(self.inputs) == len(self.modules):
                if self.streaming:
                    self.accumulate(self.inputs)
                    self.inputs = {}
                if self.stop:
                    raise StopForward

        return hook

    def run(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One forward of `layer` (stopped early once every member has its input)."""
        self.inputs = {}
        with contextlib.suppress(StopForward):
            run_layer(layer, hidden, kwargs)
        missing = set(self.modules) - set(self.inputs)
        if missing:
            raise RuntimeError(f"linears {sorted(missing)} were not called by the layer's forward")
        return self.inputs

    def accumulate(self, inputs: dict[str, torch.Tensor]) -> None:
        """Fold one batch's inputs into the (shared where possible) Hessians."""
        seen: dict[int, str] = {}
        for name, x in inputs.items():
            owner = seen.setdefault(id(x), name)
            prev = self.share.setdefault(name, owner)
            if prev != owner:
                raise RuntimeError(f"{name} shared its input with {prev} in one batch but not in another")
            if owner == name:
                if name not in self.hessians:
                    self.hessians[name] = HessianAccumulator(x.shape[-1], dtype=self._dtype, device=x.device)
                self.hessians[name].add(x)

    def hessian(self, name: str) -> torch.Tensor:
        return self.hessians[self.share[name]].H

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
