"""Whole-model quality, time, memory and size of RTN / GPTQ / RPIQ on the embedded real model.

Same calibration windows and the same evaluation text for every method; each method runs in its
own child process, so its peak RSS (VmHWM of that process, `benchmarks/memory.py`) is its own. Prints a
table and saves `benchmarks/results/model_quality.json`.

    python benchmarks/model_quality.py                          # 4- and 3-bit, g128, ~30 min on 2 cores
    python benchmarks/model_quality.py --bits 4 --nsamples 8    # quicker
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import tempfile
import time
from pathlib import Path

from memory import in_child, peak_rss_mb

RESULTS = Path(__file__).parent / "results"


def _one(job: dict) -> dict:
    """Runs in a fresh child process."""
    import torch

    from gptq_format import checkpoint_bytes, save_quantized
    from models.loading import load_fp_model
    from quantizer.config import CalibrationConfig, GridConfig, RefineConfig, quant_config
    from quantizer.data import calibration_windows, evaluation_windows, load_text
    from quantizer.evaluate import perplexity
    from quantizer.pipeline import quantize_model

    torch.manual_seed(0)
    model, tok, _ = load_fp_model(job["model"])
    ev = evaluation_windows(tok, load_text(job["eval"]), job["eval_seqlen"], max_windows=job["eval_windows"])
    row = dict(job)
    if job["method"] == "fp":
        row["quantize_seconds"] = 0.0
        row["layer_loss_sum"] = 0.0
    else:
        calib = calibration_windows(tok, load_text("calib"), job["nsamples"], job["seqlen"], seed=job["seed"])
        cfg = quant_config(
            job["method"],
            grid=GridConfig(bits=job["bits"], group_size=job["group_size"]),
            refine=RefineConfig(**job.get("refine", {})),
            calibration=CalibrationConfig(
                mode=job["calib"],
                **({"instance_weight": job["instance_weight"]} if "instance_weight" in job else {}),
            ),
        )
        t0 = time.perf_counter()
        res = quantize_model(model, calib, cfg, progress=False)
        row["quantize_seconds"] = time.perf_counter() - t0
        row["layer_loss_sum"] = res.total_loss
        with tempfile.TemporaryDirectory() as d:
            out = save_quantized(model, res.weights, Path(d) / "ckpt", tokenizer=tok, checkpoint_format="gptq_v2")
            row["checkpoint_bytes"] = checkpoint_bytes(out)
    row["peak_rss_mb_before_eval"] = peak_rss_mb()
    row["ppl"] = perplexity(model, ev)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", default="heldout")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--methods", default="rtn,gptq,rpiq", help="which methods to run (FP always runs)")
    ap.add_argument("--calibs", default="sequential,single-instance", help="calibration modes for gptq/rpiq")
    ap.add_argument(
        "--instance-weights", default="", help="extra RPIQ single-instance runs at these w, first bit width only"
    )
    ap.add_argument("--refine", default="{}", help="stage-2 options as JSON, e.g. '{\"rounds\": 1}'")
    ap.add_argument("--out", type=Path, default=RESULTS / "model_quality.json")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from models.loading import resolve_model

    console = Console(width=160)
    model = str(resolve_model(args.model))
    base = {
        "model": model, "group_size": args.group_size, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "seed": args.seed, "eval": args.eval, "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows,
        "refine": json.loads(args.refine),
    }  # fmt: skip
    jobs = [{**base, "method": "fp", "bits": 16, "calib": "-"}]
    methods, calibs = args.methods.split(","), args.calibs.split(",")
    for bits in [int(b) for b in args.bits.split(",")]:
        if "rtn" in methods:
            jobs.append({**base, "method": "rtn", "bits": bits, "calib": "sequential"})
        for calib in calibs:
            for method in [m for m in methods if m != "rtn"]:
                jobs.append({**base, "method": method, "bits": bits, "calib": calib})
    first_bits = int(args.bits.split(",")[0])
    for w in [float(x) for x in args.instance_weights.split(",") if x]:
        jobs.append({**base, "method": "rpiq", "bits": first_bits, "calib": "single-instance", "instance_weight": w})
    rows = []
    for job in jobs:
        row = in_child(_one, job)
        rows.append(row)
        console.print({k: row[k] for k in ("method", "bits", "calib", "ppl", "quantize_seconds", "layer_loss_sum")})

    fp = rows[0]["ppl"]
    t = Table(title=f"embedded model, {args.nsamples} x {args.seqlen} calibration tokens, g{args.group_size}")
    for col in ("bits", "method", "calib", "w", "ppl", "gap to FP", "layer loss", "time s", "peak RSS MB", "ckpt MB"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r["bits"]), r["method"], r["calib"], str(r.get("instance_weight", "")), f"{r['ppl']:.3f}",
            f"{r['ppl'] - fp:+.3f}",
            f"{r['layer_loss_sum']:.4g}", f"{r['quantize_seconds']:.0f}", f"{r['peak_rss_mb_before_eval']:.0f}",
            f"{r.get('checkpoint_bytes', 0) / 2**20:.1f}",
        )  # fmt: skip
    console.print(t)
    meta = {
        "command": "python benchmarks/model_quality.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("model", "out")),
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    console.print(f"saved {args.out}")


if __name__ == "__main__":
    main()
