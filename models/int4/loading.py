"""Run GPTQ checkpoints on int4 kernels without ever holding their full-precision weights.

`load_quantized` builds the transformers model skeleton on the meta device (accelerate's
`init_empty_weights`: parameters cost nothing, buffers such as rotary tables stay real), swaps
each quantized `nn.Linear` for the kernel's `QuantLinear`, packing it straight from the
checkpoint one module at a time, then assigns the remaining tensors (embeddings, norms, an
unquantized LM head) in place. Peak memory stays near the final model size plus one layer.

`quantize_linears_in_place` does the same swap on a model already in memory, from the
`QuantizedWeight`s the quantizer returned, so tests can compare both paths.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from gptq_format import CheckpointError, CheckpointStream, QuantizedWeight, open_checkpoint

from .embedding import QuantEmbedding, load_quant_embeddings
from .linear import QuantLinear, kernel_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DEFAULT_DTYPE = torch.bfloat16  # the tinygemm kernels compute in bf16; fp16 overflows on Gemma


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def quantize_linears_in_place(
    model: nn.Module,
    weights: Mapping[str, QuantizedWeight],
    *,
    kernel: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Counter[str]:
    """Replace each named `nn.Linear` by its int4 `QuantLinear`; returns how many layers per kernel.

    The model is left on its current device; call ``model.to(device)`` for the rest of it.
    """
    device = torch.device(device)
    used: Counter[str] = Counter()
    for name, qw in weights.items():
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        if tuple(old.weight.shape) != qw.shape:
            raise ValueError(
                f"{name}: quantized weight {list(qw.shape)} does not match the layer {list(old.weight.shape)}"
            )
        out_dtype = dtype or old.weight.dtype
        cls = kernel_for(kernel, qw, device, out_dtype)
        _swap(model, name, cls.from_weight(qw, old.bias, device, out_dtype))
        used[cls.kernel] += 1
    return used


def load_quantized(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    kernel: str = "auto",
    dtype: torch.dtype | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A ready-to-generate transformers model from a GPTQ checkpoint, on int4 kernels.

    `kernel` is a name from `models.int4.KERNEL_CHOICES`; "auto" takes the fastest kernel for
    each layer on `device` and falls back to the dequantizing reference where none fits (logged).
    `dtype` is that of everything that is not quantized (default bfloat16). Bad checkpoints raise
    `CheckpointError` naming the file and tensor; an impossible kernel raises `KernelUnavailableError`.
    Vision-language checkpoints build their full image-text class (`models.architectures`), so the
    vision tower and projector load beside the int4 language tower; `trust_remote_code` runs the
    checkpoint's own modeling code (``auto_map``, e.g. CogVLM2).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from models.architectures import from_config, model_class
    from models.loading import ModelLoadError, check_config_type

    path = Path(path)
    device = torch.device(device)
    dtype = dtype or DEFAULT_DTYPE
    stream = open_checkpoint(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        hint = " (it names its own modeling code: pass trust_remote_code)" if _has_auto_map(path) else ""
        raise CheckpointError(f"{path / 'config.json'}: not a usable transformers config{hint} ({e})") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we are the GPTQ backend; transformers must not look for one
    try:
        check_config_type(path, config, model_class(config))  # a model_type that contradicts the architecture
    except ModelLoadError as e:
        raise CheckpointError(str(e)) from None
    with init_empty_weights():
        model = from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)  # the VLM class for VLMs

    used: Counter[str] = Counter()
    names = tqdm(stream.quantized_names, desc="loading int4 layers", unit="layer", disable=not progress)
    for name in names:
        qw = stream.quantized_weight(name)
        target = _linear_for(model, name, qw, path)
        bias = stream.take(f"{name}.bias") if target.bias is not None else None
        cls = kernel_for(kernel, qw, device, dtype)
        _swap(model, name, cls.from_weight(qw, bias, device, dtype))
        used[cls.kernel] += 1
        del qw
    int8_tables = load_quant_embeddings(model, stream, device, dtype)  # int8 embeddings + the heads tied to them
    _assign_rest(model, stream, path, dtype, device, tie=not int8_tables)
    if used.get("dequant") and kernel == "auto":
        log.warning(
            "%d of %d layers have no fast int4 kernel on %s; they use 'dequant'",
            used["dequant"],
            sum(used.values()),
            device.type,
        )
    model.int4_kernels = dict(used)  # which kernel runs how many layers, for reports
    return model.to(device).eval()


def _has_auto_map(path: Path) -> bool:
    import json

    try:
        return "auto_map" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _linear_for(model: nn.Module, name: str, qw: QuantizedWeight, path: Path) -> nn.Linear:
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(
            f"{path}: quantized module '{name}' does not exist in the {type(model).__name__} built from config.json"
        ) from None
    if not isinstance(target, nn.Linear):
        raise CheckpointError(f"{path}: quantized module '{name}' is a {type(target).__name__}, not a Linear")
    if tuple(target.weight.shape) != qw.shape:
        raise CheckpointError(
            f"{path}: module '{name}' is {list(qw.shape)} in the checkpoint but {list(target.weight.shape)} "
            "in the model built from config.json"
        )
    return target


def _assign_rest(
    model: nn.Module,
    stream: CheckpointStream,
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    *,
    tie: bool = True,
) -> None:
    """Put every non-quantized tensor in place, re-tie shared weights, and refuse gaps."""
    state = {k: (t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)) for k, t in stream.rest()}
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise CheckpointError(
            f"{path}: tensors {unexpected[:10]} do not belong to the {type(model).__name__} built from config.json"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches
        raise CheckpointError(f"{path}: checkpoint does not fit the model built from config.json: {e}") from e
    if tie:  # a head tied to an int8 table already reads it (models.int4.embedding)
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {missing[:10]}")


def int4_layers(model: nn.Module) -> list[QuantLinear | QuantEmbedding]:
    return [m for m in model.modules() if isinstance(m, QuantLinear | QuantEmbedding)]


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes the model keeps for weights: parameters (tied ones once) plus int4 layers' packed buffers."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total + sum(layer.weight_bytes() for layer in int4_layers(model))
