"""The benchmark report's summaries: mean and spread per grid and method, verdicts, Markdown, plot.

Split from `report.py` (which runs the jobs) so each stays readable; `report.py` imports it as a
sibling module, as it does `memory`.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

GRIDS: dict[str, tuple[int, int]] = {"w4g128": (4, 128), "w3g128": (3, 128), "w4pc": (4, -1)}
METHODS = ("rtn", "gptq", "gptq-ref", "gptqmodel-v1", "gptqmodel-v2", "gptq-comp", "rpiq", "rpiq-si", "rpiq-si-comp")
LABELS = {
    "fp": "full precision",
    "rtn": "RTN",
    "gptq": "GPTQ (ours)",
    "gptq-ref": "GPTQ (llm-compressor)",
    "gptqmodel-v1": "GPTQ (GPTQModel v1)",
    "gptqmodel-v2": "GPTQ v2 / GPTAQ (GPTQModel)",
    "gptq-comp": "GPTQ + compensation",
    "rpiq": "RPIQ, sequential",
    "rpiq-si": "RPIQ, single-instance",
    "rpiq-si-comp": "RPIQ, single-instance + compensation",
}


# --------------------------------------------------------------------------- summaries


def summarize(rows: list[dict], evals: list[str]) -> list[dict]:
    """Mean and spread (min..max, sample std) over seeds per (grid, method)."""
    fp = next(r for r in rows if r["method"] == "fp")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["method"] != "fp":
            groups.setdefault((r["grid"], r["method"]), []).append(r)
    out = []
    for (grid, method), rs in groups.items():
        s = {"grid": grid, "method": method, "runs": len(rs)}
        for text in evals:
            vals = [r[f"ppl_{text}"] for r in rs if f"ppl_{text}" in r]
            if not vals:
                continue
            mean = statistics.fmean(vals)
            s[f"ppl_{text}"] = mean
            s[f"ppl_{text}_min"], s[f"ppl_{text}_max"] = min(vals), max(vals)
            s[f"ppl_{text}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            s[f"gap_{text}"] = mean - fp[f"ppl_{text}"]
        for key in ("layer_loss_sum", "quantize_seconds", "peak_rss_mb", "bits_per_weight"):
            vals = [r[key] for r in rs if isinstance(r.get(key), int | float) and not math.isnan(r[key])]
            if vals:
                s[key] = statistics.fmean(vals)
        out.append(s)
    # The reference library stores the same grid (codes + fp16 scale + zero per group) as ours.
    ours = {s["grid"]: s["bits_per_weight"] for s in out if s["method"] == "gptq" and "bits_per_weight" in s}
    for s in out:
        if "bits_per_weight" not in s and s["grid"] in ours:
            s["bits_per_weight"] = ours[s["grid"]]
    return out


PUBLIC_GPTQ = ("gptq-ref", "gptqmodel-v1", "gptqmodel-v2")
"""Reference libraries' GPTQ rows (llm-compressor; GPTQModel's GPTQ and GPTQ v2 / GPTAQ)."""


def _versus(r: dict, g: dict, text: str, grid: str, name: str, other: str) -> str:
    """One verdict line: `r`'s gap to FP against `g`'s on `text`, with the seed spread."""
    change = 1 - r[f"gap_{text}"] / g[f"gap_{text}"] if g[f"gap_{text}"] else float("nan")
    word = "smaller" if change > 0 else "LARGER"
    if r[f"gap_{text}"] < 0 <= g[f"gap_{text}"]:  # below full precision: no "104 % smaller"
        word, change = "smaller: below full precision", 1.0
    noise = max(r[f"ppl_{text}_std"], g[f"ppl_{text}_std"])
    within = abs(r[f"ppl_{text}"] - g[f"ppl_{text}"]) <= 2 * noise
    if min(r["runs"], g["runs"]) > 1:
        spread = f"seed spread (std) up to {noise:.2f}" + (" - within 2 std: not a clear difference" if within else "")
    else:
        spread = "one seed: spread not measured"
    return (
        f"{grid}, {text}: {name} gap to FP {r[f'gap_{text}']:+.2f} vs {other} {g[f'gap_{text}']:+.2f} "
        f"({abs(change) * 100:.0f}% {word}); {spread}"
    )


def verdicts(summary: list[dict], evals: list[str]) -> list[str]:
    """Plain statements: RPIQ's gap to FP against our GPTQ's, then against the best public GPTQ row
    (the reference library with the lowest mean perplexity on that grid and text), with the spread."""
    lines = []
    by = {(s["grid"], s["method"]): s for s in summary}
    for grid in GRIDS:
        g = by.get((grid, "gptq"))
        if g is None:
            continue
        for method in ("gptq-comp", "rpiq", "rpiq-si", "rpiq-si-comp"):
            r = by.get((grid, method))
            for text in evals:
                if r is not None and f"gap_{text}" in r and f"gap_{text}" in g:
                    lines.append(_versus(r, g, text, grid, LABELS[method], "GPTQ"))
    for grid in GRIDS:
        for text in evals:
            refs = [by[(grid, m)] for m in PUBLIC_GPTQ if f"ppl_{text}" in by.get((grid, m), {})]
            if not refs:
                continue
            best = min(refs, key=lambda s: s[f"ppl_{text}"])
            for method in ("gptq", "rpiq", "rpiq-si-comp"):
                r = by.get((grid, method))
                if r is not None and f"gap_{text}" in r:
                    lines.append(_versus(r, best, text, grid, LABELS[method], f"best public {LABELS[best['method']]}"))
    return lines


def markdown(report: dict) -> str:
    evals = report["meta"]["evals"]
    fp = next(r for r in report["rows"] if r["method"] == "fp")
    md = [f"# rpiq evidence report ({report['meta']['date']})", ""]
    for note in report["meta"].get("notes", []):  # how earlier parts were made, written beside them
        md += [note, ""]
    history = report["meta"].get("history", [])
    if len(history) > 1:
        redo = (
            "; one with `--redo METHODS` ran those methods' rows again, replacing them"
            if any("--redo" in c for c in history)
            else ""
        )
        md += [f"Commands, oldest first (each `--append` run added the rows it lacked{redo}):", ""]
        md += [f"{i}. `{c}`" for i, c in enumerate(history, 1)] + [""]
    md += [f"Command: `{report['meta']['command']}`", f"Machine: {report['meta']['machine']}", ""]
    md += [f"Versions: {report['meta']['versions']}", ""]
    load = report["meta"].get("load_average_start_end")
    if load:
        md += [f"Load average at start / end: {load[0]:.1f} / {load[1]:.1f} (timings are comparable only near 0)", ""]
    if report["meta"].get("parallel_jobs", 1) > 1:
        md += [f"{report['meta']['parallel_jobs']} quality jobs ran at once: their times are under that load.", ""]
    md += [
        f"Model: {report['meta']['model']}; calibration {report['meta']['nsamples']} x {report['meta']['seqlen']} "
        f"tokens of *Persuasion*, seeds {report['meta']['seeds']}; evaluation {report['meta']['eval_windows']} x "
        f"{report['meta']['eval_seqlen']} tokens of each text. Full precision: "
        + ", ".join(f"{t} {fp[f'ppl_{t}']:.3f}" for t in evals),
        "",
        "## Verdict",
        "",
        *[f"- {v}" for v in report["verdicts"]],
        "",
        "## Quality (mean over seeds, min..max)",
        "",
    ]
    head = ["grid", "method", "runs", "bits/weight"] + [f"ppl {t}" for t in evals] + [f"gap {t}" for t in evals]
    head += ["layer loss", "time s", "peak RSS MB"]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report["summary"]:
        cells = [s["grid"], LABELS[s["method"]], str(s["runs"]), f"{s.get('bits_per_weight', float('nan')):.2f}"]
        for t in evals:
            cells.append(
                f"{s[f'ppl_{t}']:.2f} ({s[f'ppl_{t}_min']:.2f}..{s[f'ppl_{t}_max']:.2f})" if f"ppl_{t}" in s else "-"
            )
        cells += [f"{s[f'gap_{t}']:+.2f}" if f"gap_{t}" in s else "-" for t in evals]
        cells += [
            f"{s['layer_loss_sum']:.4g}" if "layer_loss_sum" in s else "-",
            f"{s.get('quantize_seconds', float('nan')):.0f}",
            f"{s.get('peak_rss_mb', float('nan')):.0f}",
        ]
        md.append("| " + " | ".join(cells) + " |")
    if report.get("ablation"):
        base = report["ablation"][0]
        layer = report["meta"]["ablation_layer"]
        md += ["", f"## Stage-2 ablation (decoder layer {layer}, 3-bit g128; loss relative to GPTQ = rounds 0)", ""]
        md += ["| rounds | alpha | block | calib loss | held-out loss | time s |", "|---|---|---|---|---|---|"]
        for a in report["ablation"]:
            md.append(
                f"| {a['rounds']} | {a['alpha']} | {a['block']} | {a['loss_calib'] / base['loss_calib']:.3f} | "
                f"{a['loss_heldout'] / base['loss_heldout']:.3f} | {a['seconds']:.1f} |"
            )
    if report.get("inference"):
        md += ["", "## Inference (embedded model, CPU)", "",
               "| format | weights MB | load s | peak RSS MB | decode tok/s b1 | decode tok/s b8 |",
               "|---|---|---|---|---|---|"]  # fmt: skip
        for r in report["inference"]:
            md.append(
                f"| {r['format']} | {r['weight_mb']:.1f} | {r['load_seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                f"{r['decode_tok_s_b1']:.1f} | {r['decode_tok_s_b8']:.1f} |"
            )
    md += ["", "![perplexity vs bits per weight](ppl_vs_bits.png)", ""]
    return "\n".join(md)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = report["meta"]["evals"][0]
    fp = next(r for r in report["rows"] if r["method"] == "fp")[f"ppl_{text}"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        pts = sorted(
            (s["bits_per_weight"], s[f"ppl_{text}"], s[f"ppl_{text}_std"])
            for s in report["summary"]
            if s["method"] == method and "bits_per_weight" in s and f"ppl_{text}" in s
        )
        if pts:
            xs, ys, es = zip(*pts, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=LABELS[method])
    ax.axhline(fp, color="black", linestyle="--", label="full precision")
    ax.set_xlabel("stored bits per quantized weight (codes + fp16 scale + zero per group)")
    ax.set_ylabel(f"perplexity ({text})")
    ax.set_yscale("log")
    ax.set_title("Perplexity vs size (error bars: std over calibration seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
