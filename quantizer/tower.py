"""What both calibration pipelines share while quantizing one tower's decoder blocks.

A tower is the language model's decoder layers or a vision encoder's blocks, as a
`ModelAdapter` describes them. `TowerRun` is the state `quantizer.sequential` and
`quantizer.single_instance` receive: the model, the calibration batches, the config, the
layers an earlier (interrupted) run already finished, and where each finished layer goes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from gptq_format import QuantizedWeight

from .adapters import ModelAdapter
from .capture import Batch, GroupHessians
from .config import QuantConfig
from .layer import Instance, quantize_weight
from .result import LayerReport
from .resume import RunState

Calibration = torch.Tensor | Sequence[Mapping[str, Any]]
"""Token windows [nsamples, seqlen], or model-input batches (vision-language calibration)."""

LayerResult = tuple[dict[str, QuantizedWeight], list[LayerReport]]
"""One decoder layer's quantized weights (by module name) and reports."""


def batches(calib: Calibration) -> list[Batch]:
    """One forward per window (text) or per multimodal sample."""
    return list(calib.split(1)) if isinstance(calib, torch.Tensor) else list(calib)


def set_weight(module: nn.Linear, qw: QuantizedWeight) -> None:
    """Replace `module`'s weights by their dequantized grid values."""
    module.weight.data.copy_(qw.dequantize().to(module.weight.dtype))


class InstanceSource(Protocol):
    """The kept batch of one linear group, one member at a time (`quantizer.single_instance`)."""

    def get(self, name: str) -> Instance: ...


@dataclass
class TowerRun:
    """One tower's calibration run: what a pipeline reads, and `finish_layer` for each layer it quantizes."""

    model: nn.Module
    adapter: ModelAdapter
    calib: Calibration
    config: QuantConfig
    device: torch.device
    done: dict[int, LayerResult]
    """Layers finished by an earlier run (resume): their weights are applied, not recomputed."""
    finish_layer: Callable[[int, dict[str, QuantizedWeight], list[LayerReport]], None]
    progress: bool
    state: RunState | None

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.model)

    def prefix(self, index: int) -> str:
        """The module name of decoder layer `index`."""
        return f"{self.adapter.layers_path}.{index}"

    def preamble_to_device(self) -> None:
        """Move everything but the decoder layers to the device; layers go there one at a time."""
        if self.device.type == "cpu":
            return
        keep = {id(p) for p in self.layers.parameters()}
        for p in self.model.parameters():
            if id(p) not in keep:
                p.data = p.data.to(self.device)
        for b in self.model.buffers():
            b.data = b.data.to(self.device)

    @contextlib.contextmanager
    def on_device(self, layer: nn.Module) -> Iterator[None]:
        """`layer` on the device for the block, back in host memory after it."""
        layer.to(self.device)
        yield
        if self.device.type != "cpu":
            layer.to("cpu")

    def apply_done(self, index: int, layer: nn.Module) -> None:
        """Give `layer` the weights an earlier run stored for it."""
        prefix = self.prefix(index)
        for name, qw in self.done[index][0].items():
            set_weight(layer.get_submodule(name[len(prefix) + 1 :]), qw)

    def quantize_group(
        self,
        index: int,
        layer: nn.Module,
        catcher: GroupHessians,
        instances: InstanceSource | None = None,
        cross: GroupHessians | None = None,
    ) -> LayerResult:
        """Quantize one linear group of layer `index` in place on its Hessians (`catcher`), with the
        kept batch (`instances`, single-instance) or the full-precision cross terms (`cross`,
        sequential compensation) when given."""
        prefix = self.prefix(index)
        self._check_tokens(prefix, catcher)
        weights, reports = {}, []
        for name, module in catcher.modules.items():
            qw, rep = quantize_weight(
                module.weight,
                catcher.hessian(name),
                self.config,
                instance=instances.get(name) if instances else None,
                cross=cross.hessian(name) if cross is not None else None,
                name=f"{prefix}.{name}",
            )
            set_weight(module, qw)
            weights[f"{prefix}.{name}"] = qw
            reports.append(rep)
        return weights, reports

    def _check_tokens(self, prefix: str, catcher: GroupHessians) -> None:
        """Refuse a linear that no calibration token reached: its zero Hessian would zero its weights."""
        for name in catcher.modules:
            if catcher.tokens(name) == 0:
                routed = self.adapter.routing.get(name)
                hint = (
                    f" (it only receives tokens of type {routed}; calibrate with data that contains them, "
                    "e.g. --calib-data images for image tokens)"
                    if routed is not None
                    else ""
                )
                raise ValueError(f"{prefix}.{name} received no calibration tokens{hint}")
