"""Layer loss of RTN / GPTQ / RPIQ on real weights with inputs captured from real text.

Takes linear layers of the embedded model (SmolLM2-135M-Instruct) at a few depths, builds
their Hessians from calibration windows of the built-in corpus in one streaming pass, then
quantizes each layer with every method x bits x group size and prints a table of summed layer
loss `tr(E H E^T)` and time; `--ablation` also sweeps the stage-2 switches (rounds, alpha,
acceptance, backtracking, grid re-fit, refinement block size) at 3 and 4 bits. Held-out
Hessians (from windows of a different book) are used to show whether a lower calibration loss
carries over to unseen text. Results go to `benchmarks/results/layer_loss.json`.

    python benchmarks/layer_loss.py                 # ~3 min on 2 CPU cores
    python benchmarks/layer_loss.py --ablation      # ~10 min
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from models.loading import load_fp_model
from quantizer.adapters import get_adapter
from quantizer.config import AblationConfig, GPTQConfig, GridConfig, QuantConfig, RefineConfig, RPIQConfig, quant_config
from quantizer.data import calibration_windows, load_text
from quantizer.layer import layer_loss, quantize_weight
from quantizer.single_instance import stream_hessians

RESULTS = Path(__file__).parent / "results"


def capture(model, tok, layer_indices: list[int], nsamples: int, seqlen: int, text: str, seed: int):
    adapter = get_adapter(model)
    windows = calibration_windows(tok, load_text(text), nsamples, seqlen, seed=seed)
    per_layer = stream_hessians(model, adapter, windows, layer_indices, torch.device("cpu"))
    layers = adapter.layers(model)
    out = {}
    for i, catchers in zip(layer_indices, per_layer, strict=True):
        for c in catchers:
            for name, module in c.modules.items():
                out[f"layers.{i}.{name}"] = (module.weight.detach().float().clone(), c.hessian(name).clone())
    del layers
    return out


def run(layers_data, heldout, cfg: QuantConfig) -> dict:
    calib_loss = held_loss = 0.0
    seconds = 0.0
    for name, (W, H) in layers_data.items():
        t0 = time.perf_counter()
        qw, rep = quantize_weight(W, H, cfg, name=name)
        seconds += time.perf_counter() - t0
        calib_loss += rep.loss_final
        held_loss += layer_loss(W, qw.dequantize(), heldout[name][1])
    return {"calib_loss": calib_loss, "heldout_loss": held_loss, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    ap.add_argument("--layers", default="0,15,29", help="decoder layer indices to take linears from")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ablation", action="store_true", help="also sweep the stage-2 switches")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes)")
    ap.add_argument("--out", type=Path, default=RESULTS / "layer_loss.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)

    model, tok, where = load_fp_model(args.model)
    idx = [int(i) for i in args.layers.split(",")]
    console.print(f"capturing Hessians of layers {idx} from {args.nsamples} x {args.seqlen} tokens ...")
    data = capture(model, tok, idx, args.nsamples, args.seqlen, "calib", seed=0)
    heldout = capture(model, tok, idx, max(8, args.nsamples // 2), args.seqlen, "heldout", seed=1)

    rows = []
    for bits in (4, 3):
        for gs in (128, -1):
            for method in ("rtn", "gptq", "rpiq"):
                cfg = quant_config(method, grid=GridConfig(bits=bits, group_size=gs))
                r = run(data, heldout, cfg)
                rows.append({"table": "main", "method": method, "bits": bits, "group_size": gs, **r})
                console.print(rows[-1])

    if args.ablation:
        variants = {
            "rounds=1": {"rounds": 1},
            "rounds=2": {"rounds": 2},
            "rounds=8": {"rounds": 8, "tol": 0.0},
            "alpha=0.25": {"alpha": 0.25},
            "alpha=0.5": {"alpha": 0.5},
            "accept=block": {"accept": "block"},
            "accept=always": {"accept": "always"},
            "backtrack=0": {"backtrack": 0},
            "backtrack=3": {"backtrack": 3},
            "refit_grid": {"refit_grid": True},
            "refine_block=32": {"block_size": 32},
            "refine_block=64": {"block_size": 64},
        }
        for bits in (4, 3):
            gptq_cfg = quant_config("gptq", grid=GridConfig(bits=bits, group_size=128))
            ref = run(data, heldout, gptq_cfg)
            for label, change in {"default": {}, **variants}.items():
                # accept, backtrack, refit_grid are ablation switches; the rest stage-2 settings.
                ablation = {k: v for k, v in change.items() if k in AblationConfig.model_fields}
                refine = {k: v for k, v in change.items() if k not in ablation}
                cfg = RPIQConfig(
                    grid=GridConfig(bits=bits, group_size=128),
                    refine=RefineConfig(**refine),
                    ablation=AblationConfig(**ablation),
                )
                r = run(data, heldout, cfg)
                r["calib_gain_vs_gptq"] = 1 - r["calib_loss"] / ref["calib_loss"]
                r["heldout_gain_vs_gptq"] = 1 - r["heldout_loss"] / ref["heldout_loss"]
                rows.append({"table": "ablation", "variant": label, "bits": bits, "group_size": 128, **r})
                console.print(rows[-1])
            act = RPIQConfig(grid=GridConfig(bits=bits, group_size=128), gptq=GPTQConfig(act_order=True))
            r = run(data, heldout, act)
            r["calib_gain_vs_gptq"] = 1 - r["calib_loss"] / ref["calib_loss"]
            r["heldout_gain_vs_gptq"] = 1 - r["heldout_loss"] / ref["heldout_loss"]
            rows.append({"table": "ablation", "variant": "act_order", "bits": bits, "group_size": 128, **r})

    _print(console, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/layer_loss.py" + (" --ablation" if args.ablation else ""),
        "model": str(where),
        "layers": idx,
        "linears": len(data),
        "calibration": f"{args.nsamples} x {args.seqlen} tokens of the built-in 'calib' text, seed 0",
        "heldout": "Hessians from 'heldout' text windows, seed 1",
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} torch threads".strip(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    console.print(f"saved {args.out}")


def _print(console: Console, rows: list[dict]) -> None:
    main_rows = [r for r in rows if r["table"] == "main"]
    t = Table(title="summed layer loss tr(E H E^T) on real layers (lower is better)")
    for col in ("bits", "group", "method", "calib loss", "held-out loss", "vs GPTQ (held-out)", "time s"):
        t.add_column(col, justify="right")
    for r in main_rows:
        g = next(
            x
            for x in main_rows
            if x["bits"] == r["bits"] and x["group_size"] == r["group_size"] and x["method"] == "gptq"
        )
        t.add_row(
            str(r["bits"]),
            str(r["group_size"]),
            r["method"],
            f"{r['calib_loss']:.4g}",
            f"{r['heldout_loss']:.4g}",
            f"{100 * (1 - r['heldout_loss'] / g['heldout_loss']):+.1f}%",
            f"{r['seconds']:.2f}",
        )
    console.print(t)
    abl = [r for r in rows if r["table"] == "ablation"]
    if abl:
        t = Table(title="stage-2 ablation, g128: gain over GPTQ (positive = lower loss)")
        for col in ("bits", "variant", "calib gain", "held-out gain", "time s"):
            t.add_column(col, justify="right")
        for r in abl:
            t.add_row(
                str(r["bits"]),
                r["variant"],
                f"{100 * r['calib_gain_vs_gptq']:+.1f}%",
                f"{100 * r['heldout_gain_vs_gptq']:+.1f}%",
                f"{r['seconds']:.2f}",
            )
        console.print(t)


if __name__ == "__main__":
    main()
