"""Sequential calibration (GPTQ-classic): every calibration window resident, one layer at a time.

All calibration windows' hidden states for the current decoder layer are resident; each linear
group is calibrated on the outputs of the already-quantized groups and layers before it, then
the windows are pushed through the quantized layer. With compensation
(`CalibrationConfig.compensate`) the full-precision model's hidden states travel alongside, and
each group is fitted to the full-precision outputs (`quantizer.layer.compensation_target`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gptq_format import QuantizedWeight

from .capture import GroupInputCatcher, LayerInputs, capture_first_layer_inputs, run_layer
from .result import LayerReport
from .tower import TowerRun, batches


def run_sequential(run: TowerRun) -> None:
    """Quantize every decoder layer of `run`'s tower, first to last."""
    layers = run.layers
    run.preamble_to_device()
    inputs = capture_first_layer_inputs(run.model, layers, batches(run.calib), run.device)
    fp_hidden = list(inputs.hidden) if run.config.compensate else None
    for index, layer in enumerate(layers):
        with run.on_device(layer):
            fp_layer = copy.deepcopy(layer) if fp_hidden is not None else None
            if index in run.done:
                run.apply_done(index, layer)
            else:
                run.finish_layer(index, *_quantize_layer(run, index, layer, inputs, fp_layer, fp_hidden))
            # Each window's hidden state is replaced as soon as its successor exists, so a stream
            # never holds two full sets of them at once.
            for b in range(len(inputs.hidden)):
                args, kwargs = inputs.call(b, index)
                if fp_hidden is not None:
                    fp_hidden[b] = run_layer(fp_layer, fp_hidden[b], kwargs, args)
                inputs.hidden[b] = run_layer(layer, inputs.hidden[b], kwargs, args)
            del fp_layer


def _quantize_layer(
    run: TowerRun,
    index: int,
    layer: nn.Module,
    inputs: LayerInputs,
    fp_layer: nn.Module | None,
    fp_hidden: list[torch.Tensor] | None,
) -> tuple[dict[str, QuantizedWeight], list[LayerReport]]:
    """Each linear group in turn, on the inputs the groups quantized before it produce."""
    weights: dict[str, QuantizedWeight] = {}
    reports: list[LayerReport] = []
    for group in run.adapter.linear_groups:
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
        w, r = run.quantize_group(index, layer, catcher, cross=cross)
        weights.update(w)
        reports.extend(r)
    return weights, reports
