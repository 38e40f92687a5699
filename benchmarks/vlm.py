"""Vision-language serving on CPU: weight memory, peak RSS and /v1/vqa latency, 16-bit vs int4.

The model has the shapes of SmolVLM-256M-Instruct (default; Idefics3: SigLIP-B/16 vision tower at
512 px, pixel shuffle x4 into 64 image tokens, a 30-layer 576-wide Llama language tower) or of
SmolVLM-Instruct, 2.2B (`--shape smolvlm-2.2b`: SigLIP so400m at 384 px, 81 image tokens,
SmolLM2-1.7B's 24-layer 2048-wide tower), written out below, with random weights: nothing is
downloaded, the tokenizer is the embedded SmolLM2's (SmolVLM's language towers are SmolLM2s) plus
SmolVLM's image tokens. Random weights answer noise, but memory and speed depend only on shapes.
Images are one tile (no image splitting: what a CPU deployment configures; the real processor's
4x4 tiles cost 17x the vision work).

    python benchmarks/vlm.py                       # GPTQ with 4 image samples, 3 requests per variant
    python benchmarks/vlm.py --requests 5 --max-tokens 32 --threads 2
    python benchmarks/vlm.py --shape smolvlm-2.2b  # the largest SmolVLM; about 9 GB while quantizing

Steps: build and save the 16-bit model directory with its processor; quantize the language tower
(`--method`, 4-bit, group 128; vision tower too with `--quantize-vision`) on the built-in image set;
then each variant runs in its own `rpiq serve` process (OCR off: the model alone is measured) and
answers one warm-up and `--requests` VQA requests. Peak RSS is the server process's VmHWM
(`memory.peak_rss_mb(pid)`). VmHWM counts the pages of memory-mapped weight files that were read
(clean page cache the kernel can drop), so anonymous memory (RssAnon, what the process allocated) is
recorded too: the 16-bit model runs straight from its mmapped safetensors, the int4 loader copies what
it reads and keeps the files mapped until it has finished. `--reuse` keeps the model directories of an
earlier run in `--workdir`. JSON goes to benchmarks/results/vlm_cpu.json (vlm_cpu_<shape>.json for
another shape).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
from memory import peak_rss_mb
from serve import REPO, Server

# config.json numbers of the real models (HuggingFaceTB/SmolVLM-256M-Instruct, HuggingFaceTB/SmolVLM-Instruct).
SHAPES: dict[str, dict[str, Any]] = {
    "smolvlm-256m": dict(
        text=dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=512, patch_size=16),
        vocab=49280, scale_factor=4,
    ),
    # 2.2B: SmolLM2-1.7B's tower and SigLIP so400m at 384 px, 81 image tokens per tile.
    "smolvlm-2.2b": dict(
        text=dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384,
                  rope_theta=273768.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=384, patch_size=14),
        vocab=49155, scale_factor=3,
    ),
}  # fmt: skip


def image_seq_len(shape: dict[str, Any]) -> int:
    v = shape["vision"]
    return (v["image_size"] // v["patch_size"]) ** 2 // shape["scale_factor"] ** 2  # 64 (256M), 81 (2.2B)


SPECIAL = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
TEMPLATE = (  # SmolVLM's chat template
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def processor(shape: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer, Idefics3ImageProcessor, Idefics3Processor

    from models.embedded import ensure_default_model

    tok = AutoTokenizer.from_pretrained(ensure_default_model())
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    size = {"longest_edge": shape["vision"]["image_size"]}
    images = Idefics3ImageProcessor(size=size, max_image_size=size, do_image_splitting=False)
    return Idefics3Processor(images, tok, image_seq_len=image_seq_len(shape), chat_template=TEMPLATE)


def build_model(proc: Any, shape: dict[str, Any]) -> Any:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    tok = proc.tokenizer
    vocab = max(shape["vocab"], len(tok))
    config = Idefics3Config(
        text_config=dict(shape["text"], vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=shape["vision"], scale_factor=shape["scale_factor"],
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return Idefics3ForConditionalGeneration(config).eval()


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    groups = {"language": "model.text_model.", "vision": "model.vision_model.", "connector": "model.connector."}
    out = {k: 0 for k in [*groups, "lm_head"]}
    for name, p in model.named_parameters():
        key = next((k for k, prefix in groups.items() if name.startswith(prefix)), "lm_head")
        out[key] += p.numel()
    out["total"] = sum(out.values())
    return out


def quantize(fp_dir: Path, out: Path, proc: Any, args: argparse.Namespace) -> dict[str, Any]:
    from gptq_format import save_quantized
    from models.loading import load_fp_model
    from quantizer.config import GridConfig, quant_config
    from quantizer.pipeline import quantize_model
    from quantizer.vlm_calibration import builtin_samples, vlm_batches

    model, _, _ = load_fp_model(str(fp_dir), "float32")
    batches = vlm_batches(model, builtin_samples(args.nsamples), processor=proc)
    config = quant_config(args.method, grid=GridConfig(bits=4, group_size=128))
    t0 = time.perf_counter()
    result = quantize_model(model, batches, config, progress=True, vision=args.quantize_vision)
    seconds = time.perf_counter() - t0
    save_quantized(model, result.weights, out, tokenizer=proc, checkpoint_format="gptq_v2", quant_config=config)
    return {"seconds": seconds, "layers": len(result.weights), "calibration_tokens": sum(b["input_ids"].numel()
            for b in batches)}  # fmt: skip


@contextmanager
def server_env(**env: str):
    """`serve.Server` passes this process's environment to the server: set RPIQ_* for one start."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rss_mb(pid: int) -> dict[str, float]:
    """Current resident memory of `pid` in MiB: total, anonymous (allocated) and file-backed (mapped files)."""
    fields = ("VmRSS", "RssAnon", "RssFile")
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in fields:
            out[key] = int(line.split()[1]) / 1024
    return out


def photo() -> str:
    from quantizer.vlm_calibration import photo_samples

    buf = io.BytesIO()
    photo_samples()[1].image.save(buf, "JPEG", quality=90)  # the cup of coffee
    return base64.b64encode(buf.getvalue()).decode()


def serve(model_dir: Path, variant: str, dtype: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    with server_env(RPIQ_OCR_ENGINE="none", RPIQ_DTYPE=dtype, RPIQ_MAX_NEW_TOKENS=str(args.max_tokens)):
        server = Server(str(model_dir), queue=1, log=log, threads=args.threads)
    try:
        t0 = time.perf_counter()
        ready = server.wait_ready()
        startup = time.perf_counter() - t0
        loaded_rss = rss_mb(server.proc.pid)
        body = {"image": photo(), "question": "What is in front of me?", "max_tokens": args.max_tokens}
        rows = []
        with httpx.Client(base_url=server.url, timeout=600) as c:
            for i in range(args.requests + 1):  # the first is a warm-up (one-time allocations)
                t = time.perf_counter()
                r = c.post("/v1/vqa", json=body)
                r.raise_for_status()
                if i:
                    timings = r.json()["timings"]
                    rows.append({"latency_s": time.perf_counter() - t, **timings})
                    print(f"[{variant}] request {i}: {rows[-1]['latency_s']:.2f} s, "
                          f"{timings.get('completion_tokens', 0):.0f} tokens", flush=True)  # fmt: skip
        lat = [r["latency_s"] for r in rows]
        return {
            "model_dir": str(model_dir), "dtype": dtype, "ready": ready["components"]["model"],
            "startup_s": startup, "rss_after_load_mb": loaded_rss["VmRSS"],
            "anon_rss_after_load_mb": loaded_rss["RssAnon"], "peak_rss_mb": peak_rss_mb(server.proc.pid),
            "rss_after_requests_mb": rss_mb(server.proc.pid),
            "latency_median_s": statistics.median(lat), "latency_max_s": max(lat),
            "generate_median_s": statistics.median(r["generate_s"] for r in rows),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rows),
            "completion_tokens": [int(r["completion_tokens"]) for r in rows], "requests": rows,
        }  # fmt: skip
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smolvlm-256m", choices=list(SHAPES), help="whose config.json numbers")
    ap.add_argument("--method", default="gptq", choices=["rtn", "gptq", "rpiq"])
    ap.add_argument("--nsamples", type=int, default=4, help="image calibration samples")
    ap.add_argument("--quantize-vision", action="store_true", help="also quantize the vision tower")
    ap.add_argument("--requests", type=int, default=3, help="timed /v1/vqa requests per variant")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the servers")
    ap.add_argument("--workdir", default=None, help="where the model directories go (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="keep the model directories already in --workdir")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/vlm_cpu.json (256M), vlm_cpu_<shape>.json")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    suffix = "" if args.shape == "smolvlm-256m" else f"_{args.shape}"
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"vlm_cpu{suffix}.json")

    from gptq_format import checkpoint_bytes
    from models.int4 import load_quantized, model_weight_bytes

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rpiq-vlm-bench-"))
    fp_dir, int4_dir = work / f"{args.shape}-shaped", work / f"{args.shape}-shaped-{args.method}-w4g128"
    proc = processor(shape)
    t0 = time.perf_counter()
    model = build_model(proc, shape)
    counts = param_counts(model)
    fp16_bytes = 2 * counts["total"]
    reuse = args.reuse and (fp_dir / "config.json").is_file() and (int4_dir / "config.json").is_file()
    if not reuse:
        model.to(torch.bfloat16).save_pretrained(fp_dir)
        proc.save_pretrained(fp_dir)
    del model
    print(f"built {counts['total'] / 1e6:.1f} M parameters in {time.perf_counter() - t0:.1f} s", flush=True)
    if reuse:
        prev = json.loads(Path(args.out).read_text()).get("quantization", {}) if Path(args.out).is_file() else {}
        quant = {**prev, "reused": str(int4_dir)}  # the earlier run's numbers, when its JSON is there
        print(f"reusing {fp_dir} and {int4_dir}", flush=True)
    else:
        quant = quantize(fp_dir, int4_dir, proc, args)
        print(f"quantized {quant['layers']} layers in {quant['seconds']:.1f} s", flush=True)
    int4_bytes = model_weight_bytes(load_quantized(int4_dir))

    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg_at_start": os.getloadavg()},
        "args": vars(args), "shape": {"name": args.shape, **shape, "image_tokens": image_seq_len(shape)},
        "parameters": counts, "quantization": quant,
        "weights_bytes": {"bf16": fp16_bytes, "int4": int4_bytes},
        "checkpoint_bytes": {"bf16": checkpoint_bytes(fp_dir), "int4": checkpoint_bytes(int4_dir)},
        "variants": {},
    }  # fmt: skip
    for variant, path, dtype in (("bf16", fp_dir, "bfloat16"), ("int4", int4_dir, "auto")):
        log = Path(args.out).with_suffix(f".{variant}.log.tmp")  # ignored by git (*.tmp)
        results["variants"][variant] = serve(path, variant, dtype, args, log)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    mb = 2**20
    print(f"\n{results['shape']['name']}-shaped ({results['parameters']['total'] / 1e6:.1f} M "
          "parameters), "
          f"{results['machine']['cpus']} CPUs, max_tokens {results['args']['max_tokens']}")  # fmt: skip
    print("| variant | weights MiB | checkpoint MiB | anon RSS loaded MiB | anon RSS after MiB | peak RSS (VmHWM) MiB "
          "| /v1/vqa median s | generate median s | tokens/s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, v in results["variants"].items():
        print(f"| {name} | {results['weights_bytes'][name] / mb:.0f} | {results['checkpoint_bytes'][name] / mb:.0f} | "
              f"{v['anon_rss_after_load_mb']:.0f} | {v['rss_after_requests_mb']['RssAnon']:.0f} | "
              f"{v['peak_rss_mb']:.0f} | {v['latency_median_s']:.2f} | {v['generate_median_s']:.2f} | "
              f"{v['tokens_per_s_median']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
