"""Row-wise int8 token embeddings (and the LM head tied to them) in a GPTQ checkpoint.

GPTQ quantizes linear layers only; a small model's token embedding then stays the largest 16-bit
tensor it has (SmolLM2-135M: 49152 x 576, 54 MiB of its 100 MiB int4 checkpoint), and with tied
word embeddings the LM head reads all of it for every generated token. This module stores such a
table as symmetric int8 with one float16 scale per row (per token):

    w[r, c] ~= scales[r] * qweight[r, c],   qweight in [-127, 127],  scales[r] = absmax(w[r]) / 127

under ``<module>.qweight_int8`` (int8 [rows, cols]) and ``<module>.scales_int8`` (float16 [rows])
instead of ``<module>.weight``, and records it in ``quantization_config["rpiq"]["embeddings"]``::

    {"bits": 8, "group_size": -1, "sym": true, "format": "int8-rowwise",
     "modules": ["model.embed_tokens"], "tied": {"lm_head": "model.embed_tokens"}}

``tied`` names the output projections that share a table: they are not stored at all (the same
int8 rows serve the head). Scales are rounded to float16 *before* the codes are chosen, so the
stored (codes, scales) reproduce the in-memory dequantized table bit for bit.

Third-party GPTQ loaders (transformers + optimum/GPTQModel, vLLM) do not know these two tensors:
they report ``<module>.weight`` as missing and initialise it randomly, so such a checkpoint runs
correctly only with rpiq's loaders (`models.int4.load_quantized`, `models.dequantized`).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .spec import CheckpointError

QWEIGHT_SUFFIX = "qweight_int8"
SCALES_SUFFIX = "scales_int8"
CONFIG_KEY = "embeddings"  # under quantization_config["rpiq"]
EMBEDDING_BITS = (8,)
FORMAT = "int8-rowwise"
QMAX = 127  # symmetric: -128 is never used, so negating a row negates its codes exactly
_FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal): a scale never rounds to zero


@dataclass
class Int8Rows:
    """A table quantized per row: ``w[r] ~= scales[r] * qweight[r]``."""

    qweight: torch.Tensor  # [rows, cols] int8 in [-127, 127]
    scales: torch.Tensor  # [rows] float32, every value float16-representable

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 2  # as stored: int8 codes, float16 scales

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The table these codes stand for (exact in float32: an fp16 scale times an int8 code)."""
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)


def quantize_rows(weight: torch.Tensor, bits: int = 8) -> Int8Rows:
    """Symmetric per-row quantization of a 2-D table to int8 codes and float16-representable scales."""
    if bits not in EMBEDDING_BITS:
        raise ValueError(f"embedding bits={bits} is not supported; expected one of {EMBEDDING_BITS}")
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D floating table, got {weight.dtype} {list(weight.shape)}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the table has non-finite values; it cannot be quantized")
    scales = (w.abs().amax(dim=1) / QMAX).half().float()
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("a row's absmax / 127 overflows float16; the table cannot be stored with fp16 scales")
    scales = scales.clamp_min(_FP16_TINY)  # all-zero (or tiny) rows: any positive scale codes them as 0
    codes = torch.round(w / scales[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return Int8Rows(qweight=codes.contiguous(), scales=scales)


def tied_names(model: nn.Module, name: str) -> list[str]:
    """Modules whose ``weight`` is the very tensor of module `name`'s (a tied LM head), sorted."""
    weight = model.get_submodule(name).weight
    return sorted(
        n for n, m in model.named_modules(remove_duplicate=False) if n != name and getattr(m, "weight", None) is weight
    )


def quantize_embeddings(model: nn.Module, bits: int = 8) -> dict[str, Int8Rows]:
    """Quantize `model`'s input embedding table in place; returns ``{module name: Int8Rows}`` to save.

    The table is overwritten with its dequantized values (an LM head tied to it follows), so the
    model in memory computes what the checkpoint will: calibrate the linears *after* this call and
    they see the embeddings they will be served with.
    """
    emb = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is emb)
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"{name}: is a {type(emb).__name__}, only nn.Embedding tables can be quantized")
    rows = quantize_rows(emb.weight, bits)
    with torch.no_grad():
        emb.weight.copy_(rows.dequantize(emb.weight.dtype))
    return {name: rows}


# --------------------------------------------------------------------------- writing


def add_embeddings(
    model: nn.Module, embeddings: Mapping[str, Int8Rows], tensors: MutableMapping[str, torch.Tensor], quant: dict
) -> None:
    """Replace each table's ``weight`` (and tied copies) in `tensors` by its int8 rows; describe it in `quant`."""
    tied: dict[str, str] = {}
    for name, rows in embeddings.items():
        module = dict(model.named_modules()).get(name)
        if not isinstance(module, nn.Embedding):
            raise ValueError(f"{name}: no nn.Embedding of that name in the model")
        if tuple(module.weight.shape) != rows.shape:
            raise ValueError(f"{name}: int8 rows {list(rows.shape)} do not match the table {list(module.weight.shape)}")
        heads = tied_names(model, name)
        for key in (name, *heads):
            tensors.pop(f"{key}.weight", None)
        tied.update(dict.fromkeys(heads, name))
        tensors[f"{name}.{QWEIGHT_SUFFIX}"] = rows.qweight.detach().cpu().to(torch.int8).contiguous()
        tensors[f"{name}.{SCALES_SUFFIX}"] = rows.scales.detach().cpu().to(torch.float16).contiguous()
    quant.setdefault("rpiq", {})[CONFIG_KEY] = {
        "bits": 8,
        "group_size": -1,
        "sym": True,
        "format": FORMAT,
        "modules": sorted(embeddings),
        "tied": tied,
    }


# --------------------------------------------------------------------------- reading


def embedding_spec(quant: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """The checked ``rpiq.embeddings`` entry of a quantization_config (None: no quantized embeddings)."""
    rpiq = quant.get("rpiq")
    spec = rpiq.get(CONFIG_KEY) if isinstance(rpiq, dict) else None
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or spec.get("bits") not in EMBEDDING_BITS:
        raise CheckpointError(f"{where}: rpiq.embeddings={spec!r} is not a supported format (expected {FORMAT!r})")
    modules, tied = spec.get("modules"), spec.get("tied", {})
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise CheckpointError(f"{where}: rpiq.embeddings.modules must be a list of module names")
    if not isinstance(tied, dict) or not set(tied.values()) <= set(modules):
        raise CheckpointError(f"{where}: rpiq.embeddings.tied must map heads to listed modules, got {tied!r}")
    return spec


def read_rows(tensors: Mapping[str, torch.Tensor], origin: Mapping[str, str], name: str, where: str) -> Int8Rows:
    """Module `name`'s int8 rows from `tensors`, dtype- and shape-checked (errors name file and tensor)."""
    qkey, skey = f"{name}.{QWEIGHT_SUFFIX}", f"{name}.{SCALES_SUFFIX}"
    for key in (qkey, skey):
        if key not in tensors:
            raise CheckpointError(f"{where}: tensor '{key}' is missing (rpiq.embeddings lists '{name}')")
    qweight, scales = tensors[qkey], tensors[skey]
    if qweight.dtype != torch.int8 or qweight.ndim != 2:
        what = f"{qweight.dtype} {list(qweight.shape)}"
        raise CheckpointError(f"{origin[qkey]}: tensor '{qkey}' is {what}, expected 2-D int8")
    if scales.dtype != torch.float16 or tuple(scales.shape) != (qweight.shape[0],):
        what = f"{scales.dtype} {list(scales.shape)}"
        raise CheckpointError(f"{origin[skey]}: tensor '{skey}' is {what}, expected float16 [{qweight.shape[0]}]")
    return Int8Rows(qweight=qweight.contiguous(), scales=scales.float())
