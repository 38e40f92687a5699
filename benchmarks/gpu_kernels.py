"""One decoder layer's seven projections at batch 1: bf16 vs each int4 kernel, eager and CUDA-graphed.

Why this and not a whole model: decode at batch 1 is the weight read of these matmuls plus one
launch per op; the issue's target (int4 >= 2.5x bf16 at Llama-2-7B shapes) is about exactly that.
Attention, norms and the KV cache are left out (int4 does not change them). Each kernel is timed
eagerly (what the generation loop does today) and replayed from a CUDA graph (launch overhead
removed; what a graphed decode step would see). Weights are random GPTQ codes, g128.

    python benchmarks/gpu_kernels.py --out benchmarks/results/gpu_kernels.json       # on a GPU
    python benchmarks/gpu_kernels.py --device cpu --models tiny --iters 3           # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptq_format import QuantizedWeight
from models.int4 import KERNELS, KernelUnavailableError

# (hidden, intermediate, q heads, kv heads, head dim)
MODELS: dict[str, tuple[int, int, int, int, int]] = {
    "llama2-7b": (4096, 11008, 32, 32, 128),
    "qwen2.5-0.5b": (896, 4864, 14, 2, 64),
    "tiny": (256, 704, 4, 2, 64),
}


def layer_shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, out, in) of q, k, v, o, gate, up, down."""
    h, inter, nq, nkv, hd = MODELS[model]
    return [
        ("q", nq * hd, h),
        ("k", nkv * hd, h),
        ("v", nkv * hd, h),
        ("o", h, nq * hd),
        ("gate", inter, h),
        ("up", inter, h),
        ("down", h, inter),
    ]


def random_gptq(out_f: int, in_f: int, group: int = 128, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    groups = -(-in_f // group)
    return QuantizedWeight(
        codes=torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8, generator=g),
        scales=(torch.rand(groups, out_f, generator=g) * 0.01 + 0.001).half().float(),
        zeros=torch.randint(0, 16, (groups, out_f), dtype=torch.int32, generator=g),
        g_idx=(torch.arange(in_f) // group).to(torch.int32),
        bits=4,
        group_size=group,
        sym=False,
    )


def build(kind: str, model: str, device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (_, out_f, in_f) in enumerate(layer_shapes(model)):
        if kind == "dense":
            layers.append(nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False))
        else:
            qw = random_gptq(out_f, in_f, seed=i)
            cls = KERNELS[kind]
            reason = cls.unavailable(device) or cls.unsupported(qw)
            if reason:
                raise KernelUnavailableError(reason)
            layers.append(cls.from_weight(qw, None, device, dtype))
    return layers


def step_fn(layers: list[nn.Module], model: str, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """One decode step through the seven projections, on static inputs (graph-capturable)."""
    xs = [torch.randn(1, in_f, device=device, dtype=dtype) for _, _, in_f in layer_shapes(model)]

    def step() -> None:
        for layer, x in zip(layers, xs, strict=True):
            layer(x)

    return step


def timed(fn: Callable[[], None], device: torch.device, iters: int) -> float:
    """Mean milliseconds per call over `iters` calls after warm-up."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1000 / iters


def graphed(fn: Callable[[], None]) -> Callable[[], None]:
    """Capture `fn` once in a CUDA graph (after warm-up on a side stream) and return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run(models: list[str], kernels: list[str], device: torch.device, dtype: torch.dtype, iters: int) -> list[dict]:
    rows: list[dict] = []
    for model in models:
        weight_gb = sum(o * i for _, o, i in layer_shapes(model)) * 2 / 1e9
        base: dict[str, float] = {}
        for kind in ["dense", *kernels]:
            row: dict = {"model": model, "kernel": kind if kind != "dense" else str(dtype).split(".")[-1]}
            try:
                layers = build(kind, model, device, dtype)
            except (KernelUnavailableError, ImportError, RuntimeError) as e:
                rows.append({**row, "skipped": str(e)})
                continue
            step = step_fn(layers, model, device, dtype)
            with torch.inference_mode():
                row["eager_ms"] = timed(step, device, iters)
                if device.type == "cuda":
                    try:
                        row["graph_ms"] = timed(graphed(step), device, iters)
                    except RuntimeError as e:  # a kernel that cannot be captured says so, the rest still runs
                        row["graph_error"] = str(e)[:200]
            for mode in ("eager_ms", "graph_ms"):
                if mode in row:
                    base.setdefault(mode, row[mode])
                    row[mode.replace("_ms", "_speedup")] = base[mode] / row[mode]
            row["dense_weight_gb_per_s"] = weight_gb / (row["eager_ms"] / 1000)
            rows.append(row)
            del layers
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<14}{'kernel':<15}{'eager ms':>10}{'x dense':>9}{'graph ms':>10}{'x dense':>9}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:<14}{r['kernel']:<15}  skipped: {r['skipped']}")
            continue
        g = f"{r['graph_ms']:>10.4f}{r['graph_speedup']:>9.2f}" if "graph_ms" in r else f"{'-':>10}{'-':>9}"
        print(f"{r['model']:<14}{r['kernel']:<15}{r['eager_ms']:>10.4f}{r['eager_speedup']:>9.2f}{g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--models", nargs="+", default=["llama2-7b", "qwen2.5-0.5b"], choices=list(MODELS))
    ap.add_argument("--kernels", nargs="+", default=None, help="default: every int4 kernel for the device")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    kernels = args.kernels or [k for k, c in KERNELS.items() if c.device_type in (device.type, None)]
    rows = run(args.models, kernels, device, getattr(torch, args.dtype), args.iters)
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "device": args.device, "dtype": args.dtype, "batch": 1, "group": 128}
        if device.type == "cuda":
            meta["gpu"] = torch.cuda.get_device_name(device)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
