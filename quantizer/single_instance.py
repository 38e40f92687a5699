"""Single-instance calibration (RPIQ): one streaming pass for the Hessians, one kept batch for stage 2.

Pass 1 streams the calibration windows through the full-precision model with only one batch
resident and accumulates every linear's Hessian (`stream_hessians`). With
`CalibrationConfig.offload_hessians` the Hessians and the decoder layers live in host memory
(`quantizer.offload`); with `hessian_budget_mib` the Hessians go to disk, one run of layers per
pass (`quantizer.hessian_store`).

Pass 2 runs the kept windows (`instance_windows`), one at a time, through the full-precision
and the partly quantized model, layer by layer: each linear is quantized on its pass-1 Hessian,
and its kept batch (the degraded inputs `Xq` and the full-precision outputs `Y`) drives stage 2
(`refine.InstanceResidual`), and with compensation stage 1 too (`layer.instance_target`).
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from models.memory import release_freed_memory

from .adapters import ModelAdapter
from .capture import GroupHessians, GroupInputCatcher, StopForward, capture_first_layer_inputs, forward_batch, run_layer
from .hessian_store import HessianStore, hessian_bytes, plan_passes
from .layer import Instance
from .offload import layers_visit
from .tower import Calibration, LayerResult, TowerRun, batches


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
        for batch in tqdm(batches(calib), desc="hessians (single pass)", disable=not progress, dynamic_ncols=True):
            with contextlib.suppress(StopForward):
                forward_batch(model, batch, device)
    finally:
        stopper.remove()
        for catchers in per_layer:
            for c in catchers:
                c.remove()
    return per_layer


def run_single_instance(run: TowerRun) -> None:
    """Quantize every decoder layer of `run`'s tower: pass 1 (Hessians), then pass 2 (kept batch)."""
    with contextlib.ExitStack() as scratch:
        store = None
        if run.config.calibration.hessian_budget_mib is not None:
            # Under the resume state, an interrupted run keeps the passes it finished.
            if run.state is not None:
                store = HessianStore(run.state.dir / "hessians")
            else:
                store = HessianStore(Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="rpiq-hessians-"))))
        run.preamble_to_device()
        todo = [i for i in range(len(run.layers)) if i not in run.done]
        if run.config.calibration.offload_hessians:  # the GPU holds one decoder layer at a time
            with layers_visit(run.layers, run.device):
                by_layer = _hessians_pass(run, todo, store)
        else:
            for layer in run.layers:
                layer.to(run.device)
            by_layer = _hessians_pass(run, todo, store)
        release_freed_memory()
        _kept_batch_pass(run, by_layer, store)


def _hessians_pass(run: TowerRun, todo: list[int], store: HessianStore | None) -> dict[int, list[GroupHessians]]:
    """Pass 1: every not-yet-quantized layer's Hessians from streaming the full-precision model.

    Without a store: one pass, all Hessians returned in memory. With one: one pass per run of
    layers that fits the budget, each run written to the store (layers already there are skipped).
    """
    cal = run.config.calibration
    hessian_device = "cpu" if cal.offload_hessians else None

    def stream(indices: list[int]) -> list[list[GroupInputCatcher]]:
        return stream_hessians(run.model, run.adapter, run.calib, indices, run.device, run.progress, hessian_device)

    if store is None:
        return dict(zip(todo, stream(todo), strict=True)) if todo else {}
    missing = {i: hessian_bytes(run.layers[i], run.adapter.linear_groups) for i in todo if not store.has(i)}
    budget = int(cal.hessian_budget_mib * 2**20)
    passes = plan_passes(missing, budget)
    over = [i for i, size in missing.items() if size > budget]
    if over:
        warnings.warn(
            f"layer {over[0]}'s Hessians need up to {missing[over[0]] / 2**20:.0f} MiB, over the "
            f"{cal.hessian_budget_mib:g} MiB budget; each such layer gets a pass of its own",
            stacklevel=2,
        )
    for n, layer_run in enumerate(passes, 1):
        if run.progress and len(passes) > 1:
            tqdm.write(f"hessian pass {n}/{len(passes)}: layers {layer_run[0]}..{layer_run[-1]}")
        for index, groups in zip(layer_run, stream(layer_run), strict=True):
            store.save(index, groups)
    return {}


def _kept_batch_pass(run: TowerRun, by_layer: dict[int, list[GroupHessians]], store: HessianStore | None) -> None:
    """Pass 2: the kept windows, one at a time, through the full-precision and the partly quantized
    streams (one forward's activations at a time, not the whole kept batch's)."""
    layers = run.layers
    kept = batches(run.calib[-run.config.calibration.instance_windows :])
    fp_in = capture_first_layer_inputs(run.model, layers, kept, run.device)
    fp_hidden, fp_in.hidden = fp_in.hidden, []
    q_hidden = [h.clone() for h in fp_hidden]
    for index, layer in enumerate(layers):
        with run.on_device(layer):
            calls = [fp_in.call(b, index) for b in range(len(fp_hidden))]
            # Full-precision inputs of every linear, and the layer's full-precision output.
            fp_catch = GroupInputCatcher({n: layer.get_submodule(n) for n in run.adapter.linear_names()}, stop=False)
            fp_out, per_window = [], []
            try:
                for h, (args, kwargs) in zip(fp_hidden, calls, strict=True):
                    fp_out.append(run_layer(layer, h, kwargs, args))
                    per_window.append(dict(fp_catch.inputs))
            finally:
                fp_catch.remove()
            fp_hidden = None  # replaced by fp_out below; dropping it now keeps one full-precision stream
            fp_rows = _rows_by_input(per_window)
            if index in run.done:
                run.apply_done(index, layer)
            else:
                if store is not None:
                    groups = run.adapter.linear_groups
                    by_layer[index] = [GroupHessians({n: layer.get_submodule(n) for n in g}) for g in groups]
                    store.load(index, by_layer[index])
                run.finish_layer(index, *_quantize_layer(run, index, layer, by_layer[index], fp_rows, q_hidden, calls))
            by_layer.pop(index, None)  # this layer's Hessians are no longer needed
            if store is not None:
                store.drop(index)
            del fp_rows
            for b, (args, kwargs) in enumerate(calls):
                q_hidden[b] = run_layer(layer, q_hidden[b], kwargs, args)
            fp_hidden = fp_out


def _quantize_layer(
    run: TowerRun,
    index: int,
    layer: nn.Module,
    hessians: list[GroupHessians],
    fp_rows: dict[str, torch.Tensor],
    q_hidden: list[torch.Tensor],
    calls: list,
) -> LayerResult:
    """Each linear group on its pass-1 Hessians, with the kept batch through the partly quantized layer."""
    weights, reports = {}, []
    for group, catcher in zip(run.adapter.linear_groups, hessians, strict=True):
        q_catch = GroupInputCatcher({n: layer.get_submodule(n) for n in group})
        try:
            xq = [dict(q_catch.run(layer, h, kw, args)) for h, (args, kw) in zip(q_hidden, calls, strict=True)]
        finally:
            q_catch.remove()
        instance = _InstanceRows(catcher.modules, fp_rows, _rows_by_input(xq), run.config.compensate)
        w, r = run.quantize_group(index, layer, catcher, instances=instance)
        del instance
        for name in group:  # this group's full-precision inputs are no longer needed
            fp_rows.pop(name, None)
        release_freed_memory()
        weights.update(w)
        reports.extend(r)
    return weights, reports


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
