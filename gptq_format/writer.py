"""Writing GPTQ checkpoints that the GPTQ ecosystem loads.

The directory `save_quantized` writes is what GPTQModel, transformers + optimum and vLLM load:
``config.json`` with a ``quantization_config``, a ``quantize_config.json`` copy (GPTQModel and
AutoGPTQ read that file), and safetensors holding ``qweight`` / ``qzeros`` / ``scales`` /
``g_idx`` per quantized linear plus every other tensor of the model in the chosen dtype.

Design notes:

* The packed layout is `models.packing`'s, bit-compatible with those loaders. Scales are stored
  as float16, so they must already be fp16-representable (the quantizer rounds them that way by
  default); anything else would make the checkpoint disagree with the in-memory weights, and
  saving refuses instead of rounding silently.
* ``checkpoint_format="gptq"`` (v1) stores zero-1 and cannot hold a zero of 0. That is refused
  at save time with the fix to apply, because a loader would silently decode garbage. v1 is what
  vLLM and older AutoGPTQ-era loaders expect; GPTQModel refuses *asymmetric* v1 files that it did
  not produce itself (a provenance check against old AutoGPTQ bugs), so for GPTQModel prefer
  ``gptq_v2``, which also stores zeros exactly.
* Shapes GPTQ loaders merely *assume* (in/out features divisible by the packing block, one
  (bits, group_size, sym) for the whole model) are checked
  up front, naming the module, so a bad checkpoint is never written.
* Writes are atomic: everything goes into a hidden sibling directory, is fsynced, then swapped
  in with two renames. A failure leaves the old checkpoint (or nothing), never a mix that a loader
  would half-read; only a hard crash between the two renames leaves the old one under
  ``.NAME.old-PID`` and nothing at ``out_dir``, and a hard crash while writing leaves a hidden
  ``.NAME.tmp-PID`` directory behind.
* Reading validates every tensor's presence, dtype and shape and names the file and the tensor
  on failure: a truncated download should say which file to fetch again.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import write_atomically
from .embedding import Int8Rows, add_embeddings
from .packing import pack_qweight, pack_qzeros
from .spec import (
    CHECKPOINT_FORMATS,
    CONFIG_NAME,
    INDEX_NAME,
    PROCESSOR_FILES,
    QUANT_CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointFormat,
    n_groups,
    pack_block,
    trivial_g_idx,
)
from .weight import SUPPORTED_BITS, QuantizedWeight

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class _Grid(Protocol):
    bits: int
    group_size: int
    sym: bool


class _GPTQSettings(Protocol):
    percdamp: float
    act_order: bool
    static_groups: bool


class QuantRecipe(Protocol):
    """What the writer records of the run that produced the weights (the quantizer's config fits)."""

    grid: _Grid
    gptq: _GPTQSettings


def save_quantized(
    model: PreTrainedModel,
    quantized: Mapping[str, QuantizedWeight],
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    checkpoint_format: CheckpointFormat = "gptq",
    dtype: torch.dtype = torch.float16,
    rpiq_meta: dict[str, Any] | None = None,
    max_shard_bytes: int = 2**31,
    quant_config: QuantRecipe | None = None,
    source_dir: str | Path | None = None,
    embeddings: Mapping[str, Int8Rows] | None = None,
) -> Path:
    """Write `model` with the linears named in `quantized` replaced by packed GPTQ tensors.

    `quantized` maps module names (as in `model.named_modules()`) to their `QuantizedWeight`.
    Non-quantized floating tensors are cast to `dtype`. `quant_config`, when given, supplies
    the metadata GPTQ tools record (damp_percent, static_groups) and must agree with the
    weights' grid. Returns the checkpoint directory.

    `source_dir` (default: the directory the model was loaded from, ``model.name_or_path``) supplies
    what the checkpoint needs to run standalone beyond weights and tokenizer: the processor files
    of a vision-language model (image preprocessing, chat template), which a text-calibrated run
    never loads, and, when the config has an ``auto_map``, the remote modeling code (``*.py``).
    `embeddings` (from `gptq_format.embedding.quantize_embeddings`) stores those tables as int8 rows.
    """
    out_dir = Path(out_dir)
    _check_save_args(checkpoint_format, dtype, max_shard_bytes, out_dir)
    if not quantized:
        raise ValueError("nothing to save: `quantized` is empty (quantize at least one linear layer)")
    modules = dict(model.named_modules())
    for name, qw in quantized.items():
        _validate_layer(name, modules.get(name), qw, checkpoint_format)
    bits, group_size, sym = _common_grid(quantized, quant_config)
    tensors = _checkpoint_tensors(model, quantized, checkpoint_format, dtype)
    quant = _quantization_config(quantized, checkpoint_format, bits, group_size, sym, quant_config, rpiq_meta)
    if embeddings:
        add_embeddings(model, embeddings, tensors, quant)
    config = _model_config_dict(model, quant, dtype)
    source = _source_dir(model, source_dir)

    def write(tmp: Path) -> None:
        _write_checkpoint(tmp, model, tensors, config, quant, tokenizer, max_shard_bytes)
        if source is not None:
            _copy_model_files(source, tmp, remote_code="auto_map" in config)

    return write_atomically(out_dir, write)


def _source_dir(model: nn.Module, given: str | Path | None) -> Path | None:
    where = given if given is not None else getattr(model, "name_or_path", None)
    if not where or not Path(where).is_dir():
        return None
    return Path(where)


def _copy_model_files(source: Path, tmp: Path, *, remote_code: bool) -> None:
    """Processor files the save did not write itself, and the remote code an ``auto_map`` points to.

    Files already written (by the processor's or tokenizer's own save) win: they describe what the
    checkpoint was quantized with. Remote code is copied whole (every top-level ``.py``), because
    modeling files import their siblings (configuration, visual tower, utilities).
    """
    names = list(PROCESSOR_FILES)
    if remote_code:
        names += sorted(f.name for f in source.glob("*.py"))
    for name in names:
        src = source / name
        if src.is_file() and not (tmp / name).exists():
            shutil.copy2(src, tmp / name)


def _check_save_args(fmt: str, dtype: torch.dtype, max_shard_bytes: int, out_dir: Path) -> None:
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={fmt!r} is not supported; choose one of {CHECKPOINT_FORMATS}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating torch.dtype (e.g. torch.float16)")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} must be a positive int")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / CONFIG_NAME).exists():
        # Replacing a directory deletes it: only ever do that to something that is a model.
        raise ValueError(
            f"{out_dir} is a non-empty directory without {CONFIG_NAME}; refusing to replace it "
            "(choose an empty or new directory, or an earlier checkpoint)"
        )


def _validate_layer(name: str, module: nn.Module | None, qw: QuantizedWeight, fmt: str) -> None:
    """Refuse, naming the module, everything a GPTQ loader would assume silently."""
    if module is None:
        raise ValueError(f"{name}: no such module in the model")
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{name}: is a {type(module).__name__}, only nn.Linear layers can be GPTQ-packed")
    out_f, in_f = module.weight.shape
    where = f"{name} (out_features={out_f}, in_features={in_f})"
    if qw.bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: bits={qw.bits} is not supported; expected one of {SUPPORTED_BITS}")
    if tuple(qw.codes.shape) != (out_f, in_f):
        raise ValueError(f"{where}: codes have shape {tuple(qw.codes.shape)}, expected [{out_f}, {in_f}]")
    per_block, _ = pack_block(qw.bits)
    if in_f % per_block:
        raise ValueError(f"{where}: in_features must be a multiple of {per_block} to pack {qw.bits}-bit qweight")
    if out_f % per_block:
        raise ValueError(f"{where}: out_features must be a multiple of {per_block} to pack {qw.bits}-bit qzeros")
    # A group size that does not divide in_features leaves a shorter last group: GPTQ loaders
    # (AutoGPTQ, GPTQModel) allocate ceil(in_features / group_size) groups, as we do.
    if qw.group_size != -1 and qw.group_size < 1:
        raise ValueError(f"{where}: group_size={qw.group_size} must be positive or -1")
    _validate_grid_tensors(where, qw, out_f, in_f)
    if fmt == "gptq" and bool((qw.zeros == 0).any()):
        raise ValueError(
            f"{where}: {int((qw.zeros == 0).sum())} zero point(s) are 0, which checkpoint_format 'gptq' "
            "(v1, stores zero-1) cannot represent; quantize with GridConfig(min_zero=1) or save with "
            "checkpoint_format='gptq_v2'"
        )


def _validate_grid_tensors(where: str, qw: QuantizedWeight, out_f: int, in_f: int) -> None:
    groups = n_groups(in_f, qw.group_size)
    for label, t in (("scales", qw.scales), ("zeros", qw.zeros)):
        if tuple(t.shape) != (groups, out_f):
            raise ValueError(
                f"{where}: {label} have shape {tuple(t.shape)}, expected [groups={groups}, out={out_f}] "
                f"for group_size={qw.group_size}"
            )
    if tuple(qw.g_idx.shape) != (in_f,):
        raise ValueError(f"{where}: g_idx has shape {tuple(qw.g_idx.shape)}, expected [{in_f}]")
    if in_f and (int(qw.g_idx.min()) < 0 or int(qw.g_idx.max()) >= groups):
        raise ValueError(f"{where}: g_idx values must lie in [0, {groups - 1}]")
    scales = qw.scales.float()
    if not bool(torch.isfinite(scales).all()) or not torch.equal(scales.half().float(), scales):
        raise ValueError(
            f"{where}: scales are not all finite float16 values; the checkpoint stores float16 scales, so "
            "quantize with GridConfig(fp16_scales=True) to keep the saved weights equal to these"
        )


def _common_grid(quantized: Mapping[str, QuantizedWeight], quant_config: QuantRecipe | None) -> tuple[int, int, bool]:
    """The one (bits, group_size, sym) a GPTQ quantization_config can describe."""
    grids = {(qw.bits, qw.group_size, qw.sym): name for name, qw in quantized.items()}
    if len(grids) > 1:
        detail = ", ".join(f"{n}: bits={b} group_size={g} sym={s}" for (b, g, s), n in grids.items())
        raise ValueError(f"all quantized layers must share bits, group_size and sym; found {detail}")
    ((bits, group_size, sym),) = grids
    if quant_config is not None:
        grid = quant_config.grid
        if (grid.bits, grid.group_size, grid.sym) != (bits, group_size, sym):
            raise ValueError(
                f"quant_config grid (bits={grid.bits}, group_size={grid.group_size}, sym={grid.sym}) does "
                f"not match the quantized weights (bits={bits}, group_size={group_size}, sym={sym})"
            )
    return bits, group_size, sym


def _checkpoint_tensors(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], fmt: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The model's state_dict with tied duplicates dropped and quantized weights packed."""
    state = _untied_state_dict(model, set(quantized))
    tensors: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.removesuffix(".weight") in quantized and key.endswith(".weight"):
            continue
        t = t.detach().to("cpu")
        tensors[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    for name, qw in quantized.items():
        tensors.update(_packed_tensors(name, qw, fmt))
    return tensors


def _untied_state_dict(model: nn.Module, quantized_names: set[str]) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with each tied weight kept once, under the name `from_pretrained` expects.

    safetensors refuses aliased tensors, and a loader re-ties the duplicates from the config. A
    quantized weight tied to another one is refused: reloading would re-tie it to a float copy.
    """
    state = model.state_dict()
    by_storage: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for key, t in state.items():
        by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(key)
    aliased = [keys for keys in by_storage.values() if len(keys) > 1]
    for keys in aliased:
        hit = [k for k in keys if k.removesuffix(".weight") in quantized_names and k.endswith(".weight")]
        if hit:
            raise ValueError(
                f"{hit[0].removesuffix('.weight')}: its weight is tied to {sorted(set(keys) - {hit[0]})}; "
                "a tied layer cannot be GPTQ-packed (leave it unquantized or untie it first)"
            )
    if not aliased:
        return state
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(dict(state), model)


def _packed_tensors(name: str, qw: QuantizedWeight, fmt: str) -> dict[str, torch.Tensor]:
    return {
        f"{name}.qweight": pack_qweight(qw.codes.cpu(), qw.bits),
        f"{name}.qzeros": pack_qzeros(qw.zeros.cpu(), qw.bits, v1=fmt == "gptq"),
        f"{name}.scales": qw.scales.detach().cpu().to(torch.float16).contiguous(),
        f"{name}.g_idx": qw.g_idx.detach().cpu().to(torch.int32).contiguous(),
    }


def _quantization_config(
    quantized: Mapping[str, QuantizedWeight],
    fmt: str,
    bits: int,
    group_size: int,
    sym: bool,
    quant_config: QuantRecipe | None,
    rpiq_meta: dict[str, Any] | None,
) -> dict[str, Any]:
    """The GPTQ `quantization_config` that GPTQModel, optimum and vLLM dispatch on.

    desc_act is derived from the g_idx actually written, not from the run's settings: loaders
    use it to choose kernels, and act-order with static groups yields a trivial g_idx.
    """
    desc_act = any(
        not torch.equal(qw.g_idx.cpu().to(torch.int32), trivial_g_idx(qw.codes.shape[1], group_size))
        for qw in quantized.values()
    )
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": fmt,
        "static_groups": bool(quant_config and quant_config.gptq.act_order and quant_config.gptq.static_groups),
        "true_sequential": True,
        "damp_percent": quant_config.gptq.percdamp if quant_config else 0.01,
        "lm_head": "lm_head" in quantized,
        "pack_dtype": "int32",
        # GPTQModel records the producing tool here; an honest name keeps its provenance checks meaningful.
        "meta": {"quantizer": [f"rpiq:{_rpiq_version()}"]},
        "rpiq": dict(rpiq_meta or {}),
    }


def _rpiq_version() -> str:
    try:
        return importlib.metadata.version("rpiq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _model_config_dict(model: nn.Module, quant: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"model of type {type(model).__name__} has no transformers `config` to save")
    d = config.to_dict()
    # Loaders pick the class from here (a VLM must not be rebuilt as its bare language model).
    d["architectures"] = d.get("architectures") or [type(model).__name__]
    dtype_name = str(dtype).removeprefix("torch.")
    d["dtype"] = dtype_name
    d["torch_dtype"] = dtype_name  # transformers < 5, AutoGPTQ and older vLLM read this key
    d["quantization_config"] = quant
    return d


# --------------------------------------------------------------------------- writing files


def _write_checkpoint(
    tmp: Path,
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    quant: dict[str, Any],
    tokenizer: Any,
    max_shard_bytes: int,
) -> None:
    _write_tensors(tmp, tensors, max_shard_bytes)
    _write_json(tmp / CONFIG_NAME, config)
    _write_json(tmp / QUANT_CONFIG_NAME, quant)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in state_dict order; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def _write_tensors(tmp: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        _write_shard(tmp / WEIGHTS_NAME, shards[0])
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(tmp / fname, shard)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
