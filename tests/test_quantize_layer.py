"""The quantization core on single layers: RTN, GPTQ (stage 1), RPIQ (stages 1 + 2)."""

from __future__ import annotations

import itertools

import pytest
import torch

from gptq_format.packing import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from quantizer.config import (
    AblationConfig,
    CalibrationConfig,
    GPTQConfig,
    GridConfig,
    RefineConfig,
    quant_config,
)
from quantizer.grid import fake_quantize, fit_params
from quantizer.hessian import HessianAccumulator, prepare_hessian
from quantizer.layer import Instance, compensation_target, instance_target, layer_loss, quantize_weight
from tests.layers import realistic_layer

SHAPES = [(192, 256), (768, 768), (256, 320)]  # (out, in); 320 = 2.5 groups of 128


UNRIDGED = {"percdamp": 0.0}
"""Stage 2 on the undamped layer loss, the objective these tests hold it to (a keyword overrides it).
Only there does the closed loop guarantee never ending above GPTQ's layer loss; the shipped default
adds a ridge (`RefineConfig.percdamp`), chosen by held-out perplexity, that trades layer loss on the
calibration tokens for fidelity to the weights (`test_stage2_ridge_objective_is_monotone_and_keeps_weights_closer`)."""


def _cfg(method: str, bits: int, group_size: int, **fields):
    """`method`'s config; each keyword goes to the section (refine, ablation, calibration) that has it."""
    fields = {**UNRIDGED, **fields}
    sections = {"refine": RefineConfig, "ablation": AblationConfig, "calibration": CalibrationConfig}
    chosen = {name: {k: v for k, v in fields.items() if k in cls.model_fields} for name, cls in sections.items()}
    assert {k for kw in chosen.values() for k in kw} == set(fields), fields
    built = {name: sections[name](**kw) for name, kw in chosen.items()}
    return quant_config(method, grid=GridConfig(bits=bits, group_size=group_size), **built)


@pytest.fixture(scope="module")
def layers():
    return {shape: realistic_layer(*shape, seed=i) for i, shape in enumerate(SHAPES)}


@pytest.fixture(scope="module")
def losses(layers):
    out = {}
    for shape, layer in layers.items():
        H = layer.H
        for bits in (4, 3):
            for gs in (128, -1):
                for method in ("rtn", "gptq", "rpiq"):
                    qw, rep = quantize_weight(layer.W, H, _cfg(method, bits, gs))
                    # The report's loss is the loss of what the codes really stand for.
                    assert layer_loss(layer.W, qw.dequantize(), H) == pytest.approx(rep.loss_final, rel=1e-4)
                    out[shape, bits, gs, method] = rep.loss_final
    return out


def test_rpiq_never_worse_than_gptq_and_gptq_beats_rtn(losses):
    for (shape, bits, gs, method), loss in losses.items():
        if method != "rpiq":
            continue
        gptq, rtn = losses[shape, bits, gs, "gptq"], losses[shape, bits, gs, "rtn"]
        assert loss <= gptq * (1 + 1e-6), (shape, bits, gs)
        assert gptq < rtn, (shape, bits, gs)
        assert gptq < 0.5 * rtn  # GPTQ's win on correlated inputs is large, not marginal


def test_rpiq_beats_gptq_by_at_least_15_percent_on_average(losses):
    gains = [1 - losses[(*k[:3], "rpiq")] / losses[(*k[:3], "gptq")] for k in losses if k[3] == "rpiq"]
    assert all(g >= 0 for g in gains)
    assert sum(gains) / len(gains) >= 0.15, gains


def _textbook_gptq(W: torch.Tensor, H: torch.Tensor, grid: GridConfig, percdamp: float) -> torch.Tensor:
    """OBQ/GPTQ written plainly: quantize column i, spread its error with the current inverse
    Hessian, then remove column i from the inverse (the Gaussian elimination step)."""
    W = W.double().clone()
    H = H.double().clone()
    H += percdamp * torch.mean(torch.diagonal(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    n = W.shape[1]
    Q = torch.zeros_like(W)
    gs = n if grid.group_size == -1 else grid.group_size
    for i in range(n):
        if i % gs == 0:
            p = fit_params(W[:, i : i + gs].float(), grid)
            scale, zero = p.scale.double(), p.zero.double()
        Q[:, i] = fake_quantize(W[:, i], scale, zero, grid.maxq)
        err = (W[:, i] - Q[:, i]) / Hinv[i, i]
        W[:, i:] -= err.unsqueeze(1) * Hinv[i, i:].unsqueeze(0)
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]
    return Q


@pytest.mark.parametrize("group_size", [-1, 16])
def test_gptq_matches_textbook_recursion(group_size):
    layer = realistic_layer(24, 64, tokens=512, seed=3)
    grid = GridConfig(bits=4, group_size=group_size)
    ref = _textbook_gptq(layer.W, layer.H, grid, 0.01)
    cfg = quant_config("gptq", grid=grid, gptq=GPTQConfig(block_size=32))
    qw, _ = quantize_weight(layer.W, layer.H, cfg)
    got = qw.dequantize().double()
    mismatch = (got - ref).abs() > 1e-5
    # Rounding ties can flip a code in float32 vs float64; allow a handful, not a pattern.
    assert mismatch.float().mean() < 0.005
    assert torch.allclose(got[~mismatch], ref[~mismatch], atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", ["rtn", "gptq", "rpiq"])
def test_values_on_grid_codes_in_range_and_packing_round_trips(bits, method):
    layer = realistic_layer(64, 256, tokens=1024, seed=bits)
    cfg = quant_config(method, grid=GridConfig(bits=bits, group_size=64))
    qw, _ = quantize_weight(layer.W, layer.H, cfg)
    assert qw.codes.dtype == torch.uint8
    assert int(qw.codes.max()) <= 2**bits - 1
    # Every dequantized value is scale * (integer - zero) for its own group.
    Wq = qw.dequantize()
    g = qw.g_idx.long()
    scale, zero = qw.scales[g].t(), qw.zeros[g].t().float()
    assert torch.equal(fake_quantize(Wq, scale, zero, 2**bits - 1), Wq)
    # Scales are exactly representable in the fp16 a checkpoint stores.
    assert torch.equal(qw.scales.half().float(), qw.scales)
    qweight = pack_qweight(qw.codes, bits)
    assert torch.equal(unpack_qweight(qweight, bits, 256), qw.codes)
    qzeros = pack_qzeros(qw.zeros, bits, v1=False)
    assert torch.equal(unpack_qzeros(qzeros, bits, 64, v1=False), qw.zeros)


def test_act_order_keeps_g_idx_consistent():
    layer = realistic_layer(96, 256, tokens=1024, seed=7)
    losses = {}
    for act, static in [(False, False), (True, False), (True, True)]:
        cfg = quant_config(
            "rpiq",
            grid=GridConfig(bits=3, group_size=64),
            gptq=GPTQConfig(act_order=act, static_groups=static, block_size=64),
            refine=RefineConfig(**UNRIDGED),  # compares layer losses, which the ridge trades away
        )
        qw, rep = quantize_weight(layer.W, layer.H, cfg)
        assert layer_loss(layer.W, qw.dequantize(), layer.H) == pytest.approx(rep.loss_final, rel=1e-4)
        counts = torch.bincount(qw.g_idx.long())
        assert counts.tolist() == [64, 64, 64, 64]
        if not act or static:
            assert torch.equal(qw.g_idx, torch.arange(256, dtype=torch.int32) // 64)
        else:
            assert not torch.equal(qw.g_idx, torch.arange(256, dtype=torch.int32) // 64)
        losses[act, static] = rep.loss_final
    # Act-order helps on inputs with outlier channels.
    assert losses[True, False] < losses[False, False]


def test_partial_last_group_is_handled():
    layer = realistic_layer(32, 200, tokens=1024, seed=1)
    qw, rep = quantize_weight(layer.W, layer.H, _cfg("rpiq", 4, 128))
    assert qw.scales.shape == (2, 32)
    assert torch.bincount(qw.g_idx.long()).tolist() == [128, 72]
    assert rep.loss_final < rep.loss_rtn


def test_stage2_rounds_never_increase_the_loss_and_stop_early():
    layer = realistic_layer(128, 256, tokens=2048, seed=5)
    _, rep = quantize_weight(layer.W, layer.H, _cfg("rpiq", 3, 128, rounds=8, tol=1e-3))
    seq = [rep.loss_gptq, *rep.objective_rounds]
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(seq))
    assert len(rep.objective_rounds) < 8  # early stop once a round gains < 0.1 %


def test_open_loop_can_be_worse_than_closed_loop():
    """Without acceptance a full step can overshoot; the closed loop is what guarantees no harm."""
    layer = realistic_layer(128, 256, tokens=2048, seed=6)
    _, closed = quantize_weight(layer.W, layer.H, _cfg("rpiq", 3, 128, rounds=3))
    _, opened = quantize_weight(layer.W, layer.H, _cfg("rpiq", 3, 128, rounds=3, accept="always"))
    assert closed.loss_final <= opened.loss_final
    assert closed.loss_final <= closed.loss_gptq


def test_refit_grid_runs_and_never_hurts():
    layer = realistic_layer(96, 256, tokens=1024, seed=8)
    qw, rep = quantize_weight(layer.W, layer.H, _cfg("rpiq", 3, 64, refit_grid=True))
    assert layer_loss(layer.W, qw.dequantize(), layer.H) == pytest.approx(rep.loss_final, rel=1e-4)
    assert rep.loss_final <= rep.loss_gptq


def test_single_instance_residual_equals_hessian_residual_on_the_full_batch():
    """With the kept batch = all calibration tokens and no upstream error, `2/n R^T X_j` is
    exactly `(E H)_j`, so both residual sources must land on the same codes."""
    layer = realistic_layer(64, 128, tokens=1024, seed=9)
    cfg = _cfg("rpiq", 3, 64, rounds=2, instance_weight=0.5)
    qh, rh = quantize_weight(layer.W, layer.H, cfg)
    inst = Instance(Xq=layer.X, Y=layer.X @ layer.W.t())
    qi, ri = quantize_weight(layer.W, layer.H, cfg, instance=inst)
    assert ri.loss_final == pytest.approx(rh.loss_final, rel=1e-3)
    assert (qi.codes != qh.codes).float().mean() < 0.002


def test_single_instance_compensates_upstream_error():
    """When the input is already degraded, the instance residual steers the weights so the
    output matches the full-precision one better than GPTQ's codes do."""
    layer = realistic_layer(64, 128, tokens=1024, seed=10)
    g = torch.Generator().manual_seed(0)
    Xq = layer.X + 0.05 * layer.X.std() * torch.randn(layer.X.shape, generator=g)
    Y = layer.X @ layer.W.t()
    cfg = _cfg("rpiq", 4, 64, rounds=3, instance_weight=1.0)
    qg, _ = quantize_weight(layer.W, layer.H, quant_config("gptq", grid=cfg.grid, calibration=cfg.calibration))
    qi, _ = quantize_weight(layer.W, layer.H, cfg, instance=Instance(Xq=Xq, Y=Y))
    err_gptq = torch.sum((Y - Xq @ qg.dequantize().t()) ** 2)
    err_inst = torch.sum((Y - Xq @ qi.dequantize().t()) ** 2)
    assert err_inst < err_gptq


def _degraded(layer, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return layer.X + noise * layer.X.std() * torch.randn(layer.X.shape, generator=g)


def test_compensation_target_is_the_weight_itself_when_the_inputs_are_not_degraded():
    layer = realistic_layer(48, 96, tokens=1024, seed=13)
    prep = prepare_hessian(layer.H, 0.01)
    target = compensation_target(layer.W, layer.H, prep.H, prep.damp)
    assert float((target - layer.W).norm() / layer.W.norm()) < 1e-4  # float32 solve


def test_compensation_target_turns_the_full_precision_output_error_into_a_layer_loss():
    """`||X W^T - Xq Wq^T||^2 = ||Xq (W* - Wq)^T||^2 + const` (undamped): for any two weights the
    difference of the real output errors equals the difference of the layer losses around `W*`."""
    layer = realistic_layer(32, 64, tokens=2048, seed=14)
    Xq = _degraded(layer).double()
    X, W = layer.X.double(), layer.W.double()
    n = X.shape[0]
    H, cross = 2.0 / n * Xq.t() @ Xq, 2.0 / n * X.t() @ Xq
    target = compensation_target(W, cross, H, 0.0)
    g = torch.Generator().manual_seed(1)
    A, B = (W + 0.01 * torch.randn(W.shape, generator=g, dtype=torch.float64) for _ in range(2))

    def real(Wq):
        return 2.0 / n * float(torch.sum((X @ W.t() - Xq @ Wq.t()) ** 2))

    assert real(A) - real(B) == pytest.approx(layer_loss(target, A, H) - layer_loss(target, B, H), rel=1e-6)


def test_compensated_gptq_matches_the_full_precision_output_better():
    layer = realistic_layer(64, 128, tokens=2048, seed=15)
    Xq = _degraded(layer, noise=0.1)
    H, cross = 2.0 / Xq.shape[0] * Xq.t() @ Xq, 2.0 / Xq.shape[0] * layer.X.t() @ Xq
    Y = layer.X @ layer.W.t()
    errs = {}
    for method in ("gptq", "rpiq"):
        cfg = _cfg(method, 3, 64, block_size=32)  # stage 2 needs several blocks to move anything
        # 2048 tokens for 128 inputs: nothing to overfit, so the weak ridge of the plain GPTQ damping.
        cfg = cfg.model_copy(update={"calibration": CalibrationConfig(compensation_percdamp=0.01)})
        plain, _ = quantize_weight(layer.W, H, cfg)
        comp, rep = quantize_weight(layer.W, H, cfg, cross=cross)
        errs[method] = [float(torch.sum((Y - Xq @ q.dequantize().t()) ** 2)) for q in (plain, comp)]
        assert rep.loss_final <= rep.loss_gptq * (1 + 1e-6)
    for method, (plain, comp) in errs.items():
        assert comp < 0.9 * plain, method
    assert errs["rpiq"][1] < errs["gptq"][1]


def test_instance_target_turns_the_blended_objective_into_a_layer_loss():
    """Single-instance compensation: `(1-w) tr(E H E^T) + w 2/n ||Y - Xq Wq^T||^2` equals the layer
    loss around `W*` under `H_mix` plus a constant (undamped), so GPTQ on `(W*, H_mix)` fits it."""
    layer = realistic_layer(32, 64, tokens=2048, seed=16)
    Xq, X, W, H = _degraded(layer).double(), layer.X.double(), layer.W.double(), layer.H.double()
    kept = slice(0, 512)  # the kept batch: a quarter of the tokens behind the global Hessian
    inst = Instance(Xq=Xq[kept], Y=X[kept] @ W.t())
    w = 0.25
    target, H_mix = instance_target(W, H, inst, w, ridge=0.0)
    g = torch.Generator().manual_seed(2)
    A, B = (W + 0.01 * torch.randn(W.shape, generator=g, dtype=torch.float64) for _ in range(2))
    n = inst.Xq.shape[0]

    def blended(Wq):
        return (1 - w) * layer_loss(W, Wq, H) + w * 2.0 / n * float(torch.sum((inst.Y - inst.Xq @ Wq.t()) ** 2))

    expected = layer_loss(target, A, H_mix) - layer_loss(target, B, H_mix)
    assert blended(A) - blended(B) == pytest.approx(expected, rel=1e-6)


def test_single_instance_compensation_fits_the_kept_batch_better_than_stage_two_alone():
    """With the target in stage 1 too, the codes reach a lower blended objective than when only
    stage 2 follows the kept batch (the measured objective, not the report's layer loss)."""
    layer = realistic_layer(64, 128, tokens=2048, seed=17)
    Xq = _degraded(layer, noise=0.1)
    kept = slice(0, 1024)
    cfg = _cfg("rpiq", 3, 64, block_size=32, instance_weight=0.5, compensation_percdamp=0.01)
    cfg = cfg.model_copy(update={"gptq": GPTQConfig(block_size=32)})
    Y = layer.X[kept] @ layer.W.t()
    errs = {}
    for compensate in (False, True):
        inst = Instance(Xq=Xq[kept], Y=Y, compensate=compensate)
        q, _ = quantize_weight(layer.W, layer.H, cfg, instance=inst)
        Wq = q.dequantize()
        errs[compensate] = 0.5 * layer_loss(layer.W, Wq, layer.H) + 0.5 * 2.0 / 1024 * float(
            torch.sum((Y - Xq[kept] @ Wq.t()) ** 2)
        )
    assert errs[True] < 0.9 * errs[False], errs


def test_compensation_target_survives_a_hessian_that_is_not_positive_definite():
    """A rank-deficient, slightly indefinite Hessian (an estimate, or float round-off) gets extra
    damping instead of a Cholesky error."""
    layer = realistic_layer(16, 32, tokens=8, seed=16)  # 8 tokens: rank 8 of 32
    H = layer.H - 1e-3 * float(layer.H.diagonal().mean()) * torch.eye(32)
    target = compensation_target(layer.W, layer.H, H, 0.0)
    assert torch.isfinite(target).all()


def test_a_stronger_compensation_ridge_keeps_the_target_closer_to_the_weight():
    """Few tokens for many inputs: the least-squares target chases noise; the ridge reins it in."""
    layer = realistic_layer(32, 128, tokens=160, seed=17)
    Xq = _degraded(layer, noise=0.2)
    H, cross = 2.0 / Xq.shape[0] * Xq.t() @ Xq, 2.0 / Xq.shape[0] * layer.X.t() @ Xq
    mean_diag = float(H.diagonal().mean())
    moved = []
    for percdamp in (0.01, 0.1, 1.0):
        lam = percdamp * mean_diag
        target = compensation_target(layer.W, cross, H + lam * torch.eye(128), lam)
        moved.append(float((target - layer.W).norm()))
    assert moved[0] > moved[1] > moved[2] > 0


def test_compensation_cross_term_must_match_the_hessian():
    with pytest.raises(ValueError, match="cross term shape"):
        quantize_weight(torch.ones(3, 4), torch.eye(4), cross=torch.eye(5))


def test_dead_inputs_are_zeroed_not_nan():
    layer = realistic_layer(32, 128, tokens=512, seed=11)
    X = layer.X.clone()
    X[:, 5] = 0.0
    H = 2.0 / X.shape[0] * X.t() @ X
    qw, _ = quantize_weight(layer.W, H, _cfg("rpiq", 4, 64))
    Wq = qw.dequantize()
    assert torch.isfinite(Wq).all()
    assert torch.all(Wq[:, 5] == 0)


def test_streaming_hessian_equals_one_shot():
    layer = realistic_layer(8, 96, tokens=3000, seed=12)
    acc = HessianAccumulator(96)
    for chunk in layer.X.split(257):
        acc.add(chunk.reshape(1, -1, 96))  # batched [b, seq, in] inputs are flattened
    assert acc.nsamples == 3000
    ref = 2.0 / 3000 * layer.X.double().t() @ layer.X.double()
    assert torch.allclose(acc.H.double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    acc64 = HessianAccumulator(96, dtype=torch.float64)
    for chunk in layer.X.split(100):
        acc64.add(chunk)
    assert torch.allclose(acc64.H, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("W", "H", "message"),
    [
        (torch.tensor([[1.0, float("nan")]]), torch.eye(2), "NaN/Inf"),
        (torch.tensor([[1.0, float("inf")]]), torch.eye(2), "NaN/Inf"),
        (torch.zeros(0, 4), torch.eye(4), "empty"),
        (torch.ones(3, 4), torch.eye(5), "Hessian shape"),
        (torch.ones(4), torch.eye(4), "2-D"),
        (torch.ones(3, 4), torch.full((4, 4), float("nan")), "Hessian contains NaN"),
    ],
)
def test_bad_input_names_the_problem(W, H, message):
    with pytest.raises(ValueError, match=message):
        quantize_weight(W, H)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 5}, "bits=5 is not supported"),
        ({"bits": 1}, "bits=1 is not supported"),
        ({"group_size": 0}, "group_size=0 is invalid"),
    ],
)
def test_bad_config_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GridConfig(**kwargs)


def test_bad_accumulator_input():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="input has 3 features"):
        acc.add(torch.ones(2, 3))


def test_stage2_ridge_objective_is_monotone_and_keeps_weights_closer():
    layer = realistic_layer(128, 256, tokens=1024, seed=13)
    qp, _ = quantize_weight(layer.W, layer.H, _cfg("rpiq", 3, 128))
    qr, ridge = quantize_weight(layer.W, layer.H, _cfg("rpiq", 3, 128, percdamp=0.5))
    seq = ridge.objective_rounds
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(seq))
    # A ridge on tr(E (H + lambda I) E^T) trades layer loss for a smaller weight error |E|.
    assert torch.norm(layer.W - qr.dequantize()) < torch.norm(layer.W - qp.dequantize())
    assert ridge.loss_final > 0
