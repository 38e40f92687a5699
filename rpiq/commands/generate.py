"""`rpiq generate`: one answer from a model or checkpoint, streamed to the terminal."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import _check_device, _fail, console, out


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
    kernel: Annotated[
        str, typer.Option(help="int4 kernel for checkpoints: auto, tinygemm-cpu, tinygemm-cuda, gemlite, dequant")
    ] = "auto",
    stream: Annotated[bool, typer.Option(help="print tokens as they are generated")] = True,
    compile: Annotated[
        bool, typer.Option("--compile", help="static KV cache + torch.compile'd decode step (compiles first)")
    ] = False,
    lean: Annotated[
        bool,
        typer.Option(
            help="decode Llama-family models with the lean step (CPU: fused int4 projections, a preallocated "
            "cache; CUDA: one replayed CUDA graph a token); --no-lean runs transformers' forward for every token"
        ),
    ] = True,
) -> None:
    """Generate text with a full-precision model or an int4 checkpoint (on int4 kernels)."""
    from gptq_format import CheckpointError
    from models.inference import GenerationOptions, generate_text, load_for_inference
    from models.int4 import KERNEL_CHOICES, KernelUnavailableError
    from models.loading import ModelLoadError

    _check_device(device)
    if kernel not in KERNEL_CHOICES:
        _fail(f"--kernel {kernel!r} is not one of {', '.join(KERNEL_CHOICES)}")
    try:
        options = GenerationOptions(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, compile=compile, lean=lean
        )
        m, tok, _ = load_for_inference(model, device=device, kernel=kernel)
    except (ValueError, ModelLoadError, CheckpointError, KernelUnavailableError, OSError) as e:
        _fail(str(e))

    def show(text: str) -> None:
        out.print(text, end="", markup=False, highlight=False)

    result = generate_text(m, tok, prompt, options, chat=chat, system=system, on_text=show if stream else None)
    out.print("" if stream else result.text, markup=False, highlight=False)
    console.print(
        f"[dim]{result.completion_tokens} tokens in {result.seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s); "
        f"{'stopped at end of answer' if result.finished else 'hit --max-new-tokens'}; "
        f"kernels {getattr(m, 'int4_kernels', 'none (full precision)')}; decoder {result.decoder}[/]"
    )
