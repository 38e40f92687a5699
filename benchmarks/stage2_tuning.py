"""Stage 2 judged by held-out perplexity: a grid of stage-2 settings on top of compensation.

RPIQ sequential + compensation (the report's "RPIQ, sequential") on the embedded model, at a
grid of stage-2 settings (`RefineConfig`: rounds, alpha, ridge, refinement block size); rounds 0
is stage 2 off, which is exactly "GPTQ + compensation". Same calibration windows as
`benchmarks/report.py` (32 x 512 tokens of *Persuasion*, seed 0) and the same evaluation
(8 x 512 tokens of prose, *Northanger Abbey*, which the settings are tuned on, and of Python
code, which confirms the choice). Each setting runs in its own child process, so its peak RSS
and wall time are its own. Rows are saved after every job, so an interrupted run resumes with
`--append`. Prints a table and saves `benchmarks/results/stage2_tuning.json`.

    python benchmarks/stage2_tuning.py                              # the 3-bit grid, seed 0
    python benchmarks/stage2_tuning.py --bits 4 --settings r0,r1,r4 --append
    python benchmarks/stage2_tuning.py --seeds 1,2 --settings r0,r1 --append
    python benchmarks/stage2_tuning.py --method rpiq-si-comp --settings r4-ridge1 \
        --calibration '{"instance_windows": 8}' --tag iw8 --out benchmarks/results/single_instance_quality.json

`--method` takes the report's method names (`benchmarks/report.py` SPECS: rpiq = sequential +
compensation, rpiq-si-comp = single-instance + compensation); `--calibration` adds CalibrationConfig
fields, and `--tag` names that variant in the rows (it is part of the key `--append` resumes by).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from memory import in_child
from report import calibration_fields, quality_job

RESULTS = Path(__file__).parent / "results"

SETTINGS: dict[str, dict] = {
    # name: RefineConfig fields (the rest at their defaults; the ridge is explicit because its default
    # changed to 1.0 after this benchmark, and the rows must mean the same on a rerun)
    "r0": {"rounds": 0},  # stage 2 off: GPTQ + compensation (the ridge then plays no part)
    "r1": {"rounds": 1, "percdamp": 0.0},
    "r2": {"rounds": 2, "percdamp": 0.0},
    "r4": {"rounds": 4, "percdamp": 0.0},  # the default before this benchmark
    "r1-a0.5": {"rounds": 1, "alpha": 0.5, "percdamp": 0.0},
    "r4-a0.5": {"rounds": 4, "alpha": 0.5, "percdamp": 0.0},
    "r4-ridge0.1": {"rounds": 4, "percdamp": 0.1},
    "r4-ridge1": {"rounds": 4, "percdamp": 1.0},  # the default since this benchmark
    "r1-ridge0.1": {"rounds": 1, "percdamp": 0.1},
    "r1-ridge1": {"rounds": 1, "percdamp": 1.0},
    "r4-b64": {"rounds": 4, "block_size": 64, "percdamp": 0.0},
    "r4-b256": {"rounds": 4, "block_size": 256, "percdamp": 0.0},
}
DEFAULT_GRID = "r0,r1,r2,r4,r1-a0.5,r4-a0.5,r4-ridge0.1,r4-ridge1,r4-b256"


def stage2_job(job: dict) -> dict:
    """RPIQ (by default sequential + compensation, the report's "rpiq") with one stage-2 setting, in a child process."""
    t_job = time.perf_counter()
    row = quality_job({"method": "rpiq", **job})
    row["job_seconds"] = time.perf_counter() - t_job
    return row


def _key(r: dict) -> tuple:
    return r["bits"], r["seed"], r["setting"], r.get("method", "rpiq"), r.get("tag", "")


def table(rows: list[dict], evals: list[str], title: str):
    """A rich table; the deltas are against stage 2 off (r0) at the same bits and seed, where measured."""
    from rich.table import Table

    base = {(r["bits"], r["seed"]): r for r in rows if r["setting"] == "r0" and r.get("method", "rpiq") == "rpiq"}
    t = Table(title=title)
    cols = ["bits", "seed", "setting", "rounds", "alpha", "ridge", "block"]
    for text in evals:
        cols += [f"ppl {text}", f"vs r0 {text}"]
    cols += ["layer loss", "rounds run", "quant s", "stage 2 s", "peak RSS MB"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in sorted(rows, key=lambda r: (r["bits"], r["seed"], list(SETTINGS).index(r["setting"]))):
        rc, b = r["refine_config"], base.get((r["bits"], r["seed"]))
        name = r["setting"] + "".join(f" {x}" for x in (r.get("method", "rpiq"), r.get("tag")) if x and x != "rpiq")
        cells = [str(r["bits"]), str(r["seed"]), name, str(rc["rounds"]), f"{rc['alpha']:g}"]
        cells += [f"{rc['percdamp']:g}" if rc["rounds"] else "-", str(rc["block_size"] or 128)]
        for text in evals:
            p = r[f"ppl_{text}"]
            cells += [f"{p:.2f}", f"{p - b[f'ppl_{text}']:+.2f}" if b else "-"]
        cells += [f"{r['layer_loss_sum']:.4g}", f"{r['stage2_rounds_run_mean']:.2f}", f"{r['quantize_seconds']:.0f}"]
        cells += [f"{r['stage2_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}"]
        t.add_row(*cells)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    ap.add_argument("--bits", default="3", help="bit widths, e.g. 3,4 (group size --group-size)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--settings", default=DEFAULT_GRID, help=f"stage-2 settings, of: {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", default="0", help="calibration seeds")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--evals", default="heldout,code", help="the first tunes, the others confirm")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1, help="jobs at once, each in its own process")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    ap.add_argument("--method", default="rpiq", help="report method name: rpiq (sequential), rpiq-si-comp, ...")
    ap.add_argument("--calibration", type=calibration_fields, default={}, help="extra CalibrationConfig fields as JSON")
    ap.add_argument("--tag", default="", help="names this --calibration variant in the rows")
    ap.add_argument("--out", type=Path, default=RESULTS / "stage2_tuning.json")
    ap.add_argument("--append", action="store_true", help="keep --out's rows and run only the missing ones")
    args = ap.parse_args()
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")

    import torch
    import transformers
    from rich.console import Console

    from models.loading import resolve_model

    console = Console(width=200)
    model = str(resolve_model(args.model))
    evals = args.evals.split(",")
    threads = args.threads or max(1, mp.cpu_count() // args.jobs)
    base = {
        "model": model, "group_size": args.group_size, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "evals": evals, "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows, "threads": threads,
    }  # fmt: skip
    previous = json.loads(args.out.read_text()) if args.append and args.out.exists() else {}
    rows = list(previous.get("rows", []))
    have = {_key(r) for r in rows}
    jobs = [
        {
            **base,
            "bits": int(b),
            "seed": int(s),
            "setting": name,
            "refine": SETTINGS[name],
            "method": args.method,
            "tag": args.tag,
            "calibration": args.calibration,
        }
        for b in args.bits.split(",")
        for s in args.seeds.split(",")
        for name in settings
    ]
    jobs = [j for j in jobs if _key(j) not in have]
    command = "python benchmarks/stage2_tuning.py " + " ".join(sys.argv[1:])
    meta = {
        "command": command,
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores, {platform.python_version()}",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": model,
        "load_average_start": os.getloadavg()[0],
        "parallel_jobs": args.jobs,
        "threads_per_job": threads,
    }
    history = [*previous.get("meta", {}).get("history", []), meta]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(partial: bool) -> None:
        doc = {"meta": {**meta, "history": history}, "rows": rows, "partial": partial}
        args.out.write_text(json.dumps(doc, indent=1))

    def record(row: dict) -> None:
        rows.append(row)
        save(partial=True)  # after every job: an interrupted run loses only its running jobs
        console.print({k: row[k] for k in ("bits", "seed", "setting", "method", "tag", *[f"ppl_{t}" for t in evals])})

    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
            for fut in as_completed([pool.submit(stage2_job, j) for j in jobs]):
                record(fut.result())
    else:
        for j in jobs:
            record(in_child(stage2_job, j))
    meta["load_average_end"] = os.getloadavg()[0]
    history[-1] = meta
    save(partial=False)
    title = (
        "stage 2 on top of compensation: RPIQ sequential, "
        f"{args.nsamples} x {args.seqlen} calibration tokens, g{args.group_size}"
    )
    console.print(table(rows, evals, title))
    console.print(f"saved {args.out}")


if __name__ == "__main__":
    main()
