"""Reference-library GPTQ baseline: llm-compressor's GPTQModifier on the same model, windows and text.

Our own GPTQ / RPIQ numbers (``benchmarks/model_quality.py``) are only credible next to a GPTQ
that we did not write. This script quantizes the model with llm-compressor's ``GPTQModifier``
(``oneshot``, sequential pipeline, CPU) calibrated on exactly the token windows our methods use
(``quantizer.data.calibration_windows`` on the built-in ``calib`` text), then measures perplexity
with *our* ``quantizer.evaluate.perplexity`` on *our* ``evaluation_windows``. The model is scored
exactly as the library left it: its linears hold the fake-quantized (dequantized) weights and the
library's frozen quantization forward; a grid check proves that the weights changed and lie on a
``2**bits``-level grid per (row, group).

llm-compressor pins an older transformers than the project, so it lives in its own venv:

    bash scripts/install_reference.sh
    .venv-ref/bin/python benchmarks/reference_gptq.py --bits 4 --group-size 128 --nsamples 8 \\
        --seqlen 512 --seed 0 --eval heldout --eval-seqlen 512 --eval-windows 16 \\
        --out benchmarks/results/reference_gptq_w4g128.json

Quantization runs in a child process (like model_quality.py's), so that its peak RSS
(VmHWM, ``benchmarks/memory.py``) is its own; the parent writes one JSON row compatible with model_quality.py's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the rpiq repo is not installed into .venv-ref: import it from the tree
    sys.path.insert(0, str(ROOT))

from memory import peak_rss_mb  # noqa: E402 - benchmarks/ is the script's directory, already on sys.path
from reference_common import add_run_args, versions  # noqa: E402

METHOD = "gptq-llmcompressor"
LIBRARY = "llmcompressor"
VERSIONED = ("llmcompressor", "compressed-tensors", "torch", "transformers", "accelerate", "datasets")
GRID_CHECK_MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
"""Linears whose every (row, group) is checked, in the first, middle and last decoder layer."""


def _quant_args(bits: int, group_size: int, in_features: set[int]):
    """The weight scheme closest to our default grid (quantizer.config.GridConfig), and why its strategy.

    compressed-tensors' ``group`` strategy needs ``in_features % group_size == 0`` (its observer
    reshapes columns into equal groups; SmolLM2-135M has 576 = 4.5 x 128). Its ``block`` strategy
    with ``block_structure=[1, group_size]`` is the same per-(row, group) grid, zero-pads a short last
    group (padding zeros cannot move a min/max fit that already includes 0), and GPTQModifier
    supports it: so it is used whenever some layer is not divisible, matching our short last group.
    """
    import torch
    from compressed_tensors.quantization import QuantizationArgs

    common = dict(
        num_bits=bits,
        type="int",
        symmetric=False,  # ours: sym=False (min/max incl. 0, zero point rounded)
        actorder=None,  # ours: act_order=False
        observer="minmax",  # ours: min/max fit, range widened to include 0
        scale_dtype=torch.float16,  # ours: fp16_scales=True (scales rounded to fp16 before quantizing)
    )
    if group_size == -1:
        return QuantizationArgs(strategy="channel", **common), "channel: one grid per output row"
    bad = sorted(f for f in in_features if f % group_size)
    if not bad:
        return QuantizationArgs(strategy="group", group_size=group_size, **common), "group: all in_features divisible"
    return (
        QuantizationArgs(strategy="block", block_structure=[1, group_size], **common),
        f"block [1, {group_size}] instead of group {group_size}: in_features {bad} not divisible by "
        f"{group_size} (compressed-tensors' group observer/forward reject that); same grid, short last group",
    )


def _grid_check(model, originals: dict, bits: int, group_size: int) -> dict:
    """Weights changed, and every (row, group) holds <= 2**bits distinct values on the library's grid."""
    import torch

    report: dict = {"bits": bits, "group_size": group_size, "levels_allowed": 2**bits, "modules": {}}
    ok = True
    for name, w0 in originals.items():
        mod = model.get_submodule(name)
        w = mod.weight.detach().float()
        scale = mod.weight_scale.detach().float()
        zp = mod.weight_zero_point.detach().float()
        out_f, in_f = w.shape
        gs = in_f if group_size == -1 else group_size
        n_groups = math.ceil(in_f / gs)
        wg = torch.nn.functional.pad(w, (0, n_groups * gs - in_f)).reshape(out_f, n_groups, gs)
        distinct = torch.tensor(
            [[torch.unique(wg[r, g, : min(gs, in_f - g * gs)]).numel() for g in range(n_groups)] for r in range(out_f)]
        )
        # integer codes on the library's stored grid: w == scale * (code - zp), code inside the b-bit range
        s = scale.reshape(out_f, -1)[:, :n_groups, None]
        z = zp.reshape(out_f, -1)[:, :n_groups, None]
        codes = wg / s + z
        code_err = (codes - codes.round()).abs()[..., :gs].reshape(out_f, -1)[:, :in_f]
        rounded = codes.round().reshape(out_f, -1)[:, :in_f]
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1  # compressed-tensors' signed int range
        rel_change = float((w - w0).norm() / w0.norm())
        m = {
            "shape": [out_f, in_f],
            "n_groups_per_row": n_groups,
            "max_distinct_per_group": int(distinct.max()),
            "mean_distinct_per_group": float(distinct.float().mean()),
            "max_code_residual": float(code_err.max()),
            "codes_in_range": bool(((rounded >= qmin) & (rounded <= qmax)).all()),
            "fraction_weights_changed": float((w != w0).float().mean()),
            "relative_weight_change": rel_change,
            "scale_dtype": str(mod.weight_scale.dtype),
            "scales_exact_in_fp16": bool(torch.equal(scale, scale.half().float())),
            "zero_point_dtype": str(mod.weight_zero_point.dtype),
        }
        m["passed"] = (
            m["max_distinct_per_group"] <= 2**bits
            and m["max_code_residual"] < 1e-2
            and m["codes_in_range"]
            and rel_change > 1e-4
        )
        ok = ok and m["passed"]
        report["modules"][name] = m
    report["passed"] = ok
    return report


def _quantized_linears(model) -> dict:
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = [n for n in names if hasattr(model.get_submodule(n), "weight_scale")]
    return {"linear": len(names), "quantized": len(quantized), "not_quantized": sorted(set(names) - set(quantized))}


def _one(job: dict) -> dict:
    """Runs in a fresh child interpreter: calibrate + quantize with llm-compressor, then our perplexity."""
    import torch
    from compressed_tensors.quantization import QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from loguru import logger

    from models.loading import load_fp_model
    from quantizer.data import calibration_windows, evaluation_windows, load_text
    from quantizer.evaluate import perplexity

    warnings: list[str] = []
    gptq_seconds: list[float] = []

    def sink(msg) -> None:
        rec = msg.record
        if rec["level"].name in ("WARNING", "ERROR", "CRITICAL"):
            warnings.append(rec["message"].strip())
        elif rec["level"].name == "METRIC" and rec["message"].startswith("time "):
            gptq_seconds.append(float(rec["message"].split()[1].rstrip("s")))

    logger.add(sink, level="WARNING")

    torch.manual_seed(0)
    model, tok, _ = load_fp_model(job["model"])
    calib = calibration_windows(tok, load_text("calib"), job["nsamples"], job["seqlen"], seed=job["seed"])

    layers = model.model.layers
    picks = sorted({0, len(layers) // 2, len(layers) - 1})
    originals = {
        f"model.layers.{i}.{n}": model.get_submodule(f"model.layers.{i}.{n}").weight.detach().clone().float()
        for i in picks
        for n in GRID_CHECK_MODULES
    }

    # Record the token ids the library really feeds the model during calibration.
    seen: list[torch.Tensor] = []
    embed = model.get_input_embeddings()

    def record(_m, args) -> None:
        if isinstance(args[0], torch.Tensor) and args[0].device.type != "meta":  # skip the tracing pass
            seen.append(args[0].detach().cpu().clone())

    handle = embed.register_forward_pre_hook(record)

    in_features = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    qargs, strategy_note = _quant_args(job["bits"], job["group_size"], in_features)
    modifier = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=qargs)},
        ignore=["lm_head"],  # ours quantizes decoder-layer linears only (lm_head is tied to the embeddings)
        block_size=job["block_size"],
        dampening_frac=job["percdamp"],
        actorder=None,
        batched_quantization=None,
    )
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    default_threads = torch.get_num_threads()
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=job["nsamples"],
        max_seq_length=job["seqlen"],
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline=job["pipeline"],
        sequential_targets=job["sequential_targets"],
        output_dir=None,
        log_dir=None,
    )
    quantize_seconds = time.perf_counter() - t0
    torch.set_num_threads(default_threads)
    handle.remove()
    peak_rss = peak_rss_mb()

    fed = [s for s in seen if s.shape[-1] == job["seqlen"]]
    calib_fed = torch.cat(fed) if fed else torch.empty(0, job["seqlen"], dtype=torch.long)
    uniq = torch.unique(calib_fed, dim=0) if calib_fed.numel() else calib_fed
    calib_check = {
        "embedding_calls": len(seen),
        "distinct_windows_fed": int(uniq.shape[0]),
        "all_our_windows_fed": all(any(torch.equal(c, u) for u in uniq) for c in calib),
        "only_our_windows_fed": all(any(torch.equal(u, c) for c in calib) for u in uniq),
        "shapes_fed": sorted({tuple(s.shape) for s in seen}),
    }
    calib_check["passed"] = calib_check["all_our_windows_fed"] and calib_check["only_our_windows_fed"]

    grid = _grid_check(model, originals, job["bits"], job["group_size"])
    ev = evaluation_windows(tok, load_text(job["eval"]), job["eval_seqlen"], max_windows=job["eval_windows"])
    row = {
        "method": METHOD,
        "model": job["model"],
        "bits": job["bits"],
        "group_size": job["group_size"],
        "calib": "sequential",
        "nsamples": job["nsamples"],
        "seqlen": job["seqlen"],
        "seed": job["seed"],
        "eval": job["eval"],
        "eval_seqlen": job["eval_seqlen"],
        "eval_windows": job["eval_windows"],
        "quantize_seconds": quantize_seconds,
        "quantize_threads": job["threads"] or default_threads,
        "gptq_seconds_sum": sum(gptq_seconds),  # the library's own per-module GPTQ timings, summed
        "eval_threads": default_threads,
        "peak_rss_mb_before_eval": peak_rss,
        "calibration_check": calib_check,
        "grid_check": grid,
        "quantized_linears": _quantized_linears(model),
        "library_warnings": sorted({w for w in warnings if "accelerator" not in w})[:20],
        "rtn_fallback": [w for w in warnings if "round-to-nearest" in w],
    }
    t1 = time.perf_counter()
    row["ppl"] = perplexity(model, ev)
    row["eval_seconds"] = time.perf_counter() - t1
    if job.get("eval2"):
        ev2 = evaluation_windows(tok, load_text(job["eval2"]), job["eval_seqlen"], max_windows=job["eval_windows"])
        row["eval2"] = job["eval2"]
        row["ppl_eval2"] = perplexity(model, ev2)
    row["settings_resolved"] = {
        "strategy_note": strategy_note,
        "quantization_scheme": model.get_submodule(
            f"model.layers.{picks[0]}.self_attn.q_proj"
        ).quantization_scheme.model_dump(mode="json"),
    }
    return row


def _fp_ppl(job: dict) -> dict:
    """Full-precision perplexity in this venv (its transformers), on the same windows: a sanity anchor."""
    from models.loading import load_fp_model
    from quantizer.data import evaluation_windows, load_text
    from quantizer.evaluate import perplexity

    model, tok, _ = load_fp_model(job["model"])
    out = {}
    for key in ("eval", "eval2"):
        if job.get(key):
            ev = evaluation_windows(tok, load_text(job[key]), job["eval_seqlen"], max_windows=job["eval_windows"])
            out[key] = perplexity(model, ev)
    return out


CHILD_FUNCTIONS = {"quantize": "_one", "fp": "_fp_ppl"}


def _run_child(kind: str, job: dict, timeout_s: float) -> dict:
    """Run `CHILD_FUNCTIONS[kind](job)` in a fresh interpreter; its peak RSS is its own.

    A subprocess rather than a multiprocessing pool: a pool whose worker dies (killed, crashed)
    waits forever, while a dead subprocess is an error with its exit status and its stderr tail.
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="reference_gptq_") as d:
        job_file, result_file = Path(d) / "job.json", Path(d) / "result.json"
        job_file.write_text(json.dumps(job))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(job_file), str(result_file)]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not result_file.is_file():
            sys.stderr.write(proc.stderr[-20000:])
            raise SystemExit(f"reference_gptq: the {kind} child failed with exit status {proc.returncode}")
        return json.loads(result_file.read_text())


def _child_main(kind: str, job_file: str, result_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    row = globals()[CHILD_FUNCTIONS[kind]](job)
    tmp = Path(result_file).with_suffix(".tmp")
    tmp.write_text(json.dumps(row, default=str))
    tmp.replace(result_file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--percdamp", type=float, default=0.01, help="GPTQModifier.dampening_frac (ours: 0.01)")
    ap.add_argument("--block-size", type=int, default=128, help="GPTQModifier.block_size (ours: 128)")
    ap.add_argument("--pipeline", default="sequential", help="llm-compressor calibration pipeline")
    ap.add_argument(
        "--sequential-targets",
        default=None,
        help="comma-separated llm-compressor sequential targets (default: the decoder layer class); "
        "e.g. 'LlamaAttention,LlamaMLP' to get closer to our true-sequential grouping",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads during quantization (0 = torch's default). GPTQModifier's CPU path is a Python "
        "loop of small per-column ops: on a shared 2-core machine 2 OpenMP threads made one 576x576 layer "
        "10-50x slower than 1 thread. Evaluation always uses torch's default",
    )
    ap.add_argument("--fp-ppl", action="store_true", help="also measure FP perplexity in this venv")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each child process")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from models.loading import resolve_model

    model = str(resolve_model(args.model))
    job = {
        "model": model, "bits": args.bits, "group_size": args.group_size, "nsamples": args.nsamples,
        "seqlen": args.seqlen, "seed": args.seed, "eval": args.eval, "eval2": args.eval2,
        "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows, "percdamp": args.percdamp,
        "block_size": args.block_size, "pipeline": args.pipeline, "threads": args.threads,
        "sequential_targets": args.sequential_targets.split(",") if args.sequential_targets else None,
    }  # fmt: skip
    t0 = time.perf_counter()
    row = _run_child("quantize", job, args.timeout)
    row["wall_seconds_child"] = time.perf_counter() - t0
    if args.fp_ppl:
        fp = _run_child("fp", job, args.timeout)
        row["fp_ppl_this_env"] = fp.get("eval")
        if "eval2" in fp:
            row["fp_ppl_eval2_this_env"] = fp["eval2"]
    row["library"] = LIBRARY
    row["versions"] = versions(VERSIONED)
    row["settings"] = {
        "algorithm": "llmcompressor.modifiers.gptq.GPTQModifier via llmcompressor.oneshot",
        "device": "cpu",
        "bits": args.bits,
        "symmetric": False,
        "strategy": "channel"
        if args.group_size == -1
        else "group (block [1, group_size] where a layer is not divisible; see settings_resolved)",
        "group_size": args.group_size,
        "actorder": None,
        "dampening_frac": args.percdamp,
        "block_size": args.block_size,
        "observer": "minmax (fit once on the original weights, before GPTQ: static groups)",
        "scale_dtype": "float16",
        "targets": ["Linear"],
        "ignore": ["lm_head"],
        "pipeline": args.pipeline,
        "sequential_targets": job["sequential_targets"] or "default (no_split_modules: the decoder layer)",
        "propagate_error": True,
        "calibration": "our quantizer.data.calibration_windows(tok, load_text('calib'), nsamples, seqlen, seed)",
        "batch_size": 1,
        "shuffle_calibration_samples": False,
        "model_dtype": "float32",
        "differences_from_ours": [
            "grid (scale/zero) of every group is fit once from the ORIGINAL weights before GPTQ runs "
            "(static groups); our GPTQ (act_order off) fits each group's grid on the error-updated "
            "weights when GPTQ reaches the group's first column",
            "with the default sequential targets, all linears of a decoder layer are calibrated on that "
            "layer's input with the layer still unquantized (q/k/v, o, gate/up, down share one pass); "
            "ours is true-sequential: o_proj sees quantized q/k/v outputs, down_proj quantized gate/up",
            "zero points use compressed-tensors' signed int range (codes -2^(b-1)..2^(b-1)-1); the same "
            "grid as ours up to a shift",
        ],
    }
    row["command"] = "python benchmarks/reference_gptq.py " + " ".join(sys.argv[1:])
    row["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    row["date"] = time.strftime("%Y-%m-%d")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(row, indent=1, default=str))
    tmp.replace(args.out)
    summary = {k: row.get(k) for k in ("method", "bits", "group_size", "ppl", "quantize_seconds")}
    summary["grid_check"] = row["grid_check"]["passed"]
    summary["calibration_check"] = row["calibration_check"]["passed"]
    print(json.dumps(summary))
    print(f"saved {args.out}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child_main(*sys.argv[2:])
    else:
        main()
