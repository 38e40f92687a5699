"""Stage 2 of RPIQ: multi-round Gauss-Seidel residual-projected block refinement.

The layer loss `L = tr(E H E^T)`, `E = W - Wq`, is a quadratic in the column blocks of `Wq`.
GPTQ only pushes errors forward, so block 1 never learns what blocks 2..M got wrong. Stage 2
sweeps the blocks again, in place (each block sees the newest values of all others):

    G_j   = (E H)[:, j]                       residual projected through the Hessian
    T_j   = Wq_j + alpha * G_j inv(H_jj)      alpha = 1 is the exact block optimum
    Wq_j' = GPTQ(T_j, H_jj)                   re-quantize with within-block compensation
    keep Wq_j' only where the loss went down  closed loop: per row, or per block

Because the loss is a sum over output rows, `E H` and the change of loss for a candidate block
are computed per row, and `accept="row"` keeps the rows that improved. The loss change of a
block step `D_j` (the change of `E_j`) is `2 <D_j, G_j> + <D_j C_jj, D_j>`, so no full loss is
ever recomputed.

Two residual sources share that loop (`docs/algorithm.md`, "single-instance calibration"):
- `HessianResidual`: `G = E H` from the global calibration Hessian (maintained incrementally);
- `InstanceResidual`: one kept batch run through the partly quantized network,
  `R = Y - Xq Wq^T` against the full-precision outputs `Y`. Its objective, `2/n ||R||^2`, is the
  real output error of this layer including what earlier layers got wrong; its gradient is
  `G_j = 2/n R^T Xq_j` (scaled like `H = 2/N X^T X`). One batch is a noisy estimate, so it is
  blended with the global loss, `(1-w) tr(E H E^T) + w 2/n ||R||^2`
  (`CalibrationConfig.instance_weight` = w);
  the step is preconditioned by the global `inv(H_jj)` either way.

Acceptance measures the objective itself (the undamped layer loss unless `RefineConfig.percdamp` adds a
ridge); the GPTQ damping only stabilises the step. The closed loop, backtracking and grid re-fit
switches are `AblationConfig`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import AblationConfig, GridConfig, RefineConfig
from .gptq import quantize_block
from .grid import fit_params
from .hessian import inverse_cholesky_upper


class HessianResidual:
    """`G = E H0` for the global (undamped) Hessian `H0`, kept up to date block by block."""

    def __init__(self, W: torch.Tensor, Q: torch.Tensor, H0: torch.Tensor):
        self.H0 = H0
        self.G = (W - Q) @ H0

    def gradient(self, cols: slice) -> torch.Tensor:
        return self.G[:, cols]

    def curvature(self, cols: slice) -> torch.Tensor:
        return self.H0[cols, cols]

    def update(self, cols: slice, D: torch.Tensor) -> None:
        """`E[:, cols] += D`."""
        self.G.add_(D @ self.H0[cols, :])

    def objective(self, E: torch.Tensor) -> float:
        return float(torch.sum(self.G * E))


class InstanceResidual:
    """`(1-w) tr(E H0 E^T) + w 2/n ||Y - Xq Wq^T||^2` for one kept batch, kept up to date.

    `Xq` [n, in] is the layer's real (already degraded) input in working column order, `Y`
    [n, out] the full-precision layer's output on the full-precision input of the same tokens.
    Why the blend: with w = 1 a layer fits one batch's curvature exactly and overfits it (a
    measured failure mode); the global term keeps every direction the calibration set saw.
    The objective is a sum of two positive semi-definite quadratics, so it cannot run away.
    """

    def __init__(
        self, W: torch.Tensor, Q: torch.Tensor, H0: torch.Tensor, Xq: torch.Tensor, Y: torch.Tensor, weight: float
    ):
        if Xq.shape[0] != Y.shape[0] or Xq.shape[1] != Q.shape[1] or Y.shape[1] != Q.shape[0]:
            raise ValueError(
                f"instance shapes do not match the layer: Xq {tuple(Xq.shape)}, Y {tuple(Y.shape)}, "
                f"weight {tuple(Q.shape)}"
            )
        self.w = weight
        self.hessian = HessianResidual(W, Q, H0) if weight < 1 else None
        self.Xq = Xq.float()
        self.scale = 2.0 / Xq.shape[0]
        self.R = Y.float() - self.Xq @ Q.t()

    def gradient(self, cols: slice) -> torch.Tensor:
        g = (self.w * self.scale) * (self.R.t() @ self.Xq[:, cols])
        if self.hessian is not None:
            g += (1 - self.w) * self.hessian.gradient(cols)
        return g

    def curvature(self, cols: slice) -> torch.Tensor:
        X = self.Xq[:, cols]
        c = (self.w * self.scale) * (X.t() @ X)
        if self.hessian is not None:
            c += (1 - self.w) * self.hessian.curvature(cols)
        return c

    def update(self, cols: slice, D: torch.Tensor) -> None:
        """`E[:, cols] += D` means `Wq[:, cols] -= D`, so `R += Xq_j D^T`."""
        self.R.add_(self.Xq[:, cols] @ D.t())
        if self.hessian is not None:
            self.hessian.update(cols, D)

    def objective(self, E: torch.Tensor) -> float:
        value = self.w * self.scale * float(torch.sum(self.R * self.R))
        if self.hessian is not None:
            value += (1 - self.w) * self.hessian.objective(E)
        return value


Residual = HessianResidual | InstanceResidual


@dataclass
class WorkingLayer:
    """One layer after stage 1, in working (possibly act-order permuted) column order.

    Stage 2 rewrites `Q`, `codes` (and `scales`/`zeros` with `refit_grid`) in place. `H` is the
    damped Hessian that preconditions the step, `damp` its diagonal shift.
    """

    W: torch.Tensor  # [out, in] the target
    Q: torch.Tensor  # [out, in] dequantized codes
    codes: torch.Tensor  # [out, in]
    scales: torch.Tensor  # [ngroups, out]
    zeros: torch.Tensor  # [ngroups, out]
    col_group: torch.Tensor  # [in] group of each working column
    H: torch.Tensor
    damp: float


@dataclass
class RefineOutcome:
    objective_rounds: list[float]
    accepted_rounds: list[float]


@dataclass
class _Sweep:
    """What every block step of one refinement shares."""

    layer: WorkingLayer
    E: torch.Tensor  # W - Q, kept in step with Q
    residual: Residual
    grid: GridConfig
    cfg: RefineConfig
    ablation: AblationConfig


@dataclass
class _Block:
    cols: slice
    Hinv: torch.Tensor  # inv(H_jj): the step's preconditioner
    U: torch.Tensor  # upper Cholesky of inv(H_jj): within-block GPTQ


def refine(
    layer: WorkingLayer,
    residual: Residual,
    grid: GridConfig,
    cfg: RefineConfig,
    ablation: AblationConfig,
    block_size: int,
) -> RefineOutcome:
    """Run stage 2 in place on `layer`: up to `cfg.rounds` Gauss-Seidel sweeps over its blocks.

    `block_size` is stage 1's block size, the default refinement block.
    """
    n = layer.W.shape[1]
    bs = cfg.block_size or block_size
    blocks = []
    for i in range(0, n, bs):
        b = slice(i, min(i + bs, n))
        Hjj = layer.H[b, b]
        blocks.append(_Block(b, torch.cholesky_inverse(torch.linalg.cholesky(Hjj)), inverse_cholesky_upper(Hjj)))
    sweep = _Sweep(layer, layer.W - layer.Q, residual, grid, cfg, ablation)
    objective = [residual.objective(sweep.E)]
    accepted_rounds: list[float] = []
    for _ in range(cfg.rounds):
        accepted = torch.zeros(layer.W.shape[0], dtype=torch.bool, device=layer.W.device)
        for block in blocks:
            accepted |= _refine_block(sweep, block)
        accepted_rounds.append(float(accepted.float().mean()))
        objective.append(residual.objective(sweep.E))
        prev, new = objective[-2], objective[-1]
        if prev <= 0 or (prev - new) / prev < cfg.tol:
            break
    return RefineOutcome(objective_rounds=objective[1:], accepted_rounds=accepted_rounds)


def _refine_block(sweep: _Sweep, block: _Block) -> torch.Tensor:
    """One Gauss-Seidel step on one block; returns the mask of rows whose codes changed.

    Rows are independent (the loss is a sum over output rows), so a rejected row retries with
    its own halved step while accepted rows stay put. Every attempt works on all rows with
    per-row masks rather than gathering the pending ones: on a CPU the per-call overhead of the
    column loop, not its arithmetic, sets the cost, and full-width slices avoid scatter/gather.
    """
    layer, E, residual, ablation, b = sweep.layer, sweep.E, sweep.residual, sweep.ablation, block.cols
    W, Q, codes, scales, zeros = layer.W, layer.Q, layer.codes, layer.scales, layer.zeros
    C = residual.curvature(b)
    Gtrue = residual.gradient(b).clone()  # rows are independent: fixed for this block step
    step = (Gtrue + layer.damp * E[:, b]) @ block.Hinv  # full step to the damped block optimum
    idx = layer.col_group[b].long()
    S0, Z0 = scales[idx], zeros[idx]  # [cnt, out]: one row per column, as quantize_block wants
    inner = _groups_inside(layer.col_group, b) if ablation.refit_grid else []
    todo = torch.ones(W.shape[0], dtype=torch.bool, device=W.device)
    changed = torch.zeros_like(todo)
    alpha = sweep.cfg.alpha
    for _ in range(ablation.backtrack + 1):
        Qb = Q[:, b]
        T = Qb + alpha * step
        S, Z = S0, Z0
        new_params = {}
        if inner:
            S, Z = S0.clone(), Z0.clone()
            for g, cols in inner:
                p = fit_params(T[:, cols], sweep.grid)
                S[cols] = p.scale
                Z[cols] = p.zero
                new_params[g] = p
        res = quantize_block(T, block.U, S, Z, sweep.grid.maxq)
        D = Qb - res.Q  # the change of E on this block
        dL = 2.0 * torch.sum(D * Gtrue, dim=1) + torch.sum((D @ C) * D, dim=1)
        moved = torch.any(D != 0, dim=1)
        keep = _acceptance(dL, ablation.accept) & moved & todo
        if keep.any():
            k = keep.unsqueeze(1)
            Q[:, b] = torch.where(k, res.Q, Qb)
            codes[:, b] = torch.where(k, res.codes, codes[:, b])
            E[:, b] = W[:, b] - Q[:, b]
            residual.update(b, D * k)
            for g, p in new_params.items():
                scales[g] = torch.where(keep, p.scale, scales[g])
                zeros[g] = torch.where(keep, p.zero, zeros[g])
            changed |= keep
        todo &= ~(keep | ~moved)
        if ablation.accept == "always" or not todo.any():
            break
        alpha *= 0.5
    return changed


def _acceptance(dL: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "always":
        return torch.ones_like(dL, dtype=torch.bool)
    if mode == "block":
        return torch.full_like(dL, bool(dL.sum() < 0), dtype=torch.bool)
    return dL < 0


def _groups_inside(col_group: torch.Tensor, b: slice) -> list[tuple[int, torch.Tensor]]:
    """Groups whose every column lies in block `b`, with their column positions in the block."""
    local = col_group[b]
    out = []
    for g in torch.unique(local).tolist():
        if int((col_group == g).sum()) == int((local == g).sum()):
            out.append((g, (local == g).nonzero().squeeze(1)))
    return out
