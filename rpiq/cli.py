"""The `rpiq` command line: quantize, eval, serve, bench."""

from __future__ import annotations

import json
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="RPIQ: 4-bit post-training quantization (GPTQ + Gauss-Seidel refinement) and an assistive "
    "edge inference server. Runs offline: MODEL is a local directory; omit it for the embedded "
    "default model (SmolLM2-135M-Instruct).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)
out = Console()


class Method(StrEnum):
    rtn = "rtn"
    gptq = "gptq"
    rpiq = "rpiq"


class Calib(StrEnum):
    sequential = "sequential"
    single_instance = "single-instance"


class Format(StrEnum):
    gptq = "gptq"
    gptq_v2 = "gptq_v2"


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def quantize(
    model: Annotated[str | None, typer.Argument(help="local model directory; omit for the embedded default")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="output checkpoint directory")] = None,
    method: Annotated[Method, typer.Option(help="rtn, gptq (stage 1) or rpiq (stages 1 + 2)")] = Method.rpiq,
    bits: Annotated[int, typer.Option(help="2, 3, 4 or 8")] = 4,
    group_size: Annotated[int, typer.Option(help="columns per scale/zero group; -1 = per channel")] = 128,
    sym: Annotated[bool, typer.Option(help="symmetric grid")] = False,
    act_order: Annotated[bool, typer.Option(help="quantize columns by descending Hessian diagonal")] = False,
    static_groups: Annotated[bool, typer.Option(help="with --act-order: fix group grids up front")] = False,
    block_size: Annotated[int, typer.Option(help="GPTQ lazy-update block size")] = 128,
    percdamp: Annotated[float, typer.Option(help="Hessian damping, fraction of mean diagonal")] = 0.01,
    rounds: Annotated[int | None, typer.Option(help="stage-2 Gauss-Seidel rounds (rpiq)")] = None,
    alpha: Annotated[float | None, typer.Option(help="stage-2 step size (rpiq)")] = None,
    calib: Annotated[Calib, typer.Option(help="calibration mode")] = Calib.sequential,
    instance_windows: Annotated[
        int, typer.Option(help="single-instance: calibration windows kept to drive stage 2")
    ] = 4,
    instance_weight: Annotated[
        float | None, typer.Option(help="single-instance: weight of the kept batch's output error (0..1)")
    ] = None,
    compensate: Annotated[
        bool | None,
        typer.Option(
            "--compensate/--no-compensate",
            help="fit each layer to the full-precision model's outputs, so it compensates the error of the "
            "layers before it (sequential: on every calibration window, a second stream of hidden states, about "
            "2x activation memory; single-instance: on the kept windows, from stage 1 on, no extra memory); "
            "default: on for rpiq, off for gptq",
        ),
    ] = None,
    offload_hessians: Annotated[
        bool,
        typer.Option(
            help="single-instance: keep every layer's Hessians, and each decoder layer outside its own forward, "
            "in host memory, so the GPU holds the embeddings, one layer and one batch (each batch's X^T X is "
            "formed on the GPU and only the product is copied; layers are copied in once per window)"
        ),
    ] = False,
    hessian_budget_mib: Annotated[
        float | None,
        typer.Option(
            help="single-instance: most MiB of Hessians held at once; pass 1 then streams the calibration once "
            "per run of layers that fits and keeps the Hessians on disk (in OUT.rpiq-state with --resume) "
            "until their layer is quantized. Default: all in memory, one pass"
        ),
    ] = None,
    calib_data: Annotated[
        str, typer.Option(help="text file, built-in 'calib', or 'images' (built-in image set, vision-language models)")
    ] = "calib",
    nsamples: Annotated[int, typer.Option(help="calibration windows")] = 128,
    seqlen: Annotated[int, typer.Option(help="tokens per calibration window")] = 2048,
    seed: Annotated[int, typer.Option(help="seed for drawing calibration windows")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="compute dtype: float32, bfloat16, float16")] = "float32",
    checkpoint_format: Annotated[
        Format,
        typer.Option(
            help="gptq_v2: zeros stored exactly (GPTQModel, transformers); gptq: legacy v1 form storing "
            "zero-1 (vLLM and older loaders; forces zero points >= 1)"
        ),
    ] = Format.gptq_v2,
    eval_text: Annotated[
        str | None,
        typer.Option("--eval", help="also measure perplexity before/after: 'heldout', 'wikitext' or FILE"),
    ] = None,
    eval_seqlen: Annotated[int, typer.Option(help="tokens per evaluation window")] = 512,
    eval_windows: Annotated[int | None, typer.Option(help="cap on evaluation windows (quick runs)")] = None,
    save_dtype: Annotated[
        str, typer.Option(help="dtype of the unquantized tensors: float16, bfloat16 (Gemma), float32")
    ] = "float16",
    quantize_lm_head: Annotated[
        bool,
        typer.Option(
            help="also quantize the output projection (unties it from the input embeddings, which stay "
            "full precision): smaller reads per token for large-vocabulary models, at some perplexity"
        ),
    ] = False,
    quantize_vision: Annotated[
        bool, typer.Option(help="vision-language models: also quantize the vision encoder (projector stays 16-bit)")
    ] = False,
    resume: Annotated[bool, typer.Option(help="resume an interrupted run from OUT.rpiq-state")] = True,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
    compensation_percdamp: Annotated[
        float | None,
        typer.Option(help="ridge of the compensation target, fraction of mean(diag H); larger = closer to W"),
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            help="run modeling code shipped in MODEL's directory (config auto_map, e.g. CogVLM2); "
            "the .py files are copied into the checkpoint so it loads standalone"
        ),
    ] = False,
) -> None:
    """Quantize MODEL's decoder layers and write a GPTQ-format checkpoint."""
    import torch

    from models.checkpoint import checkpoint_bytes, save_quantized
    from quantizer.config import GPTQConfig, GridConfig, QuantConfig, RefineConfig
    from quantizer.data import calibration_windows, evaluation_windows, load_text
    from quantizer.evaluate import perplexity
    from quantizer.loading import DTYPES, ModelLoadError, load_fp_model
    from quantizer.pipeline import CalibrationConfig, quantize_model
    from quantizer.vlm_calibration import IMAGES, image_calibration

    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail("--device cuda was given but no CUDA GPU is available")
    try:
        if save_dtype not in DTYPES:
            raise ValueError(f"--save-dtype {save_dtype!r} is not one of {', '.join(DTYPES)}")
        chosen = {"rounds": rounds, "alpha": alpha, "instance_weight": instance_weight}
        refine_kw = {k: v for k, v in chosen.items() if v is not None}
        config = QuantConfig(
            method=method.value,
            grid=GridConfig(
                bits=bits,
                group_size=group_size,
                sym=sym,
                min_zero=1 if checkpoint_format == Format.gptq else 0,
            ),
            gptq=GPTQConfig(
                block_size=block_size,
                percdamp=percdamp,
                act_order=act_order,
                static_groups=static_groups,
                **({} if compensation_percdamp is None else {"compensation_percdamp": compensation_percdamp}),
            ),
            refine=RefineConfig(**refine_kw),
        )
        calibration = CalibrationConfig(
            mode=calib.value,
            instance_windows=instance_windows,
            compensate=compensate,
            offload_hessians=offload_hessians,
            hessian_budget_mib=hessian_budget_mib,
        )
        m, tok, where = load_fp_model(model, dtype, trust_remote_code=trust_remote_code)
        if calib_data == IMAGES:  # (image, question, answer) batches through the whole VLM
            windows, tok = image_calibration(m, where, tok, nsamples, seed)
        else:
            windows = calibration_windows(tok, load_text(calib_data), nsamples, seqlen, seed=seed)
        ev = None
        if eval_text is not None:
            ev = evaluation_windows(tok, load_text(eval_text), eval_seqlen, max_windows=eval_windows)
    except (ValueError, ModelLoadError) as e:
        _fail(str(e))
    name = Path(str(where)).name
    out_dir = out_dir or Path(f"{name}-{method.value}-w{bits}g{group_size}")
    report: dict = {"model": str(where), "method": method.value, "bits": bits, "group_size": group_size}
    if ev is not None:
        console.print(f"measuring full-precision perplexity on {ev.shape[0]} x {ev.shape[1]} tokens ...")
        report["ppl_fp"] = perplexity(m.to(device), ev, device=device, progress=progress)
        m.to("cpu")
    fp_bytes = _param_bytes(m, torch.float16)
    console.print(
        f"quantizing {name} ({method.value}, {bits}-bit, group {group_size}, {calib.value}, "
        f"{nsamples} x {seqlen} calibration tokens from {calib_data!r})"
    )
    state_dir = out_dir.with_name(out_dir.name + ".rpiq-state") if resume else None
    t0 = time.perf_counter()
    result = quantize_model(
        m,
        windows,
        config,
        calibration,
        device=device,
        state_dir=state_dir,
        run_id=str(where),
        progress=progress,
        lm_head=quantize_lm_head,
        vision=quantize_vision,
    )
    report["quantize_seconds"] = time.perf_counter() - t0
    report["layer_loss_sum"] = result.total_loss
    meta = {
        "method": method.value,
        "calibration": calib.value,
        "compensate": calibration.for_method(method.value).compensate,
        "calib_data": calib_data,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "lm_head": quantize_lm_head,
        "vision": quantize_vision,
        "config": config.model_dump(),
        "layer_loss_sum": result.total_loss,
    }
    save_quantized(
        m,
        result.weights,
        out_dir,
        tokenizer=tok,
        checkpoint_format=checkpoint_format.value,
        dtype=DTYPES[save_dtype],
        rpiq_meta=meta,
        quant_config=config,
    )
    (out_dir / "rpiq_layers.json").write_text(json.dumps([r.as_dict() for r in result.reports], indent=1))
    if state_dir is not None:
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)
    if ev is not None:
        console.print("measuring quantized perplexity ...")
        report["ppl_quantized"] = perplexity(m.to(device), ev, device=device, progress=progress)
    report["size_fp16_bytes"] = fp_bytes
    report["size_checkpoint_bytes"] = checkpoint_bytes(out_dir)
    report["out"] = str(out_dir)
    _print_summary(report)


def _param_bytes(model, dtype) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * dtype.itemsize
    return total


def _print_summary(report: dict) -> None:
    table = Table(title=f"rpiq quantize: {report['method']} {report['bits']}-bit g{report['group_size']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    if "ppl_fp" in report:
        table.add_row("perplexity, full precision", f"{report['ppl_fp']:.3f}")
        table.add_row("perplexity, quantized", f"{report['ppl_quantized']:.3f}")
    table.add_row("size, fp16 weights", f"{report['size_fp16_bytes'] / 2**20:.1f} MiB")
    table.add_row("size, quantized checkpoint", f"{report['size_checkpoint_bytes'] / 2**20:.1f} MiB")
    table.add_row("layer loss sum", f"{report['layer_loss_sum']:.4g}")
    table.add_row("quantization time", f"{report['quantize_seconds']:.1f} s")
    table.add_row("checkpoint", report["out"])
    out.print(table)
    out.print_json(json.dumps(report))


@app.command("eval")
def eval_(
    model: Annotated[
        str | None, typer.Argument(help="model or quantized checkpoint directory; omit for default")
    ] = None,
    ppl: Annotated[
        str, typer.Option(help="'heldout' (built-in), 'wikitext' (local datasets cache) or FILE")
    ] = "heldout",
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 2048,
    max_windows: Annotated[int | None, typer.Option(help="cap on windows (quick runs)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    kernel: Annotated[
        str,
        typer.Option(
            help="checkpoints only: 'none' evaluates the exact dequantized weights in float32; a kernel "
            "name (auto, tinygemm-cpu, tinygemm-cuda, dequant) runs the int4 model as it is served"
        ),
    ] = "none",
) -> None:
    """Perplexity by the GPTQ protocol, the same code for full-precision models and checkpoints."""
    from transformers import AutoTokenizer

    from models.checkpoint import dequantized_model
    from models.inference import load_for_inference
    from models.int4 import KERNEL_CHOICES
    from quantizer.data import evaluation_windows, load_text
    from quantizer.evaluate import perplexity
    from quantizer.loading import ModelLoadError, is_quantized_checkpoint, load_fp_model, resolve_model

    _check_device(device)
    if kernel != "none" and kernel not in KERNEL_CHOICES:
        _fail(f"--kernel {kernel!r} is not one of none, {', '.join(KERNEL_CHOICES)}")
    try:
        where = resolve_model(model)
        if is_quantized_checkpoint(where) and kernel == "none":
            m = dequantized_model(where)
            tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
        elif is_quantized_checkpoint(where):
            m, tok, where = load_for_inference(where, device=device, kernel=kernel)
        else:
            m, tok, where = load_fp_model(model)
        windows = evaluation_windows(tok, load_text(ppl), seqlen, max_windows=max_windows)
    except (ValueError, ModelLoadError, OSError) as e:
        _fail(str(e))
    value = perplexity(m.to(device), windows, device=device, progress=True)
    result = {"model": str(where), "text": ppl, "seqlen": seqlen, "windows": windows.shape[0], "ppl": value}
    if hasattr(m, "int4_kernels"):
        result["kernels"] = m.int4_kernels
    out.print_json(json.dumps(result))


def _check_device(device: str) -> None:
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        _fail(f"--device {device!r}: use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail("--device cuda was given but no CUDA GPU is available")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the question or text to continue")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="model or int4 checkpoint directory; omit for the default")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="upper bound on generated tokens")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy (deterministic)")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="nucleus sampling mass")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the model's chat template")] = True,
    system: Annotated[str | None, typer.Option(help="system prompt (chat mode)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    kernel: Annotated[str, typer.Option(help="int4 kernel for checkpoints: auto, tinygemm-cpu, ...")] = "auto",
    stream: Annotated[bool, typer.Option(help="print tokens as they are generated")] = True,
) -> None:
    """Generate text with a full-precision model or an int4 checkpoint (on int4 kernels)."""
    from models.checkpoint import CheckpointError
    from models.inference import GenerationOptions, generate_text, load_for_inference
    from models.int4 import KernelUnavailableError
    from quantizer.loading import ModelLoadError

    _check_device(device)
    try:
        options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        m, tok, _ = load_for_inference(model, device=device, kernel=kernel)
    except (ValueError, ModelLoadError, CheckpointError, KernelUnavailableError, OSError) as e:
        _fail(str(e))
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result = generate_text(m, tok, prompt, options, chat=chat, system=system, streamer=streamer)
    if not stream:
        out.print(result.text, markup=False, highlight=False)
    console.print(
        f"[dim]{result.new_tokens} tokens in {result.seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s); "
        f"{'stopped at end of answer' if result.finished else 'hit --max-new-tokens'}; "
        f"kernels {getattr(m, 'int4_kernels', 'none (full precision)')}[/]"
    )


@app.command()
def serve(
    checkpoint: Annotated[
        str | None, typer.Argument(help="model or int4 checkpoint directory; omit for the embedded default")
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind; beyond loopback an API key is required")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(help="require 'Authorization: Bearer KEY' (env RPIQ_API_KEY)", envvar="RPIQ_API_KEY")
    ] = None,
    allow_insecure_public: Annotated[
        bool, typer.Option(help="bind beyond loopback without an API key (trusted networks only)")
    ] = False,
    queue_size: Annotated[int | None, typer.Option(help="requests that may wait for the model (503 beyond)")] = None,
    timeout: Annotated[float | None, typer.Option(help="per-request timeout in seconds")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
    kernel: Annotated[str | None, typer.Option(help="int4 kernel for quantized checkpoints")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16, float16")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    ocr: Annotated[str | None, typer.Option(help="OCR engine: rapidocr, tesseract or none")] = None,
    voice: Annotated[str | None, typer.Option(help="default espeak-ng voice or language")] = None,
    env_file: Annotated[
        Path | None, typer.Option(help="read RPIQ_* settings from this file (see deploy/rpiq.env.example)")
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="run modeling code shipped with the checkpoint (auto_map, e.g. CogVLM2)")
    ] = False,
) -> None:
    """Start the assistive HTTP server (VQA, reading, speech, OpenAI-compatible chat) on CHECKPOINT.

    A vision-language checkpoint (int4 or full precision) answers /v1/vqa by looking at the photo."""
    from pydantic import ValidationError

    from quantizer.loading import ModelLoadError, resolve_model
    from server.app import run
    from server.settings import ServerSettings

    given = {
        "model": checkpoint, "host": host, "port": port, "api_key": api_key,
        "allow_insecure_public": allow_insecure_public or None, "queue_size": queue_size,
        "request_timeout_s": timeout, "device": device, "kernel": kernel, "dtype": dtype, "threads": threads,
        "ocr_engine": ocr, "voice": voice, "trust_remote_code": trust_remote_code or None,
    }  # fmt: skip
    defaults = {"host": "127.0.0.1", "port": 8000}  # CLI defaults must not override an env file's values
    overrides = {k: v for k, v in given.items() if v is not None and defaults.get(k, object()) != v}
    try:
        if env_file is not None and not env_file.is_file():
            raise ValueError(f"--env-file {env_file} does not exist")
        settings = ServerSettings(_env_file=env_file, **overrides)
        settings.check_exposure()
        if settings.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda was given but no CUDA GPU is available")
        if settings.model is not None:
            resolve_model(settings.model)  # fail now with a clear message, not later in /readyz
    except ValidationError as e:
        _fail("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))
    except (ValueError, ModelLoadError) as e:
        _fail(str(e))
    console.print(f"rpiq serve: http://{settings.host}:{settings.port}  (docs at /docs, readiness at /readyz)")
    run(settings)


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="'cogvlm2' (built-in config numbers) or a model directory")] = "cogvlm2",
    bits: Annotated[int, typer.Option(help="bits of the quantized linears")] = 4,
    group_size: Annotated[int, typer.Option(help="columns per scale/zero group; -1 = per channel")] = 128,
    nsamples: Annotated[int, typer.Option(min=1, help="calibration windows, for the calibration memory lines")] = 128,
    seqlen: Annotated[int, typer.Option(min=1, help="tokens per calibration window")] = 2048,
) -> None:
    """Weight memory of MODEL in 16-bit and quantized (GPTQ format), per component, from its config;
    then what sequential and single-instance calibration keep resident."""
    from rpiq.plan import calibration_memory, load_config, meta_model, plan_model
    from rpiq.plan_report import calibration_lines, print_plan

    try:
        config, name = load_config(model)
        meta = meta_model(config)
        result = plan_model(meta, name, bits, group_size)
        memory = calibration_memory(meta, nsamples, seqlen)
    except (ValueError, OSError) as e:
        _fail(str(e))
    print_plan(result, out)
    for line in calibration_lines(memory, nsamples, seqlen):
        out.print(line, highlight=False, soft_wrap=True)


BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _benchmarks() -> dict[str, str]:
    """Benchmark scripts of the source checkout: name -> first line of its docstring."""
    import ast

    out = {}
    for f in sorted(BENCHMARKS_DIR.glob("*.py")):
        source = f.read_text(encoding="utf-8")
        if "__main__" in source:  # a runnable script, not a helper module such as memory.py
            doc = ast.get_docstring(ast.parse(source)) or ""
            out[f.stem] = doc.splitlines()[0] if doc else ""
    return out


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="benchmark to run (omit to list them)")] = None,
) -> None:
    """Run a benchmark script from benchmarks/ (e.g. `rpiq bench report --quick`); extra options go to it.

    Benchmarks print a table and save JSON; they live in the source checkout, not in the wheel.
    """
    import subprocess

    if not BENCHMARKS_DIR.is_dir():
        _fail(f"no benchmarks/ directory next to the rpiq package ({BENCHMARKS_DIR}); run from a source checkout")
    found = _benchmarks()
    if name is None:
        for stem, line in found.items():
            console.print(f"[bold]{stem}[/bold]  {line}")
        return
    if name not in found:
        _fail(f"unknown benchmark {name!r}; choose one of: {', '.join(found)}")
    cmd = [sys.executable, str(BENCHMARKS_DIR / f"{name}.py"), *ctx.args]
    raise typer.Exit(subprocess.run(cmd, check=False).returncode)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
