"""Int4 inference speed and memory: synthetic decoder layers at 0.5B/1.5B/7B shapes and the embedded model.

Two parts, every configuration in its own child process (so peak RSS is its own):

* ``layers``: one decoder layer's seven linears (q, k, v, o, gate, up, down) at the shapes of
  Qwen2.5-0.5B, Qwen2.5-1.5B and Llama-2-7B, as dense fp32/bf16 (CPU) or fp16/bf16 (CUDA) and
  as int4 (tinygemm, g128); time per token at batch 1 and 8, and the memory-bandwidth bound:
  bytes the layer must read per decode step divided by the machine's measured read bandwidth.
* ``model``: the embedded model (SmolLM2-135M-Instruct) as fp32, bf16, int4 (a GPTQ w4g128
  checkpoint on int4 kernels), int4 with the LM head quantized too, and int4 with the tied
  embedding / LM head stored as int8 rows (``int4+emb8``): weight memory, peak RSS,
  prefill and decode tokens/s at batch 1 and 8, bytes read per decoded token, and perplexity.
  "decode b1" is transformers' forward a token (what `--no-lean` runs); "lean b1" is the decode loop
  rpiq uses, `models.graph_decode.token_steps`: the lean step on a CPU, a replayed CUDA graph of the
  static step on a GPU. On CUDA int4 runs once per kernel (tinygemm-cuda, and gemlite where it imports).

    python benchmarks/decode.py                         # CPU, both parts, ~10 min on 2 cores
    python benchmarks/decode.py --part layers --sizes 7b
    python benchmarks/decode.py --device cuda --out benchmarks/results/decode_cuda.json
    python benchmarks/decode.py --device cuda --part model --synthetic   # no model files needed

`--synthetic` builds SmolLM2-135M's shapes from its config with random weights and a byte tokenizer, and
RTN checkpoints of it: speed and memory do not depend on the weights' values (perplexity does: skipped),
so a machine without the embedded model (a lent GPU that reaches no registry) measures the same model.

Checkpoints are built once (GPTQ, 8 x 512 calibration tokens) under ~/.cache/rpiq/bench unless
given with --checkpoint / --checkpoint-lm-head. Prints tables and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
from pathlib import Path

from memory import in_child, peak_rss_mb

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "rpiq" / "bench"

# (hidden, intermediate, q heads x head_dim, kv heads x head_dim, decoder layers)
SHAPES = {
    "0.5b": dict(hidden=896, inter=4864, q=896, kv=128, layers=24, model="Qwen2.5-0.5B"),
    "1.5b": dict(hidden=1536, inter=8960, q=1536, kv=256, layers=28, model="Qwen2.5-1.5B"),
    "7b": dict(hidden=4096, inter=11008, q=4096, kv=4096, layers=32, model="Llama-2-7B"),
}


# --------------------------------------------------------------------------- timing helpers


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, min_seconds: float = 0.5, min_reps: int = 3) -> float:
    """Median seconds per call after one warm-up call."""
    import statistics

    fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth_gbs(device) -> float:
    """Read bandwidth of a 512 MiB tensor reduction (median of 5), GB/s: the decode-speed ceiling."""
    import torch

    x = torch.ones(128 * 2**20, dtype=torch.float32, device=device)
    return x.numel() * 4 / _time(lambda: x.sum(), device, min_seconds=0.0, min_reps=5) / 1e9


# --------------------------------------------------------------------------- part 1: layers


def _random_int4(out_f: int, in_f: int, group: int = 128):
    import torch

    from gptq_format import QuantizedWeight

    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    groups = in_f // group
    return QuantizedWeight(
        codes=torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8),
        scales=(torch.rand(groups, out_f, generator=g) * 0.01 + 0.001).half().float(),
        zeros=torch.randint(4, 12, (groups, out_f), generator=g, dtype=torch.int32),
        g_idx=(torch.arange(in_f) // group).to(torch.int32),
        bits=4,
        group_size=group,
        sym=False,
    )


def layer_shapes(size: str) -> list[tuple[str, int, int]]:
    s = SHAPES[size]
    h, i = s["hidden"], s["inter"]
    return [
        ("q", s["q"], h), ("k", s["kv"], h), ("v", s["kv"], h), ("o", h, s["q"]),
        ("gate", i, h), ("up", i, h), ("down", h, i),
    ]  # fmt: skip


def _layers_job(job: dict) -> list[dict]:
    """Runs in a child: one decoder layer's linears in one format, batch 1 and 8."""
    import torch
    from torch import nn

    from models.int4 import KERNELS

    device = torch.device(job["device"])
    fmt = job["format"]
    torch.manual_seed(0)

    def build() -> list[nn.Module]:
        mods: list[nn.Module] = []
        for _, out_f, in_f in layer_shapes(job["size"]):
            if fmt == "int4":
                kernel = "tinygemm-cuda" if device.type == "cuda" else "tinygemm-cpu"
                mods.append(KERNELS[kernel].from_weight(_random_int4(out_f, in_f), None, device, torch.bfloat16))
            else:
                dtype = getattr(torch, fmt)
                mods.append(nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False))
        return mods

    mods = build()
    weight_bytes = sum(_linear_bytes(m) for m in mods)
    # Decode streams every layer's weights once per token; timing one small layer over and over
    # would time the CPU cache instead. Cycle through copies adding up to >= 1 GiB (or the model's
    # layer count, if smaller) so each step reads from memory as a real model does.
    copies = max(1, min(SHAPES[job["size"]]["layers"], -(-(2**30) // weight_bytes)))
    stacks = [mods] + [build() for _ in range(copies - 1)]
    act = torch.bfloat16 if fmt == "int4" else getattr(torch, fmt)
    rows = []
    for batch in job["batches"]:
        xs = [torch.randn(batch, m.in_features, device=device, dtype=act) for m in mods]

        @torch.inference_mode()
        def step(xs=xs) -> None:
            for layer in stacks:
                for m, x in zip(layer, xs, strict=True):
                    m(x)

        sec = _time(step, device) / copies
        per_shape = {}
        if job["size"] == "7b" and batch == 1:  # the GPU goal is stated per GEMV shape
            for (name, out_f, in_f), m, x in zip(layer_shapes(job["size"]), mods, xs, strict=True):
                if name in ("q", "gate", "down"):
                    per_shape[f"{out_f}x{in_f}"] = _time(lambda m=m, x=x: m(x), device) * 1e3
        rows.append(
            {
                **job,
                "batch": batch,
                "layer_ms": sec * 1e3,
                "weight_mb": weight_bytes / 2**20,
                "layer_copies": copies,
                "effective_gbs": weight_bytes / sec / 1e9,
                "gemv_ms": per_shape,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    return rows


# --------------------------------------------------------------------------- part 2: the embedded model


def _linear_bytes(m) -> int:
    """Weight bytes of one dense or int4 linear (packed codes, scales and zeros for int4)."""
    from models.int4 import QuantLinear

    return m.weight_bytes() if isinstance(m, QuantLinear) else m.weight.numel() * m.weight.element_size()


def _linear_read_bytes(model) -> int:
    """Bytes of weights one decode step reads: every (quantized) linear incl. the LM head.

    Embedding tables are only indexed (a few rows per token) unless tied to the head, in which
    case the head reads them whole and they are counted through it (an int8 tied head: its table).
    """
    from torch import nn

    from models.int4 import QuantLinear, QuantTiedHead

    heads = sum(m.embedding.weight_bytes() for m in model.modules() if isinstance(m, QuantTiedHead))
    return heads + sum(_linear_bytes(m) for m in model.modules() if isinstance(m, QuantLinear | nn.Linear))


def _model_job(job: dict) -> dict:
    """Runs in a child: load one configuration, time prefill and decode, optionally perplexity."""
    import torch

    from models.inference import load_for_inference
    from models.int4 import model_weight_bytes
    from models.lean_decode import unsupported
    from quantizer.data import evaluation_windows, load_text
    from quantizer.evaluate import perplexity

    device = torch.device(job["device"])
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(job["format"])
    rss_before = peak_rss_mb()  # torch + transformers imported, nothing loaded yet
    t0 = time.perf_counter()
    try:
        model, tok, _ = load_for_inference(job["path"], device=job["device"], dtype=dtype, kernel=job["kernel"])
    except Exception as e:  # a kernel that cannot run here (gemlite without Triton): a row saying why
        return {**job, "error": f"{type(e).__name__}: {e}"}
    row = {**job, "load_seconds": time.perf_counter() - t0}
    row["kernels"] = getattr(model, "int4_kernels", {})
    row["weight_mb"] = model_weight_bytes(model) / 2**20
    row["read_mb_per_token"] = _linear_read_bytes(model) / 2**20
    # VmHWM is a high-water mark: this is the peak *while loading*, above the import baseline.
    row["load_peak_mb"] = peak_rss_mb() - rss_before
    vocab = model.config.get_text_config().vocab_size
    for batch in job["batches"]:
        prefill, decode = _prefill_decode(model, device, batch, job["prompt_tokens"], job["new_tokens"], vocab)
        row[f"prefill_tok_s_b{batch}"] = batch * job["prompt_tokens"] / prefill
        row[f"decode_tok_s_b{batch}"] = batch * job["new_tokens"] / decode
    if unsupported(model) is None:
        row["lean_tok_s_b1"] = job["new_tokens"] / _lean_decode(
            model, device, job["prompt_tokens"], job["new_tokens"], vocab
        )
    if job["ppl_windows"]:
        ev = evaluation_windows(tok, load_text("heldout"), 512, max_windows=job["ppl_windows"])
        row["ppl"] = perplexity(model, ev, device=job["device"])
    row["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def _prefill_decode(model, device, batch: int, prompt: int, new: int, vocab: int) -> tuple[float, float]:
    """Seconds for one prefill of `prompt` tokens and for `new` greedy decode steps (KV cache)."""
    import torch

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(100, vocab - 100, (batch, prompt), generator=g).to(device)

    @torch.inference_mode()
    def run(n_new: int) -> tuple[float, float]:
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(n_new):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    run(4)  # warm-up: kernels, allocator, cache
    prefill, decode = run(new)
    return prefill, decode


def _lean_decode(model, device, prompt: int, new: int, vocab: int) -> float:
    """Seconds for `new` greedy tokens through rpiq's decode loop (`token_steps`: the lean step on a CPU, a
    CUDA graph on a GPU), after a `prompt`-token prefill (not timed). The warm-up decodes as many tokens, so
    a GPU's graph for that capacity is captured before the timed run."""
    import torch

    from models.graph_decode import token_steps
    from models.lean_decode import LeanDecoder, prefill

    lean = LeanDecoder.for_model(model)
    ids = torch.randint(100, vocab - 100, (1, prompt), generator=torch.Generator().manual_seed(1)).to(device)

    @torch.inference_mode()
    def run() -> float:
        logits, cache = prefill(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        with token_steps(lean, cache, prompt + new) as step:
            _sync(device)
            t0 = time.perf_counter()
            token = int(logits.argmax())
            for i in range(new):
                token = int(step(token, prompt + i).argmax())
            _sync(device)
            return time.perf_counter() - t0

    run()
    return run()


SMOLLM2_SHAPES = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)  # fmt: skip
"""SmolLM2-135M-Instruct's config.json, the fields that decide its shapes and its decode step."""


def synthetic_model_dir(path: Path) -> Path:
    """A LlamaForCausalLM of SmolLM2-135M's shapes with random weights and a byte-level tokenizer, saved once."""
    if (path / "config.json").is_file():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPES)).to(torch.bfloat16)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def ensure_checkpoint(
    path: Path, lm_head: bool, embeddings: str = "none", model_dir: str | None = None, method: str = "gptq"
) -> Path:
    """A `method` (GPTQ) w4g128 checkpoint of the embedded model (or of `model_dir`), built once, in a child
    process; `embeddings="int8"` stores the (tied) embedding table as int8 rows too."""
    if (path / "config.json").is_file():
        return path
    import torch

    from gptq_format import save_quantized
    from models.loading import load_fp_model
    from quantizer.config import GridConfig, quant_config
    from quantizer.data import calibration_windows, load_text
    from quantizer.pipeline import quantize_model

    model, tok, _ = load_fp_model(model_dir)
    dtype = torch.bfloat16 if model.config.model_type.startswith("gemma") else torch.float16  # fp16 overflows Gemma
    calib = calibration_windows(tok, load_text("calib"), 8, 512, seed=0)
    cfg = quant_config(method, grid=GridConfig(bits=4, group_size=128, embeddings=embeddings))
    res = quantize_model(model, calib, cfg, progress=False, lm_head=lm_head)
    save_quantized(
        model,
        res.weights,
        path,
        tokenizer=tok,
        checkpoint_format="gptq_v2",
        quant_config=cfg,
        embeddings=res.embeddings,
        dtype=dtype,
    )
    return path


# --------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["layers", "model", "all"], default="all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="0.5b,1.5b,7b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppl-windows", type=int, default=8, help="heldout windows of 512 tokens; 0 = skip")
    ap.add_argument("--checkpoint", type=Path, default=CACHE / "smollm2-gptq-w4g128")
    ap.add_argument("--checkpoint-lm-head", type=Path, default=CACHE / "smollm2-gptq-w4g128-lmhead")
    ap.add_argument("--checkpoint-emb8", type=Path, default=CACHE / "smollm2-gptq-w4g128-emb8")
    ap.add_argument("--synthetic", action="store_true", help="SmolLM2 shapes, random weights, RTN checkpoints")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from models.loading import resolve_model

    console = Console(width=170)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    dense = ["float32", "bfloat16"] if device.type == "cpu" else ["float16", "bfloat16"]
    bandwidth = read_bandwidth_gbs(device)
    console.print(f"read bandwidth on {device.type}: {bandwidth:.1f} GB/s")
    result: dict = {"bandwidth_gbs": bandwidth, "layers": [], "model": []}

    if args.part in ("layers", "all"):
        for size in args.sizes.split(","):
            for fmt in [*dense, "int4"]:
                job = {"size": size, "format": fmt, "device": args.device, "batches": batches}
                result["layers"].extend(in_child(_layers_job, job))
        _layers_table(console, Table, result["layers"], bandwidth)

    if args.part in ("model", "all"):
        if args.synthetic:
            fp_dir = str(in_child(synthetic_model_dir, CACHE / "synthetic-smollm2"))
            ckpts = [CACHE / f"synthetic-smollm2-rtn-w4g128{s}" for s in ("", "-lmhead", "-emb8")]
            extra: tuple = (fp_dir, "rtn")
            args.ppl_windows = 0  # random weights: perplexity means nothing
        else:
            fp_dir = str(resolve_model(None))
            ckpts, extra = [args.checkpoint, args.checkpoint_lm_head, args.checkpoint_emb8], ()
        ckpt = in_child(_ensure_checkpoint_job, (str(ckpts[0]), False, "none", *extra))
        ckpt_head = in_child(_ensure_checkpoint_job, (str(ckpts[1]), True, "none", *extra))
        ckpt_emb8 = in_child(_ensure_checkpoint_job, (str(ckpts[2]), False, "int8", *extra))
        short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
        configs = [(short[d], fp_dir, "auto") for d in dense]
        if device.type == "cuda":  # each int4 kernel on its own (gemlite: optional extra `gpu`)
            configs += [("int4", ckpt, "tinygemm-cuda"), ("int4", ckpt, "gemlite")]
        else:
            configs += [("int4", ckpt, "auto")]
        configs += [("int4+head", ckpt_head, "auto"), ("int4+emb8", ckpt_emb8, "auto")]
        base = {
            "device": args.device, "batches": batches, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "ppl_windows": args.ppl_windows,
        }  # fmt: skip
        for fmt, path, kernel in configs:
            row = in_child(_model_job, {**base, "format": fmt, "path": path, "kernel": kernel})
            console.print({k: row[k] for k in ("format", "kernel", "weight_mb", "peak_rss_mb", "error") if k in row})
            result["model"].append(row)
        _model_table(console, Table, result["model"], bandwidth, batches)

    result["meta"] = {
        "command": "python benchmarks/decode.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out",)),
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores, torch {torch.__version__}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }
    out = args.out or RESULTS / f"decode_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    console.print(f"saved {out}")


def _ensure_checkpoint_job(arg: tuple) -> str:
    """(path, lm_head[, embeddings[, model_dir[, method]]]) -> the checkpoint directory; for `in_child`."""
    return str(ensure_checkpoint(Path(arg[0]), *arg[1:]))


def _layers_table(console, Table, rows: list[dict], bandwidth: float) -> None:
    t = Table(title="one decoder layer's linears (q,k,v,o,gate,up,down): time per step")
    for col in ("shape of", "format", "batch", "weights MB", "layer ms", "GB/s read", "% of bandwidth",
                "linears-only tok/s (all layers)", "vs bf16"):  # fmt: skip
        t.add_column(col, justify="right")
    ref = {(r["size"], r["batch"]): r["layer_ms"] for r in rows if r["format"] == "bfloat16"}
    for r in rows:
        s = SHAPES[r["size"]]
        tok_s = r["batch"] / (r["layer_ms"] / 1e3 * s["layers"])
        speedup = ref.get((r["size"], r["batch"]), float("nan")) / r["layer_ms"]
        t.add_row(
            s["model"], r["format"], str(r["batch"]), f"{r['weight_mb']:.1f}", f"{r['layer_ms']:.2f}",
            f"{r['effective_gbs']:.1f}", f"{100 * r['effective_gbs'] / bandwidth:.0f}%", f"{tok_s:.1f}",
            f"{speedup:.2f}x",
        )  # fmt: skip
    console.print(t)


def _model_table(console, Table, rows: list[dict], bandwidth: float, batches: list[int]) -> None:
    t = Table(title="embedded model (SmolLM2-135M-Instruct)")
    cols = ["format", "kernels", "weights MB", "load peak MB", "peak RSS MB", "read MB/token", "bound tok/s (b1)"]
    cols += [f"prefill tok/s b{b}" for b in batches] + [f"decode tok/s b{b}" for b in batches]
    cols += ["lean tok/s b1", "ppl"]
    for col in cols:
        t.add_column(col, justify="right")
    for r in rows:
        if "error" in r:
            t.add_row(r["format"], r["kernel"], r["error"][:60], *["-"] * (len(cols) - 3))
            continue
        bound = bandwidth * 1e9 / (r["read_mb_per_token"] * 2**20)
        t.add_row(
            r["format"], ",".join(f"{k}:{v}" for k, v in r["kernels"].items()) or "-", f"{r['weight_mb']:.1f}",
            f"{r['load_peak_mb']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['read_mb_per_token']:.1f}", f"{bound:.0f}",
            *[f"{r[f'prefill_tok_s_b{b}']:.0f}" for b in batches], *[f"{r[f'decode_tok_s_b{b}']:.1f}" for b in batches],
            f"{r['lean_tok_s_b1']:.1f}" if "lean_tok_s_b1" in r else "-", f"{r['ppl']:.3f}" if "ppl" in r else "-",
        )  # fmt: skip
    console.print(t)


if __name__ == "__main__":
    main()
