"""Printing a `rpiq.plan.Plan`: the per-component table and the comparison with the paper's claim."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .plan import PAPER_CLAIM, CalibrationMemory, Plan, plan_rows


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def summary_lines(plan: Plan) -> list[str]:
    """The totals and the verdict against the paper's 60-75 % claim, as plain sentences."""
    lo, hi = PAPER_CLAIM
    lines = []
    for vision, label in ((False, "default policy (language tower incl. experts)"), (True, "with --quantize-vision")):
        r = plan.reduction(vision=vision)
        verdict = "within" if lo <= r <= hi else ("below" if r < lo else "above")
        lines.append(
            f"{label}: {_gib(plan.fp16_bytes())} -> {_gib(plan.quantized_bytes(vision=vision))}, "
            f"reduction {100 * r:.1f} % ({verdict} the paper's {100 * lo:.0f}-{100 * hi:.0f} %)"
        )
    return lines


def print_plan(plan: Plan, console: Console) -> None:
    table = Table(title=f"rpiq plan: {plan.name}, {plan.total_params() / 1e9:.2f} B parameters, weights only")
    for col in ("component", "parameters", "16-bit", "policy", "after"):
        table.add_column(col, justify="left" if col in ("component", "policy") else "right")
    for name, params, fp16, policy, after in plan_rows(plan):
        table.add_row(name, f"{params / 1e6:,.1f} M", _gib(fp16), policy, _gib(after))
    total = f"{plan.total_params() / 1e6:,.1f} M"
    table.add_row("total", total, _gib(plan.fp16_bytes()), "", _gib(plan.quantized_bytes()))
    console.print(table)
    for line in summary_lines(plan):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(
        f"int{plan.bits} g{plan.group_size} costs: packed codes, a 16-bit scale and a {plan.bits}-bit zero per group "
        "and row, an int32 g_idx per input column (GPTQ format); KV cache and activations not included.",
        highlight=False,
    )


def calibration_lines(mem: CalibrationMemory, nsamples: int, seqlen: int) -> list[str]:
    """Which calibration mode holds more, for the language tower, as plain sentences."""
    return [
        f"calibration on {nsamples} x {seqlen} tokens (language tower, 16-bit activations): sequential keeps "
        f"{_gib(mem.stream_bytes)} of hidden states per stream (RPIQ's compensated run keeps two);",
        f"single-instance keeps up to {_gib(mem.hessian_bytes)} of float32 Hessians (largest layer "
        f"{mem.largest_layer_bytes / 2**20:,.0f} MiB) whatever the token count: --offload-hessians keeps them off "
        "the GPU, --hessian-budget-mib caps what is in memory and stores the rest on disk.",
    ]
