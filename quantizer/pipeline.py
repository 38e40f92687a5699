"""Whole-model quantization: `quantize_model`, every decoder layer's linears in either calibration mode.

- `sequential` (GPTQ-classic, `quantizer.sequential`): all calibration windows' hidden states
  for the current decoder layer are resident; each linear group is calibrated on the outputs of
  the already-quantized groups and layers before it.
- `single-instance` (RPIQ, `quantizer.single_instance`): one streaming pass over the calibration
  windows accumulates every linear's Hessian with only one batch resident; then the kept last
  batch runs through the partly quantized model, layer by layer, next to a full-precision copy
  of its stream, and drives stage 2 with the single-instance residual.

Calibration is token windows (a [nsamples, seqlen] tensor) or, for vision-language models, a
list of model-input batches (image + question + answer, `quantizer.vlm_calibration`), so that
every weight's Hessian comes from the tokens the full model really routes to it. With `vision`,
the vision encoder's blocks are quantized first (on image batches), then the language tower is
calibrated on what the quantized encoder produces.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gptq_format import QuantizedWeight
from gptq_format.embedding import Int8Rows, quantize_embeddings
from models.memory import release_freed_memory

from .adapters import ModelAdapter, UnsupportedModelError, get_adapter
from .config import QuantConfig, RPIQConfig
from .lm_head import quantize_lm_head
from .result import LayerReport
from .resume import RunState, fingerprint
from .sequential import run_sequential
from .single_instance import run_single_instance
from .tower import Calibration, TowerRun


@dataclass
class ModelQuantization:
    """The outcome: quantized weights by module name and one report per linear."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    reports: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    embeddings: dict[str, Int8Rows] = field(default_factory=dict)
    """Int8 embedding tables (``grid.embeddings="int8"``), for `save_quantized(..., embeddings=...)`."""

    @property
    def total_loss(self) -> float:
        return sum(r.loss_final for r in self.reports)

    def add(self, weights: dict[str, QuantizedWeight], reports: list[LayerReport]) -> None:
        self.weights.update(weights)
        self.reports.extend(reports)


LayerCallback = Callable[[int, int, list[LayerReport]], None]


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calib: Calibration,
    config: QuantConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    state_dir: Path | None = None,
    run_id: str = "",
    progress: bool = True,
    on_layer: LayerCallback | None = None,
    lm_head: bool = False,
    vision: bool = False,
) -> ModelQuantization:
    """Quantize every decoder-layer linear of `model` in place (weights become their dequantized
    grid values) and return the codes. `calib` is [nsamples, seqlen] token ids, or a list of
    model-input batches (vision-language models, see `quantizer.vlm_calibration`); how it flows
    through the model is `config.calibration`.

    With `state_dir`, finished layers are stored there and a rerun with the same model, config
    and calibration tokens resumes after the last finished layer.

    `lm_head`: also quantize the output projection (see `quantize_lm_head`).
    `vision`: also quantize the vision encoder's blocks (the adapter's `vision`), before the
    language tower; projectors stay in full precision either way. With ``grid.embeddings="int8"``
    the token embedding table (and a head tied to it) is quantized first, in place, so every linear
    is calibrated on the embeddings it will be served with.
    """
    cfg = config or RPIQConfig()
    _check_calibration(calib)
    device = torch.device(device)
    adapter = get_adapter(model)
    towers = [adapter]
    if vision:
        if adapter.vision is None:
            raise UnsupportedModelError(f"the {adapter.name} adapter has no quantizable vision tower")
        towers.insert(0, adapter.vision)
    model.eval()
    fp = None
    if state_dir is not None:
        fp = fingerprint(
            run_id=run_id, config=cfg.model_dump(), compensate=cfg.compensate, calib=_digest(calib), vision=vision
        )
    t0 = time.perf_counter()
    job = _Job(model, calib, cfg, device, progress, on_layer)
    if cfg.grid.embeddings == "int8":
        job.result.embeddings = quantize_embeddings(model, bits=8)
    for tower in towers:
        state = None
        if state_dir is not None and fp is not None:
            state = RunState(state_dir if tower is adapter else state_dir / "vision", fp)
        job.quantize_tower(tower, state)
    if lm_head:
        name, qw, report = quantize_lm_head(model, calib, cfg, device)
        job.result.add({name: qw}, [report])
    job.result.seconds = time.perf_counter() - t0
    return job.result


@dataclass
class _Job:
    """What every tower of one `quantize_model` call shares, and the result they add to."""

    model: nn.Module
    calib: Calibration
    cfg: QuantConfig
    device: torch.device
    progress: bool
    on_layer: LayerCallback | None
    result: ModelQuantization = field(default_factory=ModelQuantization)

    def quantize_tower(self, adapter: ModelAdapter, state: RunState | None) -> None:
        """Quantize the blocks `adapter` describes (a language tower or a vision encoder)."""
        done = state.done_layers() if state is not None else {}
        for _, (weights, reports) in sorted(done.items()):
            self.result.add(weights, reports)

        mode = self.cfg.calibration.mode
        total = len(adapter.layers(self.model))
        label = f"quantize {adapter.name} ({mode})" if ":" in adapter.name else f"quantize ({mode})"
        bar = tqdm(
            total=total, initial=len(done), desc=label, unit="layer", disable=not self.progress, dynamic_ncols=True
        )

        def finish_layer(index: int, weights: dict[str, QuantizedWeight], reports: list[LayerReport]) -> None:
            self.result.add(weights, reports)
            release_freed_memory()
            if state is not None:
                state.save_layer(index, weights, reports)
            if self.on_layer:
                self.on_layer(index, total, reports)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(r.loss_final for r in reports):.4g}")

        run = TowerRun(self.model, adapter, self.calib, self.cfg, self.device, done, finish_layer, self.progress, state)
        try:
            (run_sequential if mode == "sequential" else run_single_instance)(run)
        finally:
            bar.close()


def _check_calibration(calib: Calibration) -> None:
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2 or calib.numel() == 0:
            raise ValueError(
                f"calibration tokens must be a non-empty [nsamples, seqlen] tensor, got {tuple(calib.shape)}"
            )
    elif not calib or not all(isinstance(b, Mapping) for b in calib):
        raise ValueError("calibration must be a token tensor or a non-empty list of model-input mappings")


def _digest(calib: Calibration) -> torch.Tensor | str:
    """What the resume fingerprint hashes: the token tensor itself, or every tensor of every batch."""
    if isinstance(calib, torch.Tensor):
        return calib
    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, list | tuple):
            for v in value:
                feed(v)
        else:
            h.update(repr(value).encode())

    for batch in calib:
        for key in sorted(batch):
            h.update(key.encode())
            feed(batch[key])
    return h.hexdigest()
