"""The evidence report: is RPIQ better than GPTQ at the same size? One command, same data for all.

On one model, with the same calibration windows and the same evaluation texts for every method:

1. quality: FP, RTN, our GPTQ, a reference library's GPTQ (llm-compressor, when its separate
   venv ``.venv-ref`` exists: ``bash scripts/install_reference.sh``), RPIQ sequential, RPIQ
   single-instance; at 4-bit g128, 3-bit g128 and 4-bit per-channel; perplexity on two held-apart
   texts (*Northanger Abbey*, and Python standard-library source), the summed layer loss, and
   the run-to-run spread over calibration seeds;
2. ablations of stage 2 (rounds x alpha x refinement block size) on real layers' Hessians,
   on the calibration text and on held-out text;
3. cost: quantization wall time and peak RSS per method (each job in its own child process);
4. inference: weight bytes, load time and decode speed of an int4 checkpoint vs bf16/fp32.

Writes ``report.json``, ``report.md`` and ``ppl_vs_bits.png`` to ``--out-dir`` (default
``docs/results``) and prints the tables.

    python benchmarks/report.py            # the full report, ~45 min on 2 cores
    python benchmarks/report.py --quick    # smoke test, ~2 min: 3-bit FP/RTN/GPTQ, 2 evaluation windows
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from memory import in_child, peak_rss_mb
from report_summary import GRIDS, METHODS, markdown, plot, summarize, verdicts

ROOT = Path(__file__).resolve().parent.parent
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
REF_SCRIPT = ROOT / "benchmarks" / "reference_gptq.py"
GPTQMODEL_PYTHON = ROOT / ".venv-gptqmodel" / "bin" / "python"
GPTQMODEL_SCRIPT = ROOT / "benchmarks" / "gptqmodel_worker.py"
INSTALL_GPTQMODEL = "bash scripts/install_reference.sh gptqmodel"
REFERENCES: dict[str, tuple[Path, Path, list[str], str]] = {
    # report name: (venv python, worker script, extra worker arguments, install command)
    "gptq-ref": (REF_PYTHON, REF_SCRIPT, [], "bash scripts/install_reference.sh"),
    "gptqmodel-v1": (GPTQMODEL_PYTHON, GPTQMODEL_SCRIPT, ["--variant", "v1"], INSTALL_GPTQMODEL),
    "gptqmodel-v2": (GPTQMODEL_PYTHON, GPTQMODEL_SCRIPT, ["--variant", "v2"], INSTALL_GPTQMODEL),
}
"""Methods run by a reference library in its own venv (each pins what the project does not)."""

SPECS: dict[str, tuple[str, str, bool]] = {
    # report name: (quantizer method, calibration mode, compensate upstream error)
    "rtn": ("rtn", "sequential", False),
    "gptq": ("gptq", "sequential", False),
    "gptq-comp": ("gptq", "sequential", True),
    "rpiq": ("rpiq", "sequential", True),
    "rpiq-si": ("rpiq", "single-instance", False),  # stage 2 alone follows the kept batch
    "rpiq-si-comp": ("rpiq", "single-instance", True),  # the default: stage 1 fits the kept batch's blend too
}


# --------------------------------------------------------------------------- quality jobs (child processes)


def bits_per_weight(weights) -> float:
    """Stored bits per quantized weight: codes plus an fp16 scale and a b-bit zero per group and row."""
    total_bits = total = 0
    for qw in weights.values():
        out_f, in_f = qw.shape
        groups = qw.scales.shape[0]
        total_bits += out_f * in_f * qw.bits + out_f * groups * (16 + qw.bits)
        total += out_f * in_f
    return total_bits / total


def calibration_fields(text: str) -> dict:
    """The argparse type of a benchmark's ``--calibration``: a JSON object of CalibrationConfig fields,
    checked when the command line is read (a typo then fails there, naming the field, not in a child
    process minutes into the run)."""
    from quantizer.config import CalibrationConfig

    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("expected a JSON object of CalibrationConfig fields")
        CalibrationConfig(**fields)  # pydantic's ValidationError is a ValueError
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return fields


def quality_job(job: dict) -> dict:
    """One method on one grid with one calibration seed; runs in a fresh child process. A ``refine``
    entry (RefineConfig fields) overrides stage 2's settings (`benchmarks/stage2_tuning.py`)."""
    import statistics

    import torch

    from models.loading import load_fp_model
    from quantizer.config import CalibrationConfig, GridConfig, RefineConfig, quant_config
    from quantizer.data import calibration_windows, evaluation_windows, load_text
    from quantizer.evaluate import perplexity
    from quantizer.pipeline import quantize_model

    torch.manual_seed(0)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    model, tok, _ = load_fp_model(job["model"])
    row = dict(job)
    if job["method"] != "fp":
        calib = calibration_windows(tok, load_text("calib"), job["nsamples"], job["seqlen"], seed=job["seed"])
        method, mode, compensate = SPECS[job["method"]]
        damp = {} if job.get("comp_damp") is None else {"compensation_percdamp": job["comp_damp"]}
        # ``calibration``: further CalibrationConfig fields (single-instance options, stage2_tuning.py --calibration)
        cal = CalibrationConfig(mode=mode, compensate=compensate, **damp, **job.get("calibration", {}))
        refine = {} if job.get("refine") is None else {"refine": RefineConfig(**job["refine"])}
        grid = GridConfig(bits=job["bits"], group_size=job["group_size"])
        cfg = quant_config(method, grid=grid, calibration=cal, **refine)
        t0 = time.perf_counter()
        res = quantize_model(model, calib, cfg, progress=False)
        row["quantize_seconds"] = time.perf_counter() - t0
        row["layer_loss_sum"] = res.total_loss
        row["bits_per_weight"] = bits_per_weight(res.weights)
        if method == "rpiq":  # what stage 2 did: its settings, time, and the loss stage 1 left it
            rounds_run = [len(r.objective_rounds) for r in res.reports if r.objective_rounds]
            row["refine_config"] = cfg.refine.model_dump()
            row["stage1_seconds"] = sum(r.time_gptq_s for r in res.reports)
            row["stage2_seconds"] = sum(r.time_refine_s for r in res.reports)
            row["layer_loss_stage1_sum"] = sum(r.loss_gptq for r in res.reports)
            row["stage2_rounds_run_mean"] = statistics.fmean(rounds_run) if rounds_run else 0.0
    row["peak_rss_mb"] = peak_rss_mb()
    for text in job["evals"]:
        ev = evaluation_windows(tok, load_text(text), job["eval_seqlen"], max_windows=job["eval_windows"])
        row[f"ppl_{text}"] = perplexity(model, ev)
    return row


def reference_job(job: dict) -> dict | None:
    """A reference library's GPTQ (llm-compressor; GPTQModel v1 / v2) in its own venv; None when not installed."""
    python, script, extra, _ = REFERENCES[job["method"]]
    if not (python.exists() and script.exists()):
        return None
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "ref.json"
        args = [
            str(python), str(script), *extra, "--model", job["model"], "--bits", str(job["bits"]),
            "--group-size", str(job["group_size"]), "--nsamples", str(job["nsamples"]), "--seqlen", str(job["seqlen"]),
            "--seed", str(job["seed"]), "--eval", job["evals"][0], "--eval-seqlen", str(job["eval_seqlen"]),
            "--eval-windows", str(job["eval_windows"]), "--out", str(out),
        ]  # fmt: skip
        if len(job["evals"]) > 1:
            args += ["--eval2", job["evals"][1]]
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            print(f"{job['method']} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        ref = json.loads(out.read_text())
    row = dict(job)
    keep = ("quantize_seconds", "library", "versions", "settings", "library_forward_check", "calibration_check")
    row.update({k: ref[k] for k in keep if k in ref})
    row["peak_rss_mb"] = ref.get("peak_rss_mb_before_eval", float("nan"))
    row[f"ppl_{job['evals'][0]}"] = ref["ppl"]
    if len(job["evals"]) > 1 and "ppl_eval2" in ref:
        row[f"ppl_{job['evals'][1]}"] = ref["ppl_eval2"]
    row["grid_check_passed"] = ref.get("grid_check", {}).get("passed")
    return row


# --------------------------------------------------------------------------- ablation (in process)


def ablation(model_dir: str, nsamples: int, seqlen: int, layer: int, bits: int) -> list[dict]:
    """Stage-2 rounds x alpha x block size on one decoder layer's real Hessians (calib and held-out)."""
    import torch

    from models.loading import load_fp_model
    from quantizer.adapters import get_adapter
    from quantizer.config import GPTQConfig, GridConfig, RefineConfig, quant_config
    from quantizer.data import calibration_windows, load_text
    from quantizer.layer import layer_loss, quantize_weight
    from quantizer.single_instance import stream_hessians

    torch.set_num_threads(1)  # these matrices are small: one thread is fastest on 2 cores
    model, tok, _ = load_fp_model(model_dir)
    adapter = get_adapter(model)
    hs = {}
    for text, seed in (("calib", 0), ("heldout", 1)):
        windows = calibration_windows(tok, load_text(text), nsamples, seqlen, seed=seed)
        hs[text] = stream_hessians(model, adapter, windows, [layer], torch.device("cpu"))[0]
    linears = [(name, c, h) for c, h in zip(hs["calib"], hs["heldout"], strict=True) for name in c.modules]
    rows = []
    settings = [(0, 1.0, 128)] + [
        (r, a, b) for b in (64, 128) for r in range(1, 6) for a in (0.25, 0.5, 1.0)
    ]  # rounds=0 is GPTQ alone
    for rounds, alpha, block in settings:
        cfg = quant_config(
            "rpiq" if rounds else "gptq",
            grid=GridConfig(bits=bits, group_size=128),
            gptq=GPTQConfig(block_size=128),
            refine=RefineConfig(rounds=max(rounds, 1), alpha=alpha, block_size=block),
        )
        calib_loss = held_loss = 0.0
        t0 = time.perf_counter()
        for name, c, h in linears:
            W = c.modules[name].weight.detach()
            qw, rep = quantize_weight(W, c.hessian(name), cfg)
            calib_loss += rep.loss_final
            held_loss += layer_loss(W, qw.dequantize(), h.hessian(name))
        rows.append(
            {"rounds": rounds, "alpha": alpha, "block": block, "loss_calib": calib_loss, "loss_heldout": held_loss,
             "seconds": time.perf_counter() - t0}
        )  # fmt: skip
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- driver


def key(r: dict) -> tuple:
    return r["grid"], r["method"], r["seed"]


def plan_jobs(
    base: dict, grids: str, methods: str, seeds: list[int], seed_grids: str, rows: list[dict], redo: set[str]
) -> tuple[list[dict], list[dict]]:
    """The jobs a run needs, and the earlier rows it keeps: a grid/method/seed row already in ``rows``
    is kept and not rerun, unless its method is in ``redo`` (then it is dropped and run again)."""
    jobs = [{**base, "method": "fp", "grid": "fp", "bits": 16, "group_size": 0, "seed": 0}]
    for grid in filter(None, grids.split(",")):
        bits, group = GRIDS[grid]
        for method in methods.split(","):
            spread = method != "rtn" and grid in seed_grids.split(",")  # RTN ignores calibration
            for seed in seeds if spread else seeds[:1]:
                jobs.append({**base, "method": method, "grid": grid, "bits": bits, "group_size": group, "seed": seed})
    redone = {key(j) for j in jobs if j["method"] in redo}
    kept = [r for r in rows if key(r) not in redone]
    have = {key(r) for r in kept}
    return [j for j in jobs if key(j) not in have], kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 3-bit FP/RTN/GPTQ, 2 evaluation windows")
    ap.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    ap.add_argument("--grids", default=",".join(GRIDS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds (run-to-run spread)")
    ap.add_argument(
        "--seed-grids", default="w3g128", help="grids run with every seed; the others use the first seed only"
    )
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--evals", default="heldout,code")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument(
        "--compensation-percdamp",
        type=float,
        default=None,
        help="ridge of the compensation target for the compensated methods (default: CalibrationConfig's)",
    )
    ap.add_argument(
        "--jobs", type=int, default=1, help="quality jobs run at once (each in its own process); >1 loads the timings"
    )
    ap.add_argument("--ablation-layer", type=int, default=15)
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--no-inference", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument(
        "--append",
        action="store_true",
        help="continue the report.json in --out-dir (same model and settings): runs only the grid/method/seed "
        "rows it lacks (an interrupted run resumes), keeps its ablation and inference parts unless rerun",
    )
    ap.add_argument(
        "--redo",
        default="",
        help="with --append: these methods' rows (of those this command plans) replace the earlier ones instead "
        "of being kept, e.g. after a default changed; resume an interrupted redo with --append alone",
    )
    args = ap.parse_args()
    redo = set(filter(None, args.redo.split(",")))
    if redo and not args.append:
        ap.error("--redo needs --append (without it every row is run anyway)")
    if redo - set(args.methods.split(",")):
        ap.error(f"--redo {args.redo}: not in --methods {args.methods}")
    if args.quick:
        args.grids, args.methods, args.seeds = "w3g128", "rtn,gptq", "0"
        args.nsamples, args.seqlen, args.eval_windows = 8, 512, 2  # fewer tokens: GPTQ overfits (measured)
        args.no_ablation = args.no_inference = True

    import torch
    import transformers
    from rich.console import Console

    from models.loading import resolve_model

    console = Console(width=160)
    model = str(resolve_model(args.model))
    evals = args.evals.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    base = {
        "model": model, "nsamples": args.nsamples, "seqlen": args.seqlen, "evals": evals,
        "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows, "comp_damp": args.compensation_percdamp,
    }  # fmt: skip
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    report_path = args.out_dir / "report.json"
    previous = json.loads(report_path.read_text()) if args.append and report_path.exists() else {}
    args.out_dir.mkdir(parents=True, exist_ok=True)

    jobs, rows = plan_jobs(base, args.grids, args.methods, seeds, args.seed_grids, previous.get("rows", []), redo)

    def record(row: dict | None, job: dict) -> None:
        if row is None:
            install = REFERENCES[job["method"]][3]
            console.print(f"[yellow]skipped {job['method']}: its venv is missing or its run failed (`{install}`)[/]")
            return
        rows.append(row)
        # Saved after every job, so an interrupted run loses its running jobs at most (resume with --append).
        report_path.write_text(json.dumps({**previous, "rows": rows, "partial": True}, indent=1))
        console.print({k: row.get(k) for k in ("grid", "method", "seed", *[f"ppl_{t}" for t in evals])})

    if args.jobs > 1:
        threads = max(1, mp.cpu_count() // args.jobs)
        # One fresh process per job (peak RSS is per job), N at a time; timings are then under load.
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
            futures = {
                pool.submit(reference_job if j["method"] in REFERENCES else quality_job, {**j, "threads": threads}): j
                for j in jobs
            }
            for fut in as_completed(futures):
                record(fut.result(), futures[fut])
    else:
        for j in jobs:
            record(reference_job(j) if j["method"] in REFERENCES else in_child(quality_job, j), j)
    summary = summarize(rows, evals)
    report: dict = {"rows": rows, "summary": summary, "verdicts": verdicts(summary, evals)}
    for part in ("ablation", "inference"):
        if part in previous:
            report[part] = previous[part]
    if not args.no_ablation:
        report["ablation"] = in_child(_ablation_job, (model, args.nsamples, args.seqlen, args.ablation_layer))
    if not args.no_inference:
        report["inference"] = _inference(model)
    report["meta"] = {
        "command": "python benchmarks/report.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores, {platform.python_version()}",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "model": model,
        "seeds": seeds,
        "evals": evals,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "eval_seqlen": args.eval_seqlen,
        "eval_windows": args.eval_windows,
        "ablation_layer": args.ablation_layer,
        "wall_seconds": time.perf_counter() - t_start,
        # Timing columns are only comparable on an otherwise idle machine: say how busy it was.
        "load_average_start_end": [load_start, os.getloadavg()[0]],
        "parallel_jobs": args.jobs,
        "compensation_percdamp": args.compensation_percdamp,
    }
    if previous.get("meta"):
        report["meta"]["appended_to"] = previous["meta"]["command"]
        # Every command that made this report, oldest first, and any notes written beside them.
        before = previous["meta"].get("history") or [previous["meta"]["command"]]
        report["meta"]["history"] = [*before, report["meta"]["command"]]
        if previous["meta"].get("notes"):
            report["meta"]["notes"] = previous["meta"]["notes"]
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (args.out_dir / "report.md").write_text(markdown(report))
    plot(report, args.out_dir / "ppl_vs_bits.png")
    console.print(markdown(report))
    console.print(f"wrote {args.out_dir}/report.json, report.md, ppl_vs_bits.png")


def _ablation_job(arg: tuple[str, int, int, int]) -> list[dict]:
    return ablation(*arg, bits=3)


def _inference(model: str) -> list[dict]:
    """Decode speed and memory of fp32, bf16 and an int4 checkpoint (benchmarks/decode.py's model part)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import decode

    ckpt = in_child(decode._ensure_checkpoint_job, (str(decode.CACHE / "smollm2-gptq-w4g128"), False))
    job = {"device": "cpu", "batches": [1, 8], "prompt_tokens": 128, "new_tokens": 32, "ppl_windows": 0}
    return [
        in_child(decode._model_job, {**job, "format": fmt, "path": path})
        for fmt, path in (("fp32", model), ("bf16", model), ("int4", ckpt))
    ]


if __name__ == "__main__":
    main()
