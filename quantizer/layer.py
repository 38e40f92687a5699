"""`quantize_weight`: one linear layer through RTN, GPTQ (stage 1) or RPIQ (stages 1 + 2)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gptq_format import QuantizedWeight
from gptq_format.weight import column_groups

from .config import QuantConfig, RPIQConfig
from .gptq import gptq_quantize
from .grid import fit_params, quantize_codes
from .hessian import cholesky_lower, inverse_cholesky_upper, prepare_hessian
from .refine import HessianResidual, InstanceResidual, WorkingLayer, refine
from .result import LayerReport


@dataclass
class Instance:
    """The kept calibration batch for single-instance refinement (see `refine.InstanceResidual`).

    `Xq` [n, in]: this layer's input with every earlier layer already quantized;
    `Y` [n, out]: the full-precision layer's output on the full-precision input.
    """

    Xq: torch.Tensor
    Y: torch.Tensor
    compensate: bool = False
    """Stage 1 also fits the blended objective (`instance_target`), not only stage 2."""


def layer_loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """`tr(E H E^T)`: the squared output error summed over the calibration set (x 2/N)."""
    E = (W.float() - Wq.float()).to(H.device)
    return float(torch.sum((E @ H.float()) * E))


def validate_inputs(W: torch.Tensor, H: torch.Tensor) -> None:
    """Reject what would otherwise produce NaN codes or a shape error deep inside a matmul."""
    if W.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(W.shape)})")
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"weight contains {bad} NaN/Inf values")
    if tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the weight's {W.shape[1]} input features")
    if not torch.isfinite(H).all():
        raise ValueError("Hessian contains NaN or Inf values")


@contextlib.contextmanager
def _cpu_threads(device: torch.device, n: int = 1) -> Iterator[None]:
    """GPTQ's column loop is thousands of tiny ops; on a CPU, handing each to a thread pool costs
    more than the op (measured 5-20x slower with 2 threads than 1 on a 1536x576 layer)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    config: QuantConfig | None = None,
    *,
    instance: Instance | None = None,
    cross: torch.Tensor | None = None,
    name: str = "",
) -> tuple[QuantizedWeight, LayerReport]:
    """Quantize `W` [out, in] given its calibration Hessian `H = 2/N X^T X` [in, in].

    Returns the codes/grid in GPTQ's logical layout and a report of the layer loss after RTN,
    after stage 1 and after every stage-2 round. With `instance`, stage 2 uses the
    single-instance residual instead of `E @ H`, weighted by `config.calibration.instance_weight`.
    With `cross` (`2/N X_fp^T X`, see
    `compensation_target`), both stages fit the full-precision model's outputs instead of `W`'s
    own outputs on the degraded inputs; the reported losses are then measured against that target.
    """
    cfg = config or RPIQConfig()
    validate_inputs(W, H)
    if cross is not None and cross.shape != H.shape:
        raise ValueError(f"cross term shape {tuple(cross.shape)} does not match the Hessian's {tuple(H.shape)}")
    with _cpu_threads(W.device):
        return _quantize_weight(W, H, cfg, instance, cross, name)


def compensation_target(W: torch.Tensor, cross: torch.Tensor, H: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight whose outputs on this layer's real inputs best match the full-precision model.

    With `X` the full-precision model's inputs to this linear and `Xq` the partly quantized
    model's (already degraded) inputs for the same tokens, `H = 2/N Xq^T Xq`, `cross = 2/N X^T Xq`:

        ||X W^T - Xq Wq^T||^2 = ||Xq (W* - Wq)^T||^2 + const,   W* = W cross H^-1

    (the least-squares residual is orthogonal to every `Xq Wq^T`), so fitting the full-precision
    outputs is ordinary GPTQ/RPIQ on the target `W*` with the usual Hessian. This is how a layer
    compensates what the layers before it got wrong. `H` here is the damped Hessian `H + damp I`,
    and the same ridge pulls the target towards `W`: `W* = (W cross + damp W)(H + damp I)^-1`,
    which is `W` exactly when the inputs were not degraded.
    """
    rhs = (W @ cross + damp * W).t()  # [in, out]
    return torch.cholesky_solve(rhs, cholesky_lower(H)).t().contiguous()


def instance_target(
    W: torch.Tensor, H: torch.Tensor, instance: Instance, weight: float, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-instance objective as a target weight and a Hessian, so GPTQ itself fits it.

    Stage 2's objective with the kept batch, `(1-w) tr((W-Wq) H (W-Wq)^T) + w 2/n ||Y - Xq Wq^T||^2`
    (`refine.InstanceResidual`), is a quadratic in `Wq` with curvature
    `H_mix = (1-w) H + w 2/n Xq^T Xq` and minimum at `W* = ((1-w) W H + w 2/n Y^T Xq) H_mix^-1`,
    so it equals `tr((W*-Wq) H_mix (W*-Wq)^T)` plus a constant: ordinary GPTQ/RPIQ on `(W*, H_mix)`
    optimises it from the first column on, as sequential compensation does with the whole
    calibration set. The same ridge as `compensation_target` (`ridge x mean(diag H_mix)`) pulls `W*`
    towards `W`, which one kept batch needs more than the whole calibration set does.
    """
    Xq = instance.Xq.to(device=W.device, dtype=H.dtype)
    Y = instance.Y.to(device=W.device, dtype=H.dtype)
    scale = 2.0 / Xq.shape[0]
    H_mix = (1 - weight) * H + (weight * scale) * (Xq.t() @ Xq)
    rhs = (1 - weight) * (W @ H) + (weight * scale) * (Y.t() @ Xq)  # [out, in]
    lam = ridge * float(torch.mean(torch.diagonal(H_mix)))
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    target = torch.cholesky_solve((rhs + lam * W).t(), cholesky_lower(H_mix + lam * eye)).t().contiguous()
    return target, H_mix


def _quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: QuantConfig,
    instance: Instance | None,
    cross: torch.Tensor | None,
    name: str,
) -> tuple[QuantizedWeight, LayerReport]:
    grid, cal = cfg.grid, cfg.calibration
    device = W.device
    out, n = W.shape
    W = W.detach().float().clone()
    H0 = H.detach().float().to(device)
    if instance is not None and instance.compensate and cal.instance_weight > 0:
        # Both stages then fit the blended objective; stage 2 needs no separate residual.
        W, H0 = instance_target(W, H0, instance, cal.instance_weight, cal.compensation_percdamp)
        instance = None
    prep = prepare_hessian(H0, cfg.gptq.percdamp)
    W[:, prep.dead] = 0.0
    if cross is not None:
        # The target's own ridge: prep.H carries the GPTQ damping, swapped here for `lam`.
        lam = cal.compensation_percdamp * (float(torch.mean(torch.diagonal(prep.H))) - prep.damp)
        Hc = prep.H + (lam - prep.damp) * torch.eye(n, device=device)
        W = compensation_target(W, cross.detach().float().to(device), Hc, lam)
        W[:, prep.dead] = 0.0
    natural_groups = column_groups(n, grid.group_size).to(device)
    report = LayerReport(name=name, shape=(out, n), method=cfg.method)

    rtn = rtn_quantize(W, natural_groups, cfg)
    report.loss_rtn = layer_loss(W, rtn.dequantize(), H0)
    if cfg.method == "rtn":
        return rtn, report

    # Stage 1: GPTQ in working column order (act-order permutes it).
    t0 = time.perf_counter()
    act = cfg.gptq.act_order
    perm = torch.argsort(torch.diagonal(prep.H), descending=True) if act else torch.arange(n, device=device)
    invperm = torch.argsort(perm)
    Wp = W[:, perm]
    Hp = prep.H[perm][:, perm]
    if act and not cfg.gptq.static_groups and grid.group_size != -1:
        col_group = column_groups(n, grid.group_size).to(device)  # groups follow the working order
        fixed = None
    else:
        col_group = natural_groups[perm]
        fixed = (rtn.scales.clone(), rtn.zeros.float()) if cfg.gptq.static_groups else None
    U = inverse_cholesky_upper(Hp)
    st1 = gptq_quantize(Wp, U, grid, cfg.gptq.block_size, col_group, fixed)
    report.time_gptq_s = time.perf_counter() - t0
    work = WorkingLayer(Wp, st1.Q, st1.codes, st1.scales, st1.zeros, col_group, Hp, prep.damp)
    report.loss_gptq = layer_loss(W, work.Q[:, invperm], H0)

    if isinstance(cfg, RPIQConfig) and cfg.refine.rounds > 0:
        # Stage 2: the Gauss-Seidel refinement, on the layer loss or the single-instance residual.
        t1 = time.perf_counter()
        residual = _stage2_residual(work, H0, perm, cfg, instance)
        outcome = refine(work, residual, grid, cfg.refine, cfg.ablation, cfg.gptq.block_size)
        report.accepted_rounds = outcome.accepted_rounds
        report.objective_rounds = outcome.objective_rounds
        report.loss_refined = layer_loss(W, work.Q[:, invperm], H0)
        report.time_refine_s = time.perf_counter() - t1

    codes, scales, zeros = work.codes, work.scales, work.zeros
    qw = QuantizedWeight(
        codes=codes[:, invperm].to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=col_group[invperm].to(torch.int32),
        bits=grid.bits,
        group_size=grid.group_size,
        sym=grid.sym,
    )
    return qw, report


def _stage2_residual(
    work: WorkingLayer, H0: torch.Tensor, perm: torch.Tensor, cfg: RPIQConfig, instance: Instance | None
) -> HessianResidual | InstanceResidual:
    """What stage 2 descends: the layer loss, or its blend with the kept batch's output error.

    The optional ridge `tr(E (H + lambda_r I) E^T)` (`RefineConfig.percdamp`) keeps the
    refinement from moving weights far along directions the calibration data barely constrains;
    it is added to `work.H` too (the step's preconditioner, this layer's own permuted copy).
    """
    H0p = H0[perm][:, perm]
    if cfg.refine.percdamp > 0:
        lam_r = cfg.refine.percdamp * float(torch.mean(torch.diagonal(H0)))
        H0p.diagonal().add_(lam_r)
        work.H.diagonal().add_(lam_r)
    weight = cfg.calibration.instance_weight
    if instance is None or weight == 0:
        return HessianResidual(work.W, work.Q, H0p)
    Xq, Y = instance.Xq.to(work.W.device), instance.Y.to(work.W.device)
    if cfg.gptq.act_order:  # working column order (an identity permutation would only copy Xq)
        Xq = Xq[:, perm]
    return InstanceResidual(work.W, work.Q, H0p, Xq, Y, weight)


def rtn_quantize(W: torch.Tensor, groups: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest on the min/max grid of each group: the baseline every method must beat."""
    grid = cfg.grid
    ngroups = int(groups.max()) + 1
    scales = torch.empty(ngroups, W.shape[0], device=W.device)
    zeros = torch.empty(ngroups, W.shape[0], device=W.device)
    for g in range(ngroups):
        p = fit_params(W[:, groups == g], grid)
        scales[g], zeros[g] = p.scale, p.zero
    gl = groups.long()
    codes = quantize_codes(W, scales[gl].t(), zeros[gl].t(), grid.maxq)
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=groups.to(torch.int32),
        bits=grid.bits,
        group_size=grid.group_size,
        sym=grid.sym,
    )
