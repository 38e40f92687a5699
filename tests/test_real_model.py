"""The quantizer on the real embedded model (SmolLM2-135M-Instruct, shipped inside a PyPI wheel)."""

from __future__ import annotations

import pytest
import torch

from models.loading import load_fp_model
from quantizer.adapters import get_adapter
from quantizer.config import CalibrationConfig, GridConfig, RefineConfig, quant_config
from quantizer.data import calibration_windows, evaluation_windows, load_text
from quantizer.evaluate import perplexity
from quantizer.layer import layer_loss, quantize_weight
from quantizer.pipeline import quantize_model
from quantizer.single_instance import stream_hessians

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(default_model_dir):
    model, tok, _ = load_fp_model(str(default_model_dir))
    calib = calibration_windows(tok, load_text("calib"), 4, 256, seed=0)
    heldout = evaluation_windows(tok, load_text("heldout"), 256, max_windows=4)
    return model, tok, calib, heldout


def test_real_layers_rpiq_below_gptq_below_rtn_on_calibration_and_heldout_text(real):
    model, tok, _, _ = real
    adapter = get_adapter(model)
    # Stage 2 fits the calibration Hessian harder than GPTQ: with fewer tokens than ~4x a layer's
    # inputs it overfits (measured: with 4 x 256 tokens RPIQ's held-out loss is above GPTQ's).
    calib = calibration_windows(tok, load_text("calib"), 16, 512, seed=0)
    held_calib = calibration_windows(tok, load_text("heldout"), 8, 512, seed=1)
    layers = [2, 20]
    hs = stream_hessians(model, adapter, calib, layers, torch.device("cpu"))
    hs_held = stream_hessians(model, adapter, held_calib, layers, torch.device("cpu"))
    totals = {m: [0.0, 0.0] for m in ("rtn", "gptq", "rpiq")}
    for catchers, held in zip(hs, hs_held, strict=True):
        for c, ch in zip(catchers, held, strict=True):
            for name, module in c.modules.items():
                W = module.weight.detach()
                for method in totals:
                    # stage 2 on the layer loss itself: its ridge (on by default) trades layer loss away
                    cfg = quant_config(method, grid=GridConfig(bits=3), refine=RefineConfig(percdamp=0.0))
                    qw, rep = quantize_weight(W, c.hessian(name), cfg)
                    totals[method][0] += rep.loss_final
                    totals[method][1] += layer_loss(W, qw.dequantize(), ch.hessian(name))
    for i in (0, 1):  # calibration text, then unseen text
        assert totals["rpiq"][i] < totals["gptq"][i] < 0.5 * totals["rtn"][i], totals
    # Part of the calibration gain carries over to unseen text (measured here: 14 % on the calibration
    # text, 7 % held out; with 32 x 512 tokens 39 % and 28 %, see benchmarks/layer_loss.py).
    assert totals["rpiq"][1] < 0.97 * totals["gptq"][1], totals


def test_whole_model_perplexity_ordering_fp_gptq_rtn(real):
    model, _, calib, heldout = real
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        ppl_fp = perplexity(model, heldout)
        cfg = quant_config("rtn", grid=GridConfig(bits=3))
        quantize_model(model, calib, cfg, progress=False)
        ppl_rtn = perplexity(model, heldout)
        model.load_state_dict(state)
        quantize_model(model, calib, quant_config("gptq", grid=cfg.grid), progress=False)
        ppl_gptq = perplexity(model, heldout)
    finally:
        model.load_state_dict(state)
    assert 20 < ppl_fp < 50  # a real language model on Austen (measured 37.4 on these windows)
    assert ppl_fp < ppl_gptq < ppl_rtn, (ppl_fp, ppl_gptq, ppl_rtn)


def _quantize_first_layers(model, calib, cfg, n_layers: int) -> None:
    """Quantize only decoder layers [0, n_layers) in place; the rest stay full precision.

    Sequential calibration only ever looks at the layers up to the one it quantizes, so running it on
    the first `n_layers` alone gives those layers exactly what a whole-model run would give them."""
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(list(layers)[:n_layers])
    try:
        quantize_model(model, calib, cfg, progress=False)
    finally:
        model.model.layers = layers


def test_first_layers_perplexity_ordering_rpiq_below_gptq_below_rtn_at_3_bits(real):
    """The report's quality ordering on held-out prose at 3 bits (RPIQ < GPTQ < RTN), at a budget a
    test can afford: the first 4 decoder layers, 32 x 256 calibration tokens, 4 x 256 held-out tokens.

    Measured (2026-12-01): FP 37.38, RPIQ 40.77, GPTQ 41.65, RTN 50.34. With 8 x 256 calibration
    tokens RPIQ overfits and loses to GPTQ (44.27 vs 42.57): stage 2 needs several times more tokens
    than a layer has inputs (1536 for down_proj), so the calibration set is not made smaller."""
    model, tok, _, heldout = real
    calib = calibration_windows(tok, load_text("calib"), 32, 256, seed=0)
    grid = GridConfig(bits=3)
    configs = {
        "rtn": quant_config("rtn", grid=grid),
        "gptq": quant_config("gptq", grid=grid, calibration=CalibrationConfig(mode="sequential", compensate=False)),
        # the report's "RPIQ, sequential" row: stage 1 + stage 2, fitted to full-precision outputs
        "rpiq": quant_config("rpiq", grid=grid, calibration=CalibrationConfig(mode="sequential", compensate=True)),
    }
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ppl = {"fp": perplexity(model, heldout)}
    try:
        for method, cfg in configs.items():
            model.load_state_dict(state)
            # RTN reads no calibration data: one window keeps the pipeline happy at a fraction of the cost
            _quantize_first_layers(model, calib[:1] if method == "rtn" else calib, cfg, n_layers=4)
            ppl[method] = perplexity(model, heldout)
    finally:
        model.load_state_dict(state)
    assert ppl["fp"] < ppl["rpiq"] < ppl["gptq"] < ppl["rtn"], ppl
