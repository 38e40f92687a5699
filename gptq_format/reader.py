"""Reading GPTQ checkpoints back exactly, validated, one module at a time.

Reading validates every tensor's presence, dtype and shape and names the file and the tensor on
failure: a truncated download should say which file to fetch again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .embedding import QWEIGHT_SUFFIX, SCALES_SUFFIX, Int8Rows, embedding_spec, read_rows
from .packing import unpack_qweight, unpack_qzeros
from .spec import (
    CHECKPOINT_FORMATS,
    CONFIG_NAME,
    INDEX_NAME,
    QUANT_CONFIG_NAME,
    QUANT_SUFFIXES,
    WEIGHTS_NAME,
    WORD_BITS,
    CheckpointError,
    n_groups,
    pack_block,
    trivial_g_idx,
)
from .weight import SUPPORTED_BITS, QuantizedWeight


@dataclass
class QuantizedCheckpoint:
    """What a GPTQ checkpoint holds, unpacked back to the quantizer's logical layout."""

    config: dict[str, Any]
    quant: dict[str, Any]
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    embeddings: dict[str, Int8Rows] = field(default_factory=dict)
    """Int8 embedding tables as stored; `tensors` also holds each one dequantized as ``<name>.weight``."""


# =========================================================================== shared rules


def load_quantized_state(path: str | Path) -> QuantizedCheckpoint:
    """Read a GPTQ checkpoint directory back into `QuantizedWeight`s and plain tensors.

    Everything is validated against the quantization_config, so a loader further down never
    sees a tensor of the wrong shape; errors are `CheckpointError`s naming file and tensor.
    """
    stream = open_checkpoint(path)
    weights = {name: stream.quantized_weight(name) for name in stream.quantized_names}
    embeddings = {name: stream.embedding(name) for name in stream.embedding_names}
    tensors = dict(stream.rest())
    tensors.update({f"{name}.weight": rows.dequantize() for name, rows in embeddings.items()})
    return QuantizedCheckpoint(stream.config, stream.quant, weights, tensors, embeddings)


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
    embedding_names: list[str] = field(default_factory=list)
    """Embedding tables stored as int8 rows (`gptq_format.embedding`), read with `embedding`."""
    tied_heads: dict[str, str] = field(default_factory=dict)
    """Output projections (e.g. ``lm_head``) served by the int8 rows of the named embedding table."""

    def quantized_weight(self, name: str) -> QuantizedWeight:
        """Module `name`'s GPTQ tensors, checked and unpacked (and dropped from the stream)."""
        t, fmt = self._tensors, self.checkpoint_format
        return _unpack_module(name, t, t.origin, self.bits, self.group_size, self.sym, fmt, self.quant)

    def embedding(self, name: str) -> Int8Rows:
        """Embedding table `name`'s int8 rows, checked (and dropped from the stream)."""
        rows = read_rows(self._tensors, self._tensors.origin, name, str(self.path / CONFIG_NAME))
        for suffix in (QWEIGHT_SUFFIX, SCALES_SUFFIX):
            self._tensors.pop(f"{name}.{suffix}")
        return rows

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
    spec = embedding_spec(quant, str(path / CONFIG_NAME)) or {"modules": [], "tied": {}}
    return CheckpointStream(
        path, config, quant, bits, group_size, sym, fmt, names, tensors, list(spec["modules"]), dict(spec["tied"])
    )


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
    per_block, words = pack_block(bits)
    if qweight.shape[0] % words:
        _bad_shape(origin, f"{name}.qweight", qweight, f"rows must be a multiple of {words} at bits={bits}")
    in_f, out_f = qweight.shape[0] // words * per_block, qweight.shape[1]
    if out_f % per_block:
        _bad_shape(origin, f"{name}.qweight", qweight, f"out_features must be a multiple of {per_block}")
    groups = n_groups(in_f, group_size)
    scales = _expect(tensors, origin, f"{name}.scales", torch.float16, shape=(groups, out_f))
    qzeros = _expect(tensors, origin, f"{name}.qzeros", torch.int32, shape=(groups, out_f * bits // WORD_BITS))
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
        return trivial_g_idx(in_f, group_size)
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


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of a checkpoint's tensor files (what a device must store and load)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
