"""Answer latency on a busy CPU: one 32-token answer of the embedded model, idle and with CPU hogs
competing, for the thread count `rpiq serve` now chooses (`server.cpus.usable_cpus`) against torch's
default and a single thread.

    python benchmarks/busy_cpu.py                     # 2 hogs, 3 timed answers per cell
    python benchmarks/busy_cpu.py --hogs 4 --reps 3

Why: on a 2-core board shared with other work, a thread count above the CPUs really free makes every
parallel region wait for a descheduled thread; answers measured 5-11x slower and timed out. The hogs
are plain busy-loop processes that end by themselves after `--hog-seconds` (and are killed at the end).
JSON goes to benchmarks/results/busy_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.inference import GenerationOptions  # noqa: E402
from server.cpus import cgroup_cpu_limit, usable_cpus  # noqa: E402
from server.engine import Engine  # noqa: E402

MESSAGES = [{"role": "user", "content": "Describe, in several sentences, a kitchen seen by a camera."}]
HOG = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


def start_hogs(n: int, seconds: float) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", HOG.format(s=seconds)]) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for p in hogs:
        p.kill()
        p.wait()


def answer_seconds(engine: Engine, tokens: int) -> tuple[float, int]:
    options = GenerationOptions(max_new_tokens=tokens)
    result = engine.generate(MESSAGES, options, threading.Event())
    return result.seconds, result.completion_tokens


def measure(engine: Engine, thread_counts: list[int], reps: int, tokens: int) -> dict[int, dict]:
    """Median answer time per thread count; the counts take turns in every round, so a burst of other
    work on the host hits them alike instead of spoiling one."""
    secs: dict[int, list[float]] = {t: [] for t in thread_counts}
    n = 0
    for t in thread_counts:  # warm-up: each thread pool at its size
        torch.set_num_threads(t)
        answer_seconds(engine, 4)
    for _ in range(reps):
        for t in thread_counts:
            torch.set_num_threads(t)
            s, n = answer_seconds(engine, tokens)
            secs[t].append(s)
    return {
        t: {"threads": t, "seconds": v, "median_s": statistics.median(v), "tokens": n,
            "ms_per_token": 1000 * statistics.median(v) / max(n, 1)}
        for t, v in secs.items()
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hogs", type=int, default=2, help="busy-loop processes competing for the CPUs")
    ap.add_argument("--reps", type=int, default=3, help="timed answers per cell")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--hog-seconds", type=float, default=90, help="a hog ends by itself after this long")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "busy_cpu.json")
    args = ap.parse_args()

    torch_default = torch.get_num_threads()  # before anything sets it
    chosen = usable_cpus()
    configs = {f"usable_cpus ({chosen})": chosen, f"torch default ({torch_default})": torch_default, "one thread": 1}
    engine = Engine(None, threads=None)  # the embedded default model, full precision
    engine.load()
    cells = []
    for load in (0, args.hogs):
        hogs = start_hogs(load, args.hog_seconds) if load else []
        try:  # the same thread count (e.g. torch's default = usable_cpus) is measured once
            done = measure(engine, sorted(set(configs.values())), args.reps, args.tokens)
        finally:
            stop_hogs(hogs)
        for label, threads in configs.items():
            cells.append({"config": label, "hogs": load, **done[threads]})
            print(f"hogs={load} {label:22s} {done[threads]['median_s']:6.2f} s", flush=True)

    print(f"\n{'threads':24s} {'hogs':>4s} {'median s':>9s} {'ms/token':>9s} {'tokens':>6s}")
    for c in cells:
        print(f"{c['config']:24s} {c['hogs']:4d} {c['median_s']:9.2f} {c['ms_per_token']:9.1f} {c['tokens']:6d}")
    report = {
        "machine": {"cpus_affinity": len(os.sched_getaffinity(0)), "cgroup_cpu_limit": cgroup_cpu_limit(),
                    "usable_cpus": chosen, "torch_default_threads": torch_default, "platform": platform.platform(),
                    "torch": torch.__version__},
        "model": engine.name, "tokens": args.tokens, "reps": args.reps, "cells": cells,
        "note": "load 0 is this process alone, not an idle machine: other work on the host still counts",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
