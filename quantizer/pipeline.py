"""Whole-model quantization: every decoder layer's linears, in both calibration modes.

- `sequential` (GPTQ-classic): all calibration windows' hidden states for the current decoder
  layer are resident; each linear group is calibrated on the outputs of the already-quantized
  groups and layers before it, then the windows are pushed through the quantized layer.
- `single-instance` (RPIQ): one streaming pass over the calibration windows accumulates every
  linear's Hessian with only one batch resident; then the kept last batch runs through the
  partly quantized model, layer by layer, next to a full-precision copy of its stream, and
  drives stage 2 with the single-instance residual.

Calibration is token windows (a [nsamples, seqlen] tensor) or, for vision-language models, a
list of model-input batches (image + question + answer, `quantizer.vlm_calibration`), so that
every weight's Hessian comes from the tokens the full model really routes to it. With `vision`,
the vision encoder's blocks are quantized first (on image batches), then the language tower is
calibrated on what the quantized encoder produces.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from gptq_format import QuantizedWeight
from quantizer.adapters import ModelAdapter, UnsupportedModelError, get_adapter

from .capture import (
    Batch,
    GroupHessians,
    GroupInputCatcher,
    LayerInputs,
    StopForward,
    capture_first_layer_inputs,
    forward_batch,
    run_layer,
)
from .config import QuantConfig
from .hessian import HessianAccumulator
from .hessian_store import HessianStore, hessian_bytes, plan_passes
from .layer import Instance, quantize_weight
from .memory import release_freed_memory
from .offload import layers_visit
from .result import LayerReport
from .resume import RunState, fingerprint

CalibMode = Literal["sequential", "single-instance"]


class CalibrationConfig(BaseModel):
    """How the calibration data flows through the model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: CalibMode = "sequential"
    instance_windows: int = Field(
        4,
        ge=1,
        description="single-instance: calibration windows kept as the resident batch that drives stage 2 "
        "(measured on the embedded model: 1 window overfits, 4 help; README)",
    )
    compensate: bool | None = Field(
        None,
        description="fit every linear to the full-precision model's outputs (full-precision inputs, "
        "full-precision weights) instead of its own weights on the already-degraded inputs, so each layer "
        "compensates what the layers before it got wrong. sequential: on the whole calibration set "
        "(`quantizer.layer.compensation_target`), at the cost of a second resident stream of hidden states "
        "and one extra partial forward per group. single-instance: stage 1 too fits the kept batch's blended "
        "objective (`quantizer.layer.instance_target`), at no memory cost (stage 2 always does). "
        "None = on for RPIQ (its closed loop across layers), off for GPTQ (GPTQ-classic)",
    )

    offload_hessians: bool = Field(
        False,
        description="single-instance: keep every linear's running Hessian, and every decoder layer outside "
        "its own forward, in host memory. Each batch's X^T X is still formed on the device and only that "
        "[in, in] product is copied; each layer's weights are copied in for its forward (once per window "
        "in pass 1), so the device holds the embeddings, one layer and one batch",
    )

    hessian_budget_mib: float | None = Field(
        None,
        gt=0,
        description="single-instance: the most Hessian memory (MiB) held at once. Pass 1 then streams the "
        "calibration windows once per run of consecutive layers whose Hessians fit, stores each run's Hessians "
        "on disk (the resume state directory, else a temporary one), and pass 2 reads one layer's at a time. "
        "Still one batch resident; costs one partial forward per extra pass. None = every layer's Hessians in "
        "memory from a single pass",
    )

    @model_validator(mode="after")
    def _options_fit_the_mode(self) -> CalibrationConfig:
        for option in ("offload_hessians", "hessian_budget_mib"):
            if getattr(self, option) not in (None, False) and self.mode != "single-instance":
                raise ValueError(
                    f"{option} applies to single-instance calibration, the mode that holds every "
                    "layer's Hessians at once; sequential holds one layer's"
                )
        return self

    def for_method(self, method: str) -> CalibrationConfig:
        """This config with `compensate` decided: the default is on for RPIQ, off for GPTQ."""
        if self.compensate is not None:
            return self
        return self.model_copy(update={"compensate": method == "rpiq"})


@dataclass
class ModelQuantization:
    """The outcome: quantized weights by module name and one report per linear."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    reports: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_loss(self) -> float:
        return sum(r.loss_final for r in self.reports)


LayerCallback = Callable[[int, int, list[LayerReport]], None]
Calibration = torch.Tensor | Sequence[Mapping[str, Any]]
"""Token windows [nsamples, seqlen], or model-input batches (vision-language calibration)."""


def _check_calibration(calib: Calibration) -> None:
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2 or calib.numel() == 0:
            raise ValueError(
                f"calibration tokens must be a non-empty [nsamples, seqlen] tensor, got {tuple(calib.shape)}"
            )
    elif not calib or not all(isinstance(b, Mapping) for b in calib):
        raise ValueError("calibration must be a token tensor or a non-empty list of model-input mappings")


def _batches(calib: Calibration) -> list[Batch]:
    """One forward per window (text) or per multimodal sample."""
    return list(calib.split(1)) if isinstance(calib, torch.Tensor) else list(calib)


def _kept(calib: Calibration, windows: int) -> list[Batch]:
    """single-instance: the kept windows (or multimodal samples), one forward each."""
    return _batches(calib[-windows:])


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


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calib: Calibration,
    config: QuantConfig | None = None,
    calibration: CalibrationConfig | None = None,
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
    model-input batches (vision-language models, see `quantizer.vlm_calibration`).

    With `state_dir`, finished layers are stored there and a rerun with the same model, config
    and calibration tokens resumes after the last finished layer.

    `lm_head`: also quantize the output projection (see `quantize_lm_head`).
    `vision`: also quantize the vision encoder's blocks (the adapter's `vision`), before the
    language tower; projectors and embeddings stay in full precision either way.
    """
    cfg = config or QuantConfig()
    cal = calibration or CalibrationConfig()
    cal = cal.for_method(cfg.method)
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
            run_id=run_id, config=cfg.model_dump(), calibration=cal.model_dump(), calib=_digest(calib), vision=vision
        )
    t0 = time.perf_counter()
    result = ModelQuantization()
    for tower in towers:
        state = None
        if state_dir is not None and fp is not None:
            state = RunState(state_dir if tower is adapter else state_dir / "vision", fp)
        _quantize_tower(model, tower, calib, cfg, cal, device, state, result, progress, on_layer)
    if lm_head:
        name, qw, report = quantize_lm_head(model, calib, cfg, device)
        result.weights[name] = qw
        result.reports.append(report)
    result.seconds = time.perf_counter() - t0
    return result


def _quantize_tower(
    model: nn.Module,
    adapter: ModelAdapter,
    calib: Calibration,
    cfg: QuantConfig,
    cal: CalibrationConfig,
    device: torch.device,
    state: RunState | None,
    result: ModelQuantization,
    progress: bool,
    on_layer: LayerCallback | None,
) -> None:
    """Quantize the blocks `adapter` describes (a language tower or a vision encoder)."""
    done = state.done_layers() if state is not None else {}
    runner = _sequential if cal.mode == "sequential" else _single_instance
    for _, (weights, reports) in sorted(done.items()):
        result.weights.update(weights)
        result.reports.extend(reports)

    total = len(adapter.layers(model))
    label = f"quantize {adapter.name} ({cal.mode})" if ":" in adapter.name else f"quantize ({cal.mode})"
    bar = tqdm(total=total, initial=len(done), desc=label, unit="layer", disable=not progress, dynamic_ncols=True)

    def finish_layer(index: int, weights: dict[str, QuantizedWeight], reports: list[LayerReport]) -> None:
        result.weights.update(weights)
        result.reports.extend(reports)
        release_freed_memory()
        if state is not None:
            state.save_layer(index, weights, reports)
        if on_layer:
            on_layer(index, total, reports)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(r.loss_final for r in reports):.4g}")

    try:
        runner(model, adapter, calib, cfg, cal, device, done, finish_layer, progress, state)
    finally:
        bar.close()


def quantize_lm_head(
    model: nn.Module, calib: Calibration, cfg: QuantConfig, device: torch.device
) -> tuple[str, QuantizedWeight, LayerReport]:
    """Quantize the output projection on the inputs the (already quantized) model gives it.

    For a small model with a large vocabulary the LM head is the largest single weight and the
    biggest read per decoded token. Its Hessian comes from one more pass of the calibration
    windows through the whole model (on `device`, so the model must fit there once), stopped
    at the head. A head tied to the input embeddings is untied first: the embeddings stay in
    full precision and the config records ``tie_word_embeddings=False``, so loaders keep both.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the model's output embeddings are a {type(head).__name__}, not a Linear")
    name = next(n for n, m in model.named_modules() if m is head)
    embed = model.get_input_embeddings()
    if embed is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        for cfg_obj in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg_obj.tie_word_embeddings = False
    acc: HessianAccumulator | None = None

    def hook(module: nn.Module, args: tuple) -> None:
        nonlocal acc
        x = args[0]
        acc = acc or HessianAccumulator(x.shape[-1], device=x.device)
        acc.add(x)
        raise StopForward

    home = next(model.parameters()).device
    model.to(device)
    handle = head.register_forward_pre_hook(hook)
    try:
        for batch in _batches(calib):
            with contextlib.suppress(StopForward):
                forward_batch(model, batch, device)
    finally:
        handle.remove()
        model.to(home)
    assert acc is not None
    qw, report = quantize_weight(head.weight.detach().to(device), acc.H, cfg, name=name)
    _set_weight(head, qw)
    return name, qw, report


def _set_weight(module: nn.Linear, qw: QuantizedWeight) -> None:
    module.weight.data.copy_(qw.dequantize().to(module.weight.dtype))


def _apply_done(layer: nn.Module, prefix: str, weights: dict[str, QuantizedWeight]) -> None:
    for name, qw in weights.items():
        _set_weight(layer.get_submodule(name[len(prefix) + 1 :]), qw)


def _layer_prefix(adapter: ModelAdapter, index: int) -> str:
    return f"{adapter.layers_path}.{index}"


def _preamble_to(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move everything but the decoder layers to `device`; layers go there one at a time."""
    if device.type == "cpu":
        return
    keep = {id(p) for p in layers.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.data = p.data.to(device)
    for b in model.buffers():
        b.data = b.data.to(device)


def _check_tokens(adapter: ModelAdapter, prefix: str, catcher: GroupHessians) -> None:
    """Refuse a linear that no calibration token reached: its zero Hessian would zero its weights."""
    for name in catcher.modules:
        if catcher.tokens(name) == 0:
            routed = adapter.routing.get(name)
            hint = (
                f" (it only receives tokens of type {routed}; calibrate with data that contains them, "
                "e.g. --calib-data images for image tokens)"
                if routed is not None
                else ""
            )
            raise ValueError(f"{prefix}.{name} received no calibration tokens{hint}")


def _quantize_group(
    layer: nn.Module,
    prefix: str,
    catcher: GroupHessians,
    cfg: QuantConfig,
    instances: _InstanceRows | None,
    adapter: ModelAdapter,
    cross: GroupInputCatcher | None = None,
) -> tuple[dict[str, QuantizedWeight], list[LayerReport]]:
    _check_tokens(adapter, prefix, catcher)
    weights, reports = {}, []
    for name, module in catcher.modules.items():
        inst = instances.get(name) if instances else None
        c = cross.hessian(name) if cross is not None else None
        qw, rep = quantize_weight(
            module.weight, catcher.hessian(name), cfg, instance=inst, cross=c, name=f"{prefix}.{name}"
        )
        _set_weight(module, qw)
        weights[f"{prefix}.{name}"] = qw
        reports.append(rep)
    return weights, reports


def _sequential(model, adapter, calib, cfg, cal, device, done, finish_layer, progress, state) -> None:
    layers = adapter.layers(model)
    _preamble_to(model, layers, device)
    inputs: LayerInputs = capture_first_layer_inputs(model, layers, _batches(calib), device)
    # With `compensate`, the full-precision model's hidden states travel alongside.
    fp_hidden = list(inputs.hidden) if cal.compensate else None
    for index, layer in enumerate(layers):
        layer.to(device)
        prefix = _layer_prefix(adapter, index)
        fp_layer = copy.deepcopy(layer) if fp_hidden is not None else None
        if index in done:
            _apply_done(layer, prefix, done[index][0])
        else:
            layer_weights: dict[str, QuantizedWeight] = {}
            layer_reports: list[LayerReport] = []
            for group in adapter.linear_groups:
                catcher = GroupInputCatcher({n: layer.get_submodule(n) for n in group})
                # `cross` pairs the full-precision layer's inputs with `catcher`'s: 2/N X^T Xq.
                cross = None
                if fp_layer is not None:
                    cross = GroupInputCatcher({n: fp_layer.get_submodule(n) for n in group})
                try:
                    for b, hidden in enumerate(inputs.hidden):
                        args, kwargs = inputs.call(b, index)
                        xq = catcher.run(layer, hidden, kwargs, args)
                        catcher.accumulate(xq)
                        if cross is not None:
                            cross.accumulate(cross.run(fp_layer, fp_hidden[b], kwargs, args), paired=xq)
                finally:
                    catcher.remove()
                    if cross is not None:
                        cross.remove()
                w, r = _quantize_group(layer, prefix, catcher, cfg, None, adapter, cross)
                layer_weights.update(w)
                layer_reports.extend(r)
            finish_layer(index, layer_weights, layer_reports)
        # Each window's hidden state is replaced as soon as its successor exists, so a stream
        # never holds two full sets of them at once.
        for b in range(len(inputs.hidden)):
            args, kwargs = inputs.call(b, index)
            if fp_hidden is not None:
                fp_hidden[b] = run_layer(fp_layer, fp_hidden[b], kwargs, args)
            inputs.hidden[b] = run_layer(layer, inputs.hidden[b], kwargs, args)
        del fp_layer
        if device.type != "cpu":
            layer.to("cpu")


def stream_hessians(
    model: nn.Module,
    adapter: ModelAdapter,
    calib: Calibration,
    layer_indices: range | list[int],
    device: torch.device,
    progress: bool = False,
    hessian_device: torch.device | str | None = None,
) -> list[list[GroupInputCatcher]]:
    """Hessians of the chosen layers' linear groups from one streaming pass of the model as it is.

    Only one calibration window is resident at a time; returns, per chosen layer, one catcher
    per linear group (`catcher.hessian(name)`), with its hooks already removed. The Hessians live
    on `hessian_device` (default: where the model runs).
    """
    layers = adapter.layers(model)
    per_layer = [
        [
            GroupInputCatcher(
                {n: layers[i].get_submodule(n) for n in group},
                stop=False,
                streaming=True,
                hessian_device=hessian_device,
            )
            for group in adapter.linear_groups
        ]
        for i in layer_indices
    ]

    # Nothing after the last chosen layer is needed (not even the LM head): stop there.
    def stop(module: nn.Module, args: tuple, output: object) -> None:
        raise StopForward

    stopper = layers[max(layer_indices)].register_forward_hook(stop)
    try:
        for batch in tqdm(_batches(calib), desc="hessians (single pass)", disable=not progress, dynamic_ncols=True):
            with contextlib.suppress(StopForward):
                forward_batch(model, batch, device)
    finally:
        stopper.remove()
        for catchers in per_layer:
            for c in catchers:
                c.remove()
    return per_layer


def _single_instance(model, adapter, calib, cfg, cal, device, done, finish_layer, progress, state) -> None:
    with contextlib.ExitStack() as scratch:
        store = None
        if cal.hessian_budget_mib is not None:
            # Under the resume state, an interrupted run keeps the passes it finished.
            if state is not None:
                store = HessianStore(state.dir / "hessians")
            else:
                store = HessianStore(Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="rpiq-hessians-"))))
        _single_instance_passes(model, adapter, calib, cfg, cal, device, done, finish_layer, progress, store)


def _hessians_pass(
    model: nn.Module,
    adapter: ModelAdapter,
    calib: Calibration,
    cal: CalibrationConfig,
    device: torch.device,
    todo: list[int],
    store: HessianStore | None,
    progress: bool,
) -> dict[int, list[GroupHessians]]:
    """Pass 1: every not-yet-quantized layer's Hessians from streaming the full-precision model.

    Without a store: one pass, all Hessians returned in memory. With one: one pass per run of
    layers that fits the budget, each run written to the store (layers already there are skipped).
    """
    hessian_device = "cpu" if cal.offload_hessians else None
    if store is None:
        if not todo:
            return {}
        return dict(
            zip(todo, stream_hessians(model, adapter, calib, todo, device, progress, hessian_device), strict=True)
        )
    layers = adapter.layers(model)
    missing = {i: hessian_bytes(layers[i], adapter.linear_groups) for i in todo if not store.has(i)}
    budget = int(cal.hessian_budget_mib * 2**20)
    passes = plan_passes(missing, budget)
    over = [i for i, size in missing.items() if size > budget]
    if over:
        warnings.warn(
            f"layer {over[0]}'s Hessians need up to {missing[over[0]] / 2**20:.0f} MiB, over the "
            f"{cal.hessian_budget_mib:g} MiB budget; each such layer gets a pass of its own",
            stacklevel=2,
        )
    for n, run in enumerate(passes, 1):
        if progress and len(passes) > 1:
            tqdm.write(f"hessian pass {n}/{len(passes)}: layers {run[0]}..{run[-1]}")
        for index, groups in zip(
            run, stream_hessians(model, adapter, calib, run, device, progress, hessian_device), strict=True
        ):
            store.save(index, groups)
    return {}


def _single_instance_passes(model, adapter, calib, cfg, cal, device, done, finish_layer, progress, store) -> None:
    layers = adapter.layers(model)
    _preamble_to(model, layers, device)
    todo = [i for i in range(len(layers)) if i not in done]
    if cal.offload_hessians:  # the GPU holds one decoder layer at a time, as in sequential
        with layers_visit(layers, device):
            by_layer = _hessians_pass(model, adapter, calib, cal, device, todo, store, progress)
    else:
        for layer in layers:
            layer.to(device)
        by_layer = _hessians_pass(model, adapter, calib, cal, device, todo, store, progress)
    release_freed_memory()

    # Pass 2: the kept windows, one at a time, through the full-precision and the partly
    # quantized streams (one forward's activations at a time, not the whole kept batch's).
    fp_in = capture_first_layer_inputs(model, layers, _kept(calib, cal.instance_windows), device)
    fp_hidden, fp_in.hidden = fp_in.hidden, []
    q_hidden = [h.clone() for h in fp_hidden]
    for index, layer in enumerate(layers):
        layer.to(device)
        calls = [fp_in.call(b, index) for b in range(len(fp_hidden))]
        prefix = _layer_prefix(adapter, index)
        # Full-precision inputs of every linear, and the layer's full-precision output.
        all_linears = {n: layer.get_submodule(n) for n in adapter.linear_names()}
        fp_catch = GroupInputCatcher(all_linears, stop=False)
        fp_out, per_window = [], []
        try:
            for h, (args, kwargs) in zip(fp_hidden, calls, strict=True):
                fp_out.append(run_layer(layer, h, kwargs, args))
                per_window.append(dict(fp_catch.inputs))
        finally:
            fp_catch.remove()
        fp_hidden = None  # replaced by fp_out below; dropping it now keeps one full-precision stream
        fp_rows = _rows_by_input(per_window)
        if index in done:
            _apply_done(layer, prefix, done[index][0])
        else:
            layer_weights, layer_reports = {}, []
            if store is not None:
                by_layer[index] = [GroupHessians({n: layer.get_submodule(n) for n in g}) for g in adapter.linear_groups]
                store.load(index, by_layer[index])
            for group, catcher in zip(adapter.linear_groups, by_layer[index], strict=True):
                q_catch = GroupInputCatcher({n: layer.get_submodule(n) for n in group})
                try:
                    xq = [dict(q_catch.run(layer, h, kw, args)) for h, (args, kw) in zip(q_hidden, calls, strict=True)]
                finally:
                    q_catch.remove()
                instance = _InstanceRows(catcher.modules, fp_rows, _rows_by_input(xq), bool(cal.compensate))
                w, r = _quantize_group(layer, prefix, catcher, cfg, instance, adapter)
                del instance
                for name in group:  # this group's full-precision inputs are no longer needed
                    fp_rows.pop(name, None)
                release_freed_memory()
                layer_weights.update(w)
                layer_reports.extend(r)
            finish_layer(index, layer_weights, layer_reports)
        by_layer.pop(index, None)  # this layer's Hessians are no longer needed
        if store is not None:
            store.drop(index)
        del fp_rows
        for b, (args, kwargs) in enumerate(calls):
            q_hidden[b] = run_layer(layer, q_hidden[b], kwargs, args)
        fp_hidden = fp_out
        if device.type != "cpu":
            layer.to("cpu")


def _rows_by_input(per_window: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each linear's inputs over all kept windows as one [rows, in] float matrix, consuming `per_window`.

    Linears fed the very same tensor (q/k/v, gate/up) get the very same matrix, and each
    window's pieces are dropped as soon as their concatenation exists, so the rows are held once.
    """
    rows: dict[str, torch.Tensor] = {}
    for name in list(per_window[0]) if per_window else []:
        if name in rows:
            continue
        first = per_window[0][name]
        sharing = [n for n in per_window[0] if per_window[0][n] is first]
        pieces = [window[name].reshape(-1, first.shape[-1]).float() for window in per_window]
        for window in per_window:
            for n in sharing:
                window.pop(n)
        merged = torch.cat(pieces)
        del pieces
        for n in sharing:
            rows[n] = merged
    per_window.clear()
    return rows


class _InstanceRows:
    """The kept windows' rows for each member of a linear group, and `Y` built when a member is quantized.

    A member's full-precision output `Y` exists only while that member is quantized, so a group
    never holds more than one `Y` besides its shared inputs.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Linear],
        fp_rows: dict[str, torch.Tensor],
        xq_rows: dict[str, torch.Tensor],
        compensate: bool,
    ):
        self._modules, self._fp, self._xq, self._compensate = modules, fp_rows, xq_rows, compensate

    def get(self, name: str) -> Instance:
        Y = self._fp[name] @ self._modules[name].weight.float().t()
        return Instance(Xq=self._xq[name], Y=Y, compensate=self._compensate)
