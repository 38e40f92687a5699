"""GPTQModel's GPTQ (v1) and GPTQ v2 (GPTAQ) on the same model, windows and text as our methods.

The strongest public GPTQ next to ours and llm-compressor's (``reference_gptq.py``): GPTQModel
(ModelCloud) quantizes the model on the CPU with its own loop (``GPTQModel.load`` +
``model.quantize``), calibrated on exactly our token windows (``quantizer.data.calibration_windows``
on the built-in ``calib`` text). ``--variant v2`` turns on GPTAQ (``GPTAQConfig(alpha=0.25)``:
each layer fits the *full-precision* model's outputs from its quantized-model inputs, the
asymmetric-calibration idea that RPIQ's compensation shares). The packed result (codes, fp16
scales, zeros) is dequantized to float32, written into the full-precision model loaded by *our*
loader, and scored with *our* ``quantizer.evaluate.perplexity`` on *our* ``evaluation_windows``:
the evaluation is identical to every other row. A grid check proves that the weights changed and
lie on a ``2**bits``-level grid per (row, group); a cross-check scores the first evaluation window
with the library's own quantized modules too.

GPTQModel declares a CUDA torch (``torch>=2.14.1``) and ``transformers>=5.20.2`` (llm-compressor's
``.venv-ref`` pins 5.17), so it lives in its own venv on the project's CPU torch:

    bash scripts/install_reference.sh gptqmodel
    .venv-gptqmodel/bin/python benchmarks/gptqmodel_worker.py --variant v2 --bits 3 --group-size 128 \\
        --nsamples 32 --seqlen 512 --seed 0 --eval heldout --eval2 code --out OUT.json

Run as its own process (``benchmarks/report.py`` starts one per row), so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the rpiq repo is not installed into .venv-gptqmodel: import it from the tree
    sys.path.insert(0, str(ROOT))

from memory import peak_rss_mb  # noqa: E402 - benchmarks/ is the script's directory, already on sys.path
from reference_common import add_run_args, versions  # noqa: E402

LIBRARY = "gptqmodel"
VERSIONED = ("gptqmodel", "torch", "transformers", "accelerate", "torchao", "tokenicer", "defuser")
GRID_CHECK_MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
CPU_WORKERS = "2"
"""GPTQModel's default CPU thread pool has (cores + 1) // 2 workers but its model loader asks for 2:
on a 2-core machine ``GPTQModel.load`` fails with "Virtual pool 'model_loader:cpu' requests 2 workers
but parent 'cpu' only has 1". ``GPTQMODEL_CPU_WORKERS=2`` (its own override) avoids that."""


def quantize_config(variant: str, bits: int, group_size: int, percdamp: float, alpha: float):
    """GPTQModel's settings closest to our default GPTQ (quantizer.config): asymmetric min/max grid,
    no act-order (and no group-aware reordering, GPTQModel's default), dynamic groups (each group's
    grid fit when GPTQ reaches it, as ours), true-sequential, damping 1 %, lm_head unquantized."""
    from gptqmodel import GPTAQConfig, QuantizeConfig

    return QuantizeConfig(
        bits=bits,
        group_size=group_size,
        sym=False,
        desc_act=False,
        act_group_aware=False,
        static_groups=False,
        true_sequential=True,
        damp_percent=percdamp,
        mse=0.0,
        lm_head=False,
        device="cpu",
        offload_to_disk=False,
        gptaq=GPTAQConfig(alpha=alpha, device="cpu") if variant == "v2" else None,
    )


def _dequantized(mod):
    """A packed GPTQModel linear's weight as float32 [out, in], its fp16 scales [groups, out], its g_idx."""
    import torch
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear

    with torch.inference_mode():  # the library made its buffers as inference tensors
        scales = mod.scales.detach().clone()
        mod.scales.data = scales.float()  # dequantize in float32: scale * (code - zero), exactly
        try:
            w = PackableQuantLinear.dequantize_weight(mod).T.float()
        finally:
            mod.scales.data = scales
        g_idx = mod.g_idx.detach().long()
    # clones made outside inference mode are ordinary tensors
    return w.clone(), scales.clone(), g_idx.clone()


def _grid_check(w, w0, scales, g_idx, bits: int) -> dict:
    """Every (row, group) holds <= 2**bits values, all on scale * integer + offset, codes in range."""
    import torch

    out_f, in_f = w.shape
    n_groups = scales.shape[0]
    s = scales.float().T  # [out, groups]
    distinct, max_res, max_span = [], 0.0, 0.0
    for g in range(n_groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols]
        lo = wg.min(dim=1, keepdim=True).values
        steps = (wg - lo) / s[:, g : g + 1]
        max_res = max(max_res, float((steps - steps.round()).abs().max()))
        max_span = max(max_span, float(steps.round().max()))
        distinct.append(max(torch.unique(wg[r]).numel() for r in range(out_f)))
    rel_change = float((w - w0).norm() / w0.norm())
    m = {
        "shape": [out_f, in_f],
        "n_groups_per_row": n_groups,
        "max_distinct_per_group": max(distinct),
        "max_step_residual": max_res,
        "max_code_span": max_span,
        "fraction_weights_changed": float((w != w0).float().mean()),
        "relative_weight_change": rel_change,
        "scale_dtype": str(scales.dtype),
    }
    m["passed"] = (
        m["max_distinct_per_group"] <= 2**bits and max_res < 1e-2 and max_span <= 2**bits - 1 and rel_change > 1e-4
    )
    return m


def run(job: dict) -> dict:
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    from models.loading import load_fp_model
    from quantizer.data import calibration_windows, evaluation_windows, load_text
    from quantizer.evaluate import perplexity

    torch.manual_seed(0)
    fp_model, tok, _ = load_fp_model(job["model"])
    calib = calibration_windows(tok, load_text("calib"), job["nsamples"], job["seqlen"], seed=job["seed"])
    data = [{"input_ids": c.tolist(), "attention_mask": [1] * len(c)} for c in calib]

    qcfg = quantize_config(job["variant"], job["bits"], job["group_size"], job["percdamp"], job["alpha"])
    default_threads = torch.get_num_threads()
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    gm = GPTQModel.load(job["model"], qcfg, dtype=torch.float32)
    load_seconds = time.perf_counter() - t0

    # Record the token ids the library really feeds the model during calibration.
    seen: list[torch.Tensor] = []

    def record(_m, args) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].device.type != "meta":
            seen.append(args[0].detach().cpu().clone())

    handle = gm.model.get_input_embeddings().register_forward_pre_hook(record)
    t0 = time.perf_counter()
    gm.quantize(data, batch_size=1)
    quantize_seconds = time.perf_counter() - t0
    handle.remove()
    torch.set_num_threads(default_threads)
    peak_rss = peak_rss_mb()
    # The checkpoint as the library writes it (GPTQ format, v1 zeros), loaded back with its torch
    # kernel: its in-memory modules right after quantize() still hold v1 zeros (stored zero - 1),
    # which its loader converts; dequantizing them directly is off by one grid step.
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gptqmodel_") as ckpt:
        gm.save(ckpt)
        checkpoint_mb = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors")) / 2**20
        del gm
        gm = GPTQModel.load(ckpt, device="cpu", backend=BACKEND.GPTQ_TORCH)
    save_load_seconds = time.perf_counter() - t0

    fed = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen if s.shape[-1] == job["seqlen"]]) if seen else None
    uniq = torch.unique(fed, dim=0) if fed is not None else torch.empty(0, job["seqlen"], dtype=torch.long)
    calib_check = {
        "embedding_calls": len(seen),
        "distinct_windows_fed": int(uniq.shape[0]),
        "all_our_windows_fed": all(any(torch.equal(c, u) for u in uniq) for c in calib),
        "only_our_windows_fed": all(any(torch.equal(u, c) for c in calib) for u in uniq),
        "shapes_fed": sorted({tuple(s.shape) for s in seen}),
    }
    calib_check["passed"] = calib_check["all_our_windows_fed"] and calib_check["only_our_windows_fed"]

    # The library's packed weights, dequantized, into our full-precision model.
    layers = fp_model.model.layers
    picks = {
        f"model.layers.{i}.{n}" for i in sorted({0, len(layers) // 2, len(layers) - 1}) for n in GRID_CHECK_MODULES
    }
    qmods = {n: m for n, m in gm.model.named_modules() if isinstance(m, BaseQuantLinear)}
    linears = [n for n, m in fp_model.named_modules() if isinstance(m, torch.nn.Linear)]
    grid: dict = {
        "bits": job["bits"],
        "group_size": job["group_size"],
        "levels_allowed": 2 ** job["bits"],
        "modules": {},
    }
    kinds = sorted({type(m).__name__ for m in qmods.values()})
    with torch.no_grad():
        for name, qm in qmods.items():
            w, scales, g_idx = _dequantized(qm)
            target = fp_model.get_submodule(name)
            if name in picks:
                grid["modules"][name] = _grid_check(w, target.weight.detach().float(), scales, g_idx, job["bits"])
            target.weight.copy_(w.to(target.weight.dtype))
    grid["passed"] = bool(grid["modules"]) and all(m["passed"] for m in grid["modules"].values())
    quantized = {"linear": len(linears), "quantized": len(qmods), "not_quantized": sorted(set(linears) - set(qmods))}

    ev = evaluation_windows(tok, load_text(job["eval"]), job["eval_seqlen"], max_windows=job["eval_windows"])
    # Cross-check on the first window: the library's own quantized forward against our dense copy.
    library_ppl1 = perplexity(gm.model, ev[:1])
    ours_ppl1 = perplexity(fp_model, ev[:1])
    library_dtype = str(next(gm.model.parameters()).dtype)
    del gm
    row = {
        "method": f"gptqmodel-{job['variant']}",
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
        "load_seconds": load_seconds,
        "quantize_seconds": quantize_seconds,
        "save_reload_seconds": save_load_seconds,
        "checkpoint_mb": checkpoint_mb,
        "quantize_threads": job["threads"] or default_threads,
        "eval_threads": default_threads,
        "peak_rss_mb_before_eval": peak_rss,
        "calibration_check": calib_check,
        "grid_check": grid,
        "quantized_linears": quantized,
        "quant_linear_classes": kinds,
        "library_forward_check": {
            "window": 0,
            "ppl_library_modules": library_ppl1,
            "ppl_dequantized_into_our_model": ours_ppl1,
            "library_model_dtype": library_dtype,
            "relative_difference": abs(library_ppl1 - ours_ppl1) / ours_ppl1,
        },
    }
    t1 = time.perf_counter()
    row["ppl"] = perplexity(fp_model, ev)
    row["eval_seconds"] = time.perf_counter() - t1
    if job.get("eval2"):
        ev2 = evaluation_windows(tok, load_text(job["eval2"]), job["eval_seqlen"], max_windows=job["eval_windows"])
        row["eval2"] = job["eval2"]
        row["ppl_eval2"] = perplexity(fp_model, ev2)
    if job.get("fp_ppl"):
        fp_model, _, _ = load_fp_model(job["model"])
        row["fp_ppl_this_env"] = perplexity(fp_model, ev)
    row["settings_resolved"] = {k: str(v) for k, v in vars(qcfg).items() if not k.startswith("_")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=("v1", "v2"), default="v2", help="v1: GPTQ; v2: GPTAQ (GPTQ v2)")
    add_run_args(ap)
    ap.add_argument("--percdamp", type=float, default=0.01, help="QuantizeConfig.damp_percent (ours: 0.01)")
    ap.add_argument("--alpha", type=float, default=0.25, help="GPTAQConfig.alpha for v2 (the library's default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads during quantization (0 = torch's default)")
    ap.add_argument("--fp-ppl", action="store_true", help="also measure FP perplexity in this venv")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", CPU_WORKERS)
    from models.loading import resolve_model

    job = {
        "model": str(resolve_model(args.model)), "variant": args.variant, "bits": args.bits,
        "group_size": args.group_size, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
        "eval": args.eval, "eval2": args.eval2, "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows,
        "percdamp": args.percdamp, "alpha": args.alpha, "threads": args.threads, "fp_ppl": args.fp_ppl,
    }  # fmt: skip
    t0 = time.perf_counter()
    row = run(job)
    row["wall_seconds"] = time.perf_counter() - t0
    row["library"] = LIBRARY
    row["versions"] = versions(VERSIONED)
    row["settings"] = {
        "algorithm": "gptqmodel.GPTQModel.load(model, QuantizeConfig) + .quantize(our windows, batch_size=1)"
        + (f"; GPTAQConfig(alpha={args.alpha}) (GPTQ v2)" if args.variant == "v2" else ""),
        "device": "cpu",
        "bits": args.bits,
        "symmetric": False,
        "group_size": args.group_size,
        "desc_act": False,
        "act_group_aware": False,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": args.percdamp,
        "gptaq_alpha": args.alpha if args.variant == "v2" else None,
        "mse": 0.0,
        "lm_head": False,
        "calibration": "our quantizer.data.calibration_windows(tok, load_text('calib'), nsamples, seqlen, seed)",
        "batch_size": 1,
        "model_dtype": "float32",
        "evaluation": "packed weights dequantized to float32 (fp16 scale * (code - zero)) in our FP model; "
        "our quantizer.evaluate.perplexity on our evaluation_windows",
        "env": {"GPTQMODEL_CPU_WORKERS": os.environ["GPTQMODEL_CPU_WORKERS"]},
    }
    row["command"] = "python benchmarks/gptqmodel_worker.py " + " ".join(sys.argv[1:])
    row["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    row["date"] = time.strftime("%Y-%m-%d")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(row, indent=1, default=str))
    tmp.replace(args.out)
    summary = {k: row.get(k) for k in ("method", "bits", "group_size", "ppl", "ppl_eval2", "quantize_seconds")}
    summary["grid_check"] = row["grid_check"]["passed"]
    summary["calibration_check"] = row["calibration_check"]["passed"]
    summary["library_forward_rel_diff"] = row["library_forward_check"]["relative_difference"]
    print(json.dumps(summary))
    print(f"saved {args.out}")
    if not math.isfinite(row["ppl"]):
        raise SystemExit("gptqmodel_worker: perplexity is not finite")


if __name__ == "__main__":
    main()
