"""`rpiq quantize`: calibrate, quantize, save a GPTQ checkpoint, evaluate before and after."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from .common import _fail, console, out

if TYPE_CHECKING:
    from quantizer.config import QuantConfig


class Method(StrEnum):
    rtn = "rtn"
    gptq = "gptq"
    rpiq = "rpiq"


class Calib(StrEnum):
    sequential = "sequential"
    single_instance = "single-instance"


class EmbeddingQuant(StrEnum):
    none = "none"
    int8 = "int8"


class Format(StrEnum):
    gptq = "gptq"
    gptq_v2 = "gptq_v2"


def quantize(
    model: Annotated[str | None, typer.Argument(help="local model directory; omit for the embedded default")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="output checkpoint directory")] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            help="JSON quantization config (a config dump, e.g. the rpiq.config entry an earlier run wrote to its "
            "quantize_config.json); the flags below override its fields"
        ),
    ] = None,
    method: Annotated[Method | None, typer.Option(help="rtn, gptq (stage 1) or rpiq (stages 1 + 2)")] = None,
    bits: Annotated[int | None, typer.Option(help="2, 3, 4 or 8")] = None,
    group_size: Annotated[int | None, typer.Option(help="columns per scale/zero group; -1 = per channel")] = None,
    sym: Annotated[bool | None, typer.Option(help="symmetric grid")] = None,
    act_order: Annotated[bool | None, typer.Option(help="quantize columns by descending Hessian diagonal")] = None,
    static_groups: Annotated[bool | None, typer.Option(help="with --act-order: fix group grids up front")] = None,
    block_size: Annotated[int | None, typer.Option(help="GPTQ lazy-update block size")] = None,
    percdamp: Annotated[float | None, typer.Option(help="Hessian damping, fraction of mean diagonal")] = None,
    rounds: Annotated[int | None, typer.Option(help="stage-2 Gauss-Seidel rounds (rpiq)")] = None,
    alpha: Annotated[float | None, typer.Option(help="stage-2 step size (rpiq)")] = None,
    calib: Annotated[Calib | None, typer.Option(help="calibration mode")] = None,
    instance_windows: Annotated[
        int | None, typer.Option(help="single-instance: calibration windows kept to drive stage 2")
    ] = None,
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
    compensation_percdamp: Annotated[
        float | None,
        typer.Option(help="ridge of the compensation target, fraction of mean(diag H); larger = closer to W"),
    ] = None,
    offload_hessians: Annotated[
        bool | None,
        typer.Option(
            help="single-instance: keep every layer's Hessians, and each decoder layer outside its own forward, "
            "in host memory, so the GPU holds the embeddings, one layer and one batch (each batch's X^T X is "
            "formed on the GPU and only the product is copied; layers are copied in once per window)"
        ),
    ] = None,
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
    quantize_embeddings: Annotated[
        EmbeddingQuant | None,
        typer.Option(
            help="int8: also store the token embedding table (and an LM head tied to it) as row-wise int8 with "
            "per-row scales, quantized before calibration; halves the largest 16-bit tensor of small models. "
            "Such checkpoints load with rpiq only (other GPTQ loaders would see the embedding as missing)"
        ),
    ] = None,
    quantize_vision: Annotated[
        bool, typer.Option(help="vision-language models: also quantize the vision encoder (projector stays 16-bit)")
    ] = False,
    resume: Annotated[bool, typer.Option(help="resume an interrupted run from OUT.rpiq-state")] = True,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
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

    from gptq_format import checkpoint_bytes, save_quantized
    from models.loading import DTYPES, ModelLoadError, load_fp_model
    from quantizer.data import calibration_windows, evaluation_windows, load_text
    from quantizer.evaluate import perplexity
    from quantizer.pipeline import quantize_model
    from quantizer.vlm_calibration import IMAGES, image_calibration

    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail("--device cuda was given but no CUDA GPU is available")
    try:
        if save_dtype not in DTYPES:
            raise ValueError(f"--save-dtype {save_dtype!r} is not one of {', '.join(DTYPES)}")
        # Only what the user gave: every default lives once, in quantizer.config.
        config = build_config(
            recipe,
            method.value if method is not None else None,
            grid={
                "bits": bits,
                "group_size": group_size,
                "sym": sym,
                "min_zero": 1 if checkpoint_format == Format.gptq else None,
                "embeddings": quantize_embeddings.value if quantize_embeddings is not None else None,
            },
            gptq={
                "block_size": block_size,
                "percdamp": percdamp,
                "act_order": act_order,
                "static_groups": static_groups,
            },
            refine={"rounds": rounds, "alpha": alpha},
            calibration={
                "mode": calib.value if calib is not None else None,
                "instance_windows": instance_windows,
                "instance_weight": instance_weight,
                "compensate": compensate,
                "compensation_percdamp": compensation_percdamp,
                "offload_hessians": offload_hessians,
                "hessian_budget_mib": hessian_budget_mib,
            },
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
    grid, mode = config.grid, config.calibration.mode
    out_dir = out_dir or Path(f"{name}-{config.method}-w{grid.bits}g{grid.group_size}")
    report: dict = {"model": str(where), "method": config.method, "bits": grid.bits, "group_size": grid.group_size}
    if ev is not None:
        console.print(f"measuring full-precision perplexity on {ev.shape[0]} x {ev.shape[1]} tokens ...")
        report["ppl_fp"] = perplexity(m.to(device), ev, device=device, progress=progress)
        m.to("cpu")
    fp_bytes = _param_bytes(m, torch.float16)
    console.print(
        f"quantizing {name} ({config.method}, {grid.bits}-bit, group {grid.group_size}, {mode}, "
        f"{nsamples} x {seqlen} calibration tokens from {calib_data!r})"
    )
    state_dir = out_dir.with_name(out_dir.name + ".rpiq-state") if resume else None
    t0 = time.perf_counter()
    result = quantize_model(
        m,
        windows,
        config,
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
        "method": config.method,
        "calibration": mode,
        "compensate": config.compensate,
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
        embeddings=result.embeddings,
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


def build_config(recipe: Path | None, method: str | None, **sections: dict[str, Any]) -> QuantConfig:
    """The recipe file's config (else the defaults), `method` and the given (non-None) fields on top.

    A section the chosen method does not read (e.g. `refine` for gptq) is dropped from the recipe;
    a flag for one is ignored, with a note, as before the configs were split by method.
    """
    from quantizer.config import METHOD_CONFIGS, parse_config

    data: dict[str, Any] = {}
    if recipe is not None:
        try:
            data = json.loads(recipe.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--recipe {recipe}: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"--recipe {recipe}: expected a JSON object (a quantization config)")
    if method is not None:
        data["method"] = method
    own = METHOD_CONFIGS.get(data.get("method", "rpiq"), METHOD_CONFIGS["rpiq"]).model_fields
    data = {k: v for k, v in data.items() if k in own}
    for section, values in sections.items():
        given = {k: v for k, v in values.items() if v is not None}
        if not given:
            continue
        if section not in own:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            console.print(f"note: {flags} does not apply to method {data.get('method', 'rpiq')}; ignored")
            continue
        data[section] = {**data.get(section, {}), **given}
    return parse_config(data)


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
