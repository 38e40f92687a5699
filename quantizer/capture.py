"""Running a model one decoder layer at a time, and catching what its linears receive.

Only the decoder layers are quantized, and each needs exactly the inputs the full model would
give it (hidden states plus whatever the model computes once: rotary embeddings, masks,
position ids). Rather than re-implementing each architecture's preamble, the first layer is
swapped for a catcher that records its call and stops the forward: embeddings, norms and mask
construction run through the model's own code, whatever the architecture.

A calibration batch is either a tensor of token ids (text) or a mapping of model keyword
arguments (vision-language models: ids plus pixel values, image grids, token types), so that
images go through the model's own vision tower and projector. Text batches of equal shape get
identical layer arguments, which are kept once; each multimodal batch keeps its own (positions,
masks and token types depend on where the image sits in the prompt).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .hessian import HessianAccumulator


class StopForward(Exception):
    """Raised by hooks once everything needed from a forward pass has been captured."""


Batch = torch.Tensor | Mapping[str, Any]
"""One calibration forward: token ids [b, seqlen], or the model's keyword arguments."""


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    return value


def forward_batch(model: nn.Module, batch: Batch, device: torch.device) -> Any:
    """One forward of `model` on a calibration batch (ids or keyword arguments), without a cache."""
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch.to(device), use_cache=False)
    return model(**{k: _to(v, device) for k, v in batch.items()}, use_cache=False)


Call = tuple[tuple[Any, ...], dict[str, Any]]
"""(positional args after the hidden states, keyword args) of one decoder-layer call."""


@dataclass
class LayerInputs:
    """The hidden states entering the first decoder layer, one tensor per calibration batch, and
    the arguments the model passes to every layer.

    Layers need not all get the same arguments: Gemma 2/3 give sliding-window layers a local
    rotary embedding and mask and full-attention layers global ones; Qwen2.5-VL's vision blocks
    alternate windowed and full `cu_seqlens`. So the arguments are kept per layer: `layers[i]`
    for text batches (equal shapes give equal arguments), `per_batch[b][i]` when they differ
    between batches (multimodal batches: positions and masks depend on where the image sits).
    """

    hidden: list[torch.Tensor]
    layers: list[Call] = field(default_factory=list)
    per_batch: list[list[Call]] | None = None

    def call(self, index: int, layer: int = 0) -> Call:
        """(positional args after the hidden states, keyword args) of `layer` for batch `index`."""
        return self.per_batch[index][layer] if self.per_batch is not None else self.layers[layer]


def _clean(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    if "use_cache" in kwargs:  # only where the layer takes it (vision blocks often do not)
        kwargs["use_cache"] = False
    return kwargs


def _install_output_hooks(model: nn.Module) -> None:
    """Let transformers install its output-recording hooks while every layer is the real one.

    transformers 5 records hidden states (LLaVA reads the vision tower's penultimate one) with
    hooks installed on the first forward. Were that forward the one with layers swapped for the
    recorders below, the real layers would never get their hooks and later forwards would lose outputs.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # older transformers record outputs without hooks
        return
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            maybe_install_capturing_hooks(module)


class _CallRecorder(nn.Module):
    """Stands in for a decoder layer: records its call and passes the hidden states on.

    Nothing is computed: the arguments a model passes to its layers (masks, rotary embeddings,
    positions) are built before the layer loop, from the input alone. The last recorder stops
    the forward.
    """

    def __init__(self, real: nn.Module, last: bool, sink: list[tuple[torch.Tensor, Call]]):
        super().__init__()
        # Some models read attributes of their layers (e.g. `attention_type`) while building masks.
        self.__dict__.update({k: v for k, v in real.__dict__.items() if not k.startswith("_")})
        self._last, self._sink = last, sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._sink.append((hidden_states, (args, kwargs)))
        if self._last:
            raise StopForward
        return hidden_states


@torch.no_grad()
def capture_first_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: Iterable[Batch], device: torch.device
) -> LayerInputs:
    """Run the model's preamble on each batch; record layer 0's inputs and every layer's arguments."""
    captured = LayerInputs(hidden=[])
    per_batch: list[list[Call]] = []
    multimodal = False
    _install_output_hooks(model)
    real = list(layers)
    sink: list[tuple[torch.Tensor, Call]] = []
    for i, layer in enumerate(real):
        layers[i] = _CallRecorder(layer, i == len(real) - 1, sink)
    try:
        for batch in batches:
            multimodal = multimodal or not isinstance(batch, torch.Tensor)
            sink.clear()
            with contextlib.suppress(StopForward):
                forward_batch(model, batch, device)
            if len(sink) != len(real):
                raise RuntimeError(
                    f"the model called {len(sink)} of its {len(real)} decoder layers on a calibration batch"
                )
            captured.hidden.append(sink[0][0])
            per_batch.append([(args, _clean(kw)) for _, (args, kw) in sink])
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer
    if not per_batch:
        return captured
    if multimodal:
        captured.per_batch = per_batch
    captured.layers = per_batch[0]
    return captured


def run_layer(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], args: tuple[Any, ...] = ()
) -> torch.Tensor:
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


class GroupHessians:
    """The Hessians of one linear group, keyed by member.

    Linears that receive the very same input tensor (q/k/v, gate/up) share one Hessian, so a
    group costs one `X^T X` however many members it has. Kept apart from the hooks that feed
    it, so that finished Hessians can be stored and read back (`quantizer.hessian_store`).
    """

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        *,
        hessian_dtype: torch.dtype = torch.float32,
        hessian_device: torch.device | str | None = None,
    ):
        """`hessian_device`: where the Hessians live (default: with the inputs); "cpu" keeps
        them in host memory while the model runs on an accelerator."""
        self.modules = modules
        self.hessians: dict[str, HessianAccumulator] = {}
        self.share: dict[str, str] = {}  # member -> member whose Hessian it shares
        self._dtype = hessian_dtype
        self._hessian_device = hessian_device

    def accumulate(self, inputs: dict[str, torch.Tensor], paired: dict[str, torch.Tensor] | None = None) -> None:
        """Fold one batch's inputs into the (shared where possible) Hessians.

        With `paired` (the same members' inputs from a second stream, same tokens) the
        accumulators hold the cross terms `2/N X^T Y` instead (`HessianAccumulator.add`).
        """
        seen: dict[int, str] = {}
        for name, x in inputs.items():
            owner = seen.setdefault(id(x), name)
            prev = self.share.setdefault(name, owner)
            if prev != owner:
                raise RuntimeError(f"{name} shared its input with {prev} in one batch but not in another")
            if owner == name:
                if name not in self.hessians:
                    self.hessians[name] = HessianAccumulator(
                        x.shape[-1], dtype=self._dtype, device=self._hessian_device or x.device
                    )
                self.hessians[name].add(x, None if paired is None else paired[name])

    def hessian(self, name: str) -> torch.Tensor:
        return self.hessians[self.share[name]].H

    def tokens(self, name: str) -> int:
        """How many input rows (tokens) `name`'s Hessian was computed from."""
        return self.hessians[self.share[name]].nsamples


class GroupInputCatcher(GroupHessians):
    """Hooks on the linears of one group: collects their inputs, stops the forward when done."""

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        *,
        stop: bool = True,
        streaming: bool = False,
        hessian_dtype: torch.dtype = torch.float32,
        hessian_device: torch.device | str | None = None,
    ):
        """`stop`: end the forward once every member has its input (nothing after is needed).
        `streaming`: fold inputs into the Hessians as soon as the group is complete and drop
        them, so a full-model pass never holds more than one group's activations."""
        super().__init__(modules, hessian_dtype=hessian_dtype, hessian_device=hessian_device)
        self.stop = stop
        self.streaming = streaming
        self.inputs: dict[str, torch.Tensor] = {}
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

    def run(
        self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], args: tuple[Any, ...] = ()
    ) -> dict[str, torch.Tensor]:
        """One forward of `layer` (stopped early once every member has its input)."""
        self.inputs = {}
        with contextlib.suppress(StopForward):
            run_layer(layer, hidden, kwargs, args)
        missing = set(self.modules) - set(self.inputs)
        if missing:
            raise RuntimeError(f"linears {sorted(missing)} were not called by the layer's forward")
        return self.inputs

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
