"""Stage 1: GPTQ, Hessian-based block quantization with lazy updates.

Columns are quantized left to right (in the working order, which act-order permutes). Each
column's rounding error, divided by the pivot of the upper Cholesky factor `U` of `H^-1`, is
pushed onto the columns still to come in the same block; the block's accumulated error is then
pushed onto all later columns in one matmul (the "lazy batch" update of Frantar et al.).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import GridConfig
from .grid import fit_params


@dataclass
class BlockResult:
    Q: torch.Tensor  # [out, cnt] dequantized values
    codes: torch.Tensor  # [out, cnt] integer codes (float dtype)
    err: torch.Tensor  # [out, cnt] scaled errors, for the lazy update of later columns


def quantize_block(
    W1: torch.Tensor,
    U1: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    on_column: Callable[[int, torch.Tensor], None] | None = None,
) -> BlockResult:
    """GPTQ's inner loop over the columns of one block, with within-block error feedback.

    `W1` is [out, cnt]; `scale`/`zero` are per-column grid parameters given column-major, as
    [cnt, out]. `on_column(i, W1t)` may rewrite rows of `scale`/`zero` in place before column
    `i` is rounded (stage 1 fits a group's grid when its first column is reached, on the
    error-updated weights `W1t` [cnt, out]).

    The loop runs on the transpose so that every per-column operation touches contiguous
    memory, and writes into preallocated rows: it executes once per column of every block and
    every stage-2 sweep, so its per-step overhead is what bounds the run time on a CPU.
    """
    W1t = W1.t().contiguous()
    cnt = W1t.shape[0]
    Q1t = torch.empty_like(W1t)
    C1t = torch.empty_like(W1t)
    E1t = torch.empty_like(W1t)
    pivots = torch.diagonal(U1).tolist()
    for i in range(cnt):
        if on_column is not None:
            on_column(i, W1t)
        w, s, z = W1t[i], scale[i], zero[i]
        q, deq, e = C1t[i], Q1t[i], E1t[i]
        torch.div(w, s, out=q)
        q.round_().add_(z).clamp_(0, maxq)
        torch.sub(q, z, out=deq)
        deq.mul_(s)
        torch.sub(w, deq, out=e)
        e.div_(pivots[i])
        W1t[i:].addr_(U1[i, i:], e, alpha=-1.0)
    return BlockResult(Q=Q1t.t(), codes=C1t.t(), err=E1t.t())


@dataclass
class GPTQOutput:
    Q: torch.Tensor  # [out, in] dequantized, working order
    codes: torch.Tensor  # [out, in] codes (float dtype), working order
    scales: torch.Tensor  # [groups, out]
    zeros: torch.Tensor  # [groups, out]


def gptq_quantize(
    W: torch.Tensor,
    U: torch.Tensor,
    grid: GridConfig,
    block_size: int,
    col_group: torch.Tensor,
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> GPTQOutput:
    """Quantize `W` [out, in] (working order) with the upper Cholesky factor `U` of `H^-1`.

    `col_group[c]` is the group of working column `c`. Without `fixed` (static) parameters the
    groups must be contiguous in working order, and each group's grid is fitted when its first
    column is reached, from the weights as updated by the errors of earlier columns.
    """
    W = W.clone()
    out, n = W.shape
    groups = int(col_group.max()) + 1
    cg = col_group.tolist()
    if fixed is not None:
        scales, zeros = fixed[0].clone(), fixed[1].clone()
    else:
        scales = torch.zeros(groups, out, dtype=W.dtype, device=W.device)
        zeros = torch.zeros(groups, out, dtype=W.dtype, device=W.device)
    group_end = _group_ends(cg)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)

    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        idx = col_group[i1:i2].long()
        S1 = scales[idx]  # [cnt, out]: one row per column
        Z1 = zeros[idx]

        def fit_at_group_start(
            i: int,
            W1t: torch.Tensor,
            i1: int = i1,
            i2: int = i2,
            S1: torch.Tensor = S1,
            Z1: torch.Tensor = Z1,
        ) -> None:
            c = i1 + i
            if fixed is not None or (c > 0 and cg[c - 1] == cg[c]):
                return
            end = group_end[c]
            cols = W1t[i : min(end, i2) - i1].t()
            if end > i2:  # the group runs past this block: later columns live in W
                cols = torch.cat([cols, W[:, i2:end]], dim=1)
            p = fit_params(cols, grid)
            scales[cg[c]] = p.scale
            zeros[cg[c]] = p.zero
            in_block = [j for j in range(i, i2 - i1) if cg[i1 + j] == cg[c]]
            S1[in_block] = p.scale
            Z1[in_block] = p.zero

        res = quantize_block(W1, U[i1:i2, i1:i2], S1, Z1, grid.maxq, fit_at_group_start)
        Q[:, i1:i2] = res.Q
        codes[:, i1:i2] = res.codes
        W[:, i2:].sub_(res.err @ U[i1:i2, i2:])
    return GPTQOutput(Q=Q, codes=codes, scales=scales, zeros=zeros)


def _group_ends(cg: list[int]) -> list[int]:
    """For each column, one past the last column of its contiguous run of the same group."""
    ends = [0] * len(cg)
    end = len(cg)
    for c in range(len(cg) - 1, -1, -1):
        if c + 1 < len(cg) and cg[c + 1] != cg[c]:
            end = c + 1
        ends[c] = end
    return ends
