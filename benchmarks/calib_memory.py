"""Calibration memory: peak GPU (or host) memory and wall time of each calibration mode.

The question this answers (issue 3): does single-instance calibration hold less than sequential?
Sequential keeps every calibration window's hidden states for the current layer resident (two
streams when compensating); single-instance streams the windows one at a time but keeps every
linear's Hessian until its layer is quantized. Which is smaller depends on calibration tokens
versus model width, so the benchmark measures it instead of arguing it, and adds
``--offload-hessians`` (Hessians in host memory, each batch's X^T X formed on the GPU) and
``--hessian-budget-mib`` (at most that many MiB of Hessians at once, the rest on disk).

The model has a real architecture's shapes with random weights (memory and time depend only on
shapes; nothing is downloaded); calibration windows are random token ids. Every mode runs in its
own child process, so each peak is its own: GPU peak is `torch.cuda.max_memory_allocated`, host
peak is VmHWM.

    python benchmarks/calib_memory.py --device cuda                  # SmolLM2-135M shapes, 128 x 2048
    python benchmarks/calib_memory.py --shape qwen2.5-0.5b --nsamples 64
    python benchmarks/calib_memory.py --device cpu --nsamples 16 --seqlen 512
    python benchmarks/calib_memory.py --device cpu --layers 2 --modes gptq-sequential   # activations dominate
    python benchmarks/calib_memory.py --device cpu --modes gptq-sequential,rpiq-single-instance-budget
    python benchmarks/calib_memory.py --device cpu --nsamples 4 --modes rpiq-single-instance-budget \
        --hessian-budget-mib 64 --calibration '{"instance_windows": 1}'   # single-instance's peak: one window resident

Prints a table and saves JSON (default benchmarks/results/calib_memory_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path
from typing import Any

from memory import in_child, peak_rss_mb
from report import calibration_fields

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# config.json numbers of the real models (random weights here).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
}  # fmt: skip

# (label, method, calibration options)
MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "gptq-sequential": ("gptq", dict(mode="sequential")),
    "rpiq-sequential": ("rpiq", dict(mode="sequential")),  # compensated: two streams
    "rpiq-single-instance": ("rpiq", dict(mode="single-instance")),
    "rpiq-single-instance-offload": ("rpiq", dict(mode="single-instance", offload_hessians=True)),
    # Hessians held at most --hessian-budget-mib at a time, the rest on disk (several pass-1 streams).
    "rpiq-single-instance-budget": ("rpiq", dict(mode="single-instance", hessian_budget_mib=None)),
}


def _run(job: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    shape, mode, args = job
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantizer.config import CalibrationConfig, GridConfig, quant_config
    from quantizer.pipeline import quantize_model

    spec = dict(SHAPES[shape])
    if args["layers"]:
        spec["num_hidden_layers"] = args["layers"]
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    dtype = getattr(torch, args["dtype"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    calib = torch.randint(0, config.vocab_size, (args["nsamples"], args["seqlen"]))
    method, cal = MODES[mode]
    if "hessian_budget_mib" in cal:
        cal = dict(cal, hessian_budget_mib=args["hessian_budget_mib"])
    if cal["mode"] == "single-instance":  # --calibration: single-instance options (kept windows, fit)
        cal = dict(cal, **args.get("calibration", {}))
    cfg = quant_config(method, grid=GridConfig(bits=4, group_size=128), calibration=CalibrationConfig(**cal))
    cuda = args["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = quantize_model(model, calib, cfg, device=args["device"], progress=False)
    seconds = time.perf_counter() - t0
    return dict(
        shape=shape,
        mode=mode,
        hessian_budget_mib=cal.get("hessian_budget_mib"),
        calibration={k: v for k, v in cal.items() if k not in ("mode", "hessian_budget_mib")},
        seconds=round(seconds, 1),
        gpu_peak_mib=round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        host_peak_mib=round(peak_rss_mb()),
        weights_mib=round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20),
        linears=len(result.weights),
        total_loss=result.total_loss,
    )


def run_one(shape: str, mode: str, args: dict[str, Any]) -> dict[str, Any]:
    """One mode in its own process; a failure (e.g. out of GPU memory) becomes a row, not the end."""
    try:
        return in_child(_run, (shape, mode, args))
    except Exception as e:
        return dict(shape=shape, mode=mode, error=f"{type(e).__name__}: {e}")


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n| shape | mode | wall s | GPU peak MiB | host peak MiB | weights MiB |\n|{'---|' * 6}")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['mode']} | {r['error']} | | | |")
            continue
        gpu = "-" if r["gpu_peak_mib"] is None else r["gpu_peak_mib"]
        print(f"| {r['shape']} | {r['mode']} | {r['seconds']} | {gpu} | {r['host_peak_mib']} | {r['weights_mib']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default="smollm2-135m", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (a quick probe)")
    ap.add_argument("--hessian-budget-mib", type=float, default=128.0, help="for rpiq-single-instance-budget")
    ap.add_argument(
        "--calibration",
        type=calibration_fields,
        default={},
        help="extra CalibrationConfig fields (JSON) for the single-instance modes",
    )
    ap.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    shapes, modes = a.shape.split(","), a.modes.split(",")
    unknown = [s for s in shapes if s not in SHAPES] + [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown shape or mode: {', '.join(unknown)}")
    args = dict(device=a.device, nsamples=a.nsamples, seqlen=a.seqlen, layers=a.layers,
                hessian_budget_mib=a.hessian_budget_mib, calibration=a.calibration,
                dtype=a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))  # fmt: skip
    out = a.out or RESULTS / f"calib_memory_{a.device}.json"

    import torch

    machine = dict(platform=platform.platform(), cpus=mp.cpu_count(), torch=torch.__version__)
    if a.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        for mode in modes:
            rows.append(run_one(shape, mode, args))
            print(json.dumps(rows[-1]), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(dict(command=" ".join(sys.argv), settings=args, machine=machine, rows=rows),
                                      indent=2))  # fmt: skip
    print_table(rows)
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
