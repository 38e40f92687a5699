"""GPTQ checkpoints: write quantized models for the GPTQ ecosystem, read them back exactly.

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
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from quantizer.config import QuantConfig
from quantizer.result import QuantizedWeight

from .packing import SUPPORTED_BITS, pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CheckpointFormat = Literal["gptq", "gptq_v2"]
CHECKPOINT_FORMATS: tuple[str, ...] = ("gptq", "gptq_v2")

CONFIG_NAME = "config.json"
QUANT_CONFIG_NAME = "quantize_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_WORD_BITS = 32


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, unreadable or inconsistent.

    A `ValueError` so that callers treating bad input uniformly keep working; its own type so
    that the CLI can tell a broken checkpoint from a bad argument.
    """


@dataclass
class QuantizedCheckpoint:
    """What a GPTQ checkpoint holds, unpacked back to the quantizer's logical layout."""

    config: dict[str, Any]
    quant: dict[str, Any]
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


# =========================================================================== shared rules


def _block(bits: int) -> tuple[int, int]:
    """(values, int32 words) per packing block; 3 bits packs 32 values into 3 words."""
    g = math.gcd(bits, _WORD_BITS)
    return _WORD_BITS // g, bits // g


def _n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def _trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The g_idx of a layer quantized in natural column order (no act-order permutation)."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


# =========================================================================== saving


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
    quant_config: QuantConfig | None = None,
    source_dir: str | Path | None = None,
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
    config = _model_config_dict(model, quant, dtype)
    source = _source_dir(model, source_dir)

    def write(tmp: Path) -> None:
        _write_checkpoint(tmp, model, tensors, config, quant, tokenizer, max_shard_bytes)
        if source is not None:
            _copy_model_files(source, tmp, remote_code="auto_map" in config)

    return _write_atomically(out_dir, write)


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
    from .vlm import PROCESSOR_FILES

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
    per_block, _ = _block(qw.bits)
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
    groups = _n_groups(in_f, qw.group_size)
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


def _common_grid(quantized: Mapping[str, QuantizedWeight], quant_config: QuantConfig | None) -> tuple[int, int, bool]:
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
    quant_config: QuantConfig | None,
    rpiq_meta: dict[str, Any] | None,
) -> dict[str, Any]:
    """The GPTQ `quantization_config` that GPTQModel, optimum and vLLM dispatch on.

    desc_act is derived from the g_idx actually written, not from the run's settings: loaders
    use it to choose kernels, and act-order with static groups yields a trivial g_idx.
    """
    gptq = (quant_config or QuantConfig()).gptq
    desc_act = any(
        not torch.equal(qw.g_idx.cpu().to(torch.int32), _trivial_g_idx(qw.codes.shape[1], group_size))
        for qw in quantized.values()
    )
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": fmt,
        "static_groups": bool(gptq.act_order and gptq.static_groups),
        "true_sequential": True,
        "damp_percent": gptq.percdamp,
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


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory so the rename below publishes data, not empty inodes."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` in a hidden sibling directory, then swap it in place of `out_dir`."""
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        _swap_in(tmp, out_dir, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _swap_in(tmp: Path, out_dir: Path, old: Path) -> None:
    moved_aside = out_dir.exists()
    if moved_aside:
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if moved_aside:
            os.replace(old, out_dir)
        raise
    _fsync_dir(out_dir.parent)


# =========================================================================== loading


def load_quantized_state(path: str | Path) -> QuantizedCheckpoint:
    """Read a GPTQ checkpoint directory back into `QuantizedWeight`s and plain tensors.

    Everything is validated against the quantization_config, so a loader further down never
    sees a tensor of the wrong shape; errors are `CheckpointError`s naming file and tensor.
    """
    stream = open_checkpoint(path)
    weights = {name: stream.quantized_weight(name) for name in stream.quantized_names}
    return QuantizedCheckpoint(config=stream.config, quant=stream.quant, weights=weights, tensors=dict(stream.rest()))


@dataclass
class CheckpointStream:
    """A validated checkpoint whose tensors are read from disk one module at a time.

    What an int4 loader needs to keep peak memory near the model's final size: headers and
    configs are checked up front, tensor data is only touched by `quantized_weight` / `rest`.
    """

    path: Path
    config: dict[str, Any]
    quant: dict[str, Any]
    bits: int
    group_size: int
    sym: bool
    checkpoint_format: str
    quantized_names: list[str]
    _tensors: _ShardTensors

    def quantized_weight(self, name: str) -> QuantizedWeight:
        """Module `name`'s GPTQ tensors, checked and unpacked (and dropped from the stream)."""
        t, fmt = self._tensors, self.checkpoint_format
        return _unpack_module(name, t, t.origin, self.bits, self.group_size, self.sym, fmt, self.quant)

    def take(self, key: str) -> torch.Tensor:
        """One plain tensor by name (dropped from the stream); `CheckpointError` if absent."""
        if key not in self._tensors:
            raise CheckpointError(f"{self.path}: tensor '{key}' is missing from the checkpoint")
        return self._tensors.pop(key)

    def rest(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor not yet taken by `quantized_weight`, read one at a time."""
        for key in list(self._tensors):
            yield key, self._tensors.pop(key)


def open_checkpoint(path: str | Path) -> CheckpointStream:
    """Open and validate a GPTQ checkpoint directory without reading its tensor data."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = _read_json(path / CONFIG_NAME)
    quant = _quant_config_of(path, config)
    bits, group_size, sym, fmt = _quant_params(path, quant)
    tensors = _ShardTensors(path)
    names = _quantized_modules(tensors, tensors.origin)
    return CheckpointStream(path, config, quant, bits, group_size, sym, fmt, names, tensors)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _quant_config_of(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """config.json's quantization_config, or AutoGPTQ's separate quantize_config.json."""
    quant = config.get("quantization_config")
    if quant is None and (path / QUANT_CONFIG_NAME).is_file():
        quant = _read_json(path / QUANT_CONFIG_NAME)
    if quant is None:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: no 'quantization_config' (and no {QUANT_CONFIG_NAME}); "
            "this is not a quantized checkpoint"
        )
    if not isinstance(quant, dict):
        raise CheckpointError(f"{path / CONFIG_NAME}: 'quantization_config' must be a JSON object")
    return quant


def _quant_params(path: Path, quant: dict[str, Any]) -> tuple[int, int, bool, str]:
    where = f"{path / CONFIG_NAME}: quantization_config"
    method = str(quant.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise CheckpointError(f"{where}: quant_method={method!r} is not supported (only 'gptq')")
    bits = quant.get("bits")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{where}: bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")
    group_size = quant.get("group_size", -1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise CheckpointError(f"{where}: group_size={group_size!r} must be a positive int or -1")
    fmt = quant.get("checkpoint_format") or quant.get("format") or "gptq"
    if fmt not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"{where}: checkpoint_format={fmt!r} is not supported; expected {CHECKPOINT_FORMATS}")
    return bits, group_size, bool(quant.get("sym", True)), fmt


def _weight_files(path: Path) -> dict[str, list[str] | None]:
    """Shard file name -> the tensor names the index promises in it (None when there is no index)."""
    index_path = path / INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: 'weight_map' is missing or empty")
        files: dict[str, list[str] | None] = {}
        for tensor, fname in weight_map.items():
            files.setdefault(str(fname), []).append(tensor)  # type: ignore[union-attr]
        return files
    if (path / WEIGHTS_NAME).is_file():
        return {WEIGHTS_NAME: None}
    raise CheckpointError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")


class _ShardTensors(MutableMapping[str, torch.Tensor]):
    """All tensors of all shards by name, each read from its file when first asked for.

    Headers are checked when the mapping is built (a truncated file fails here, naming it);
    `origin` maps each tensor to its file for error messages. Deleting a key forgets it.
    """

    def __init__(self, path: Path) -> None:
        self.origin: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        for fname, promised in _weight_files(path).items():
            fpath = path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: file is missing (listed in {INDEX_NAME})")
            handle = _open_safetensors(fpath)
            self._handles[str(fpath)] = handle
            keys = list(handle.keys())
            for key in keys:
                if key in self.origin:
                    raise CheckpointError(f"{fpath}: tensor '{key}' also appears in {self.origin[key]}")
                self.origin[key] = str(fpath)
            missing = sorted(set(promised or ()) - set(keys))
            if missing:
                raise CheckpointError(f"{fpath}: tensors listed in {INDEX_NAME} are missing: {missing[:10]}")
        self._keys = dict.fromkeys(self.origin)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        fpath = self.origin[key]
        try:
            return self._handles[fpath].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{fpath}: corrupt or truncated safetensors file while reading tensor '{key}' "
                f"({type(e).__name__}: {e}); re-save or re-download it"
            ) from e

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        raise TypeError("checkpoint tensors are read-only")

    def __delitem__(self, key: str) -> None:
        del self._keys[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys


def _open_safetensors(fpath: Path) -> Any:
    """A lazy handle on the file; safetensors' terse header errors become ones that name it."""
    try:
        return safe_open(str(fpath), framework="pt", device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"{fpath}: corrupt or truncated safetensors file ({type(e).__name__}: {e}); re-save or re-download it"
        ) from e


def _quantized_modules(tensors: Mapping[str, torch.Tensor], origin: dict[str, str]) -> list[str]:
    """Module names that carry any GPTQ tensor; each must carry qweight, qzeros and scales."""
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in QUANT_SUFFIXES})
    for name in names:
        present = [s for s in QUANT_SUFFIXES if f"{name}.{s}" in tensors]
        if "qweight" not in present:  # g_idx may be absent in old checkpoints; qweight never
            continue
        for suffix in ("qzeros", "scales"):
            if f"{name}.{suffix}" not in tensors:
                raise CheckpointError(
                    f"{origin[f'{name}.qweight']}: tensor '{name}.{suffix}' is missing "
                    f"(module '{name}' has {', '.join(present)})"
                )
    orphans = [n for n in names if f"{n}.qweight" not in tensors and f"{n}.scales" in tensors]
    if orphans:
        key = f"{orphans[0]}.scales"
        raise CheckpointError(f"{origin[key]}: tensor '{orphans[0]}.qweight' is missing (found '{key}')")
    return [n for n in names if f"{n}.qweight" in tensors]


def _unpack_module(
    name: str,
    tensors: MutableMapping[str, torch.Tensor],
    origin: dict[str, str],
    bits: int,
    group_size: int,
    sym: bool,
    fmt: str,
    quant: dict[str, Any],
) -> QuantizedWeight:
    """Check one module's tensors against the config, unpack them, remove them from `tensors`."""
    qweight = _expect(tensors, origin, f"{name}.qweight", torch.int32, ndim=2)
    per_block, words = _block(bits)
    if qweight.shape[0] % words:
        _bad_shape(origin, f"{name}.qweight", qweight, f"rows must be a multiple of {words} at bits={bits}")
    in_f, out_f = qweight.shape[0] // words * per_block, qweight.shape[1]
    if out_f % per_block:
        _bad_shape(origin, f"{name}.qweight", qweight, f"out_features must be a multiple of {per_block}")
    groups = _n_groups(in_f, group_size)
    scales = _expect(tensors, origin, f"{name}.scales", torch.float16, shape=(groups, out_f))
    qzeros = _expect(tensors, origin, f"{name}.qzeros", torch.int32, shape=(groups, out_f * bits // _WORD_BITS))
    g_idx = _g_idx(name, tensors, origin, in_f, group_size, groups, quant)
    try:
        codes = unpack_qweight(qweight, bits, in_f)
        zeros = unpack_qzeros(qzeros, bits, out_f, v1=fmt == "gptq")
    except ValueError as e:
        raise CheckpointError(f"{origin[f'{name}.qweight']}: module '{name}': {e}") from e
    for suffix in QUANT_SUFFIXES:
        tensors.pop(f"{name}.{suffix}", None)
    return QuantizedWeight(
        codes=codes,
        scales=scales.float(),
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def _g_idx(
    name: str,
    tensors: Mapping[str, torch.Tensor],
    origin: dict[str, str],
    in_f: int,
    group_size: int,
    groups: int,
    quant: dict[str, Any],
) -> torch.Tensor:
    key = f"{name}.g_idx"
    if key not in tensors:
        if quant.get("desc_act"):
            raise CheckpointError(
                f"{origin[f'{name}.qweight']}: tensor '{key}' is missing, required with desc_act=true"
            )
        return _trivial_g_idx(in_f, group_size)
    g_idx = _expect(tensors, origin, key, torch.int32, shape=(in_f,))
    if in_f and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise CheckpointError(
            f"{origin[key]}: tensor '{key}' has values in [{int(g_idx.min())}, {int(g_idx.max())}], "
            f"expected [0, {groups - 1}]"
        )
    return g_idx.contiguous()


def _expect(
    tensors: Mapping[str, torch.Tensor],
    origin: dict[str, str],
    key: str,
    dtype: torch.dtype,
    *,
    shape: tuple[int, ...] | None = None,
    ndim: int | None = None,
) -> torch.Tensor:
    t = tensors[key]
    if t.dtype != dtype:
        raise CheckpointError(f"{origin[key]}: tensor '{key}' has dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != shape:
        _bad_shape(origin, key, t, f"expected {list(shape)}")
    if ndim is not None and t.ndim != ndim:
        _bad_shape(origin, key, t, f"expected {ndim} dimensions")
    return t


def _bad_shape(origin: dict[str, str], key: str, t: torch.Tensor, rule: str) -> None:
    raise CheckpointError(f"{origin[key]}: tensor '{key}' has shape {list(t.shape)}; {rule}")


# --------------------------------------------------------------------------- dequantized model


def dequantized_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A plain transformers model whose linears hold the checkpoint's dequantized weights.

    This evaluates a checkpoint without int4 kernels: the numbers are those a GPTQ kernel
    computes (up to its accumulation order), from exactly the bytes on disk.
    """
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from .architectures import from_config

    ckpt = load_quantized_state(path)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # or transformers would look for a GPTQ backend
    with no_init_weights():  # every weight is overwritten below; random init is wasted time
        model = from_config(config, dtype=dtype)
    model.tie_weights()  # skipped under no_init_weights; the key check below relies on it
    state = _dequantized_state(ckpt, dtype)
    _check_keys(Path(path), model, state)
    model.load_state_dict(state, strict=False)
    return model.eval()


def _dequantized_state(ckpt: QuantizedCheckpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in ckpt.tensors.items()}
    for name, qw in ckpt.weights.items():
        state[f"{name}.weight"] = qw.dequantize().to(dtype)
    return state


def _check_keys(path: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict loading that still accepts tied weights stored once, as save_pretrained writes them."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model_state = model.state_dict()
    required = set(remove_tied_weights_from_state_dict(dict(model_state), model))
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - set(model_state))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match the {type(model).__name__} built from {CONFIG_NAME}: "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    for key, t in state.items():
        if tuple(model_state[key].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{path}: tensor '{key}' has shape {list(t.shape)}, the model expects {list(model_state[key].shape)}"
            )


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of a checkpoint's tensor files (what a device must store and load)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
