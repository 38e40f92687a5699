"""`rpiq eval`: perplexity of a full-precision model or a quantized checkpoint."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import _check_device, _fail, out


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

    from models.dequantized import dequantized_model
    from models.inference import load_for_inference
    from models.int4 import KERNEL_CHOICES
    from models.loading import ModelLoadError, is_quantized_checkpoint, load_fp_model, resolve_model
    from quantizer.data import evaluation_windows, load_text
    from quantizer.evaluate import perplexity

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
