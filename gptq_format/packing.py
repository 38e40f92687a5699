"""GPTQ checkpoint tensor packing, bit-compatible with AutoGPTQ / GPTQModel / transformers / vLLM.

A GPTQ checkpoint stores b-bit integer codes packed into int32 words:

* ``qweight`` [in_features * bits // 32, out_features]: codes packed along the *input* dimension;
* ``qzeros`` [n_groups, out_features * bits // 32]: zero points packed along the *output* dimension.

Within one packing axis the layout is a plain little-endian bit stream: value ``j`` of a block
occupies bits ``bits*j .. bits*j + bits - 1`` of the concatenated words, lowest word first. For
2/4/8 bits a block is one word holding ``32 // bits`` values; for 3 bits a block is 32 values in
3 words, so values 10 and 21 straddle word boundaries (exactly AutoGPTQ's 3-bit ``pack``).
Words are stored as the int32 reinterpretation of the uint32 bit pattern, so a word whose top
bit is set is a negative int32, as in every GPTQ checkpoint.

Zero points come in two forms. The legacy "v1" form (``checkpoint_format == "gptq"``) stores
``zero - 1`` and readers add 1 back; a zero of 0 cannot be stored there (it would become -1,
whose all-ones bit pattern corrupts the neighbouring values), so it is rejected here instead of
silently producing a broken checkpoint. The "v2" form (``gptq_v2``) stores zeros as they are.

All work is vectorised torch ops on the input's device; the only Python loop runs over the
(at most 32) value slots of one block.
"""

from __future__ import annotations

import torch

from .spec import WORD_BITS as _WORD_BITS
from .spec import pack_block as _block
from .weight import SUPPORTED_BITS

_UNPACK_CHUNK = 4096  # output columns unpacked at a time
_WORD_MASK = (1 << _WORD_BITS) - 1
_INT_DTYPES = frozenset(
    {
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
    }
)


# --------------------------------------------------------------------------- validation helpers


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")


def _check_ndim(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got ndim={t.ndim} (shape {tuple(t.shape)})")


def _check_codes(t: torch.Tensor, name: str, bits: int) -> torch.Tensor:
    """Validate an integer code tensor and return it as int64 (room for shifts without overflow)."""
    _check_ndim(t, name)
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must have an integer dtype, got dtype={t.dtype}")
    t64 = t.to(torch.int64)
    if t64.numel():
        lo, hi = int(t64.min()), int(t64.max())
        if lo < 0 or hi > (1 << bits) - 1:
            raise ValueError(
                f"{name} values must lie in [0, {(1 << bits) - 1}] for bits={bits}, got range [{lo}, {hi}]"
            )
    return t64


def _check_multiple(n: int, name: str, bits: int) -> None:
    per_block, _ = _block(bits)
    if n % per_block:
        raise ValueError(f"{name}={n} must be a multiple of {per_block} for bits={bits}")


def _check_count(n: int, name: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{name} must be a positive int, got {n!r}")


def _check_packed(t: torch.Tensor, name: str) -> None:
    _check_ndim(t, name)
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must have dtype torch.int32, got dtype={t.dtype}")


# --------------------------------------------------------------------------- core bit stream


def _pack_dim0(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int64 values [N, M] (N a multiple of the block size) into int32 [N * bits // 32, M]."""
    n, m = values.shape
    per_block, words_per_block = _block(bits)
    v = values.reshape(n // per_block, per_block, m)
    words = torch.zeros((n // per_block, words_per_block, m), dtype=torch.int64, device=values.device)
    for j in range(per_block):
        w, s = divmod(bits * j, _WORD_BITS)
        vj = v[:, j, :]
        words[:, w, :] |= (vj << s) & _WORD_MASK
        if s + bits > _WORD_BITS:  # 3-bit value straddling into the next word
            words[:, w + 1, :] |= vj >> (_WORD_BITS - s)
    words = words.reshape(n * bits // _WORD_BITS, m)
    # uint32 bit pattern -> int32 with the same bits (explicit, not relying on cast wrap-around)
    words = torch.where(words >= (1 << 31), words - (1 << _WORD_BITS), words)
    return words.to(torch.int32)


def _unpack_dim0(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `_pack_dim0`: int32 [N * bits // 32, M] -> int64 values [N, M]."""
    rows, m = packed.shape
    per_block, words_per_block = _block(bits)
    words = (packed.to(torch.int64) & _WORD_MASK).reshape(rows // words_per_block, words_per_block, m)
    mask = (1 << bits) - 1
    out = []
    for j in range(per_block):
        w, s = divmod(bits * j, _WORD_BITS)
        vj = words[:, w, :] >> s
        if s + bits > _WORD_BITS:
            vj = vj | (words[:, w + 1, :] << (_WORD_BITS - s))
        out.append(vj & mask)
    return torch.stack(out, dim=1).reshape(rows // words_per_block * per_block, m)


# --------------------------------------------------------------------------- public API


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [out_features, in_features] into GPTQ ``qweight`` int32 [in_features*bits//32, out].

    Packing runs along the input dimension because GPTQ kernels dequantize a tile of input rows
    per word; the layout must match theirs bit for bit or the checkpoint loads as noise.
    """
    _check_bits(bits)
    c = _check_codes(codes, "codes", bits)
    _check_multiple(c.shape[1], "in_features", bits)
    return _pack_dim0(c.t().contiguous(), bits).contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Unpack GPTQ ``qweight`` back to uint8 codes [out_features, in_features] (for checks and reloads)."""
    _check_bits(bits)
    _check_packed(qweight, "qweight")
    _check_count(in_features, "in_features")
    _check_multiple(in_features, "in_features", bits)
    expected = in_features * bits // _WORD_BITS
    if qweight.shape[0] != expected:
        raise ValueError(
            f"qweight has {qweight.shape[0]} rows but in_features={in_features} at bits={bits} needs {expected}"
        )
    # Column chunks bound the int64 temporaries (16 bytes per code) to a few tens of MB: a whole
    # 49152 x 576 LM head unpacked at once peaked at ~0.5 GB while loading.
    out = torch.empty((qweight.shape[1], in_features), dtype=torch.uint8, device=qweight.device)
    for start in range(0, qweight.shape[1], _UNPACK_CHUNK):
        chunk = qweight[:, start : start + _UNPACK_CHUNK]
        out[start : start + chunk.shape[1]] = _unpack_dim0(chunk, bits).t()
    return out


def pack_qzeros(zeros: torch.Tensor, bits: int, *, v1: bool) -> torch.Tensor:
    """Pack zero points [n_groups, out_features] into GPTQ ``qzeros`` int32 [n_groups, out*bits//32].

    ``v1=True`` writes the legacy form (stores zero-1, for ``checkpoint_format="gptq"`` readers,
    which add 1 back); ``v1=False`` stores zeros unchanged (``gptq_v2``).
    """
    _check_bits(bits)
    z = _check_codes(zeros, "zeros", bits)
    _check_multiple(z.shape[1], "out_features", bits)
    if v1:
        if z.numel() and bool((z == 0).any()):
            n0 = int((z == 0).sum())
            raise ValueError(
                f"zeros contains {n0} zero point(s) equal to 0, which the GPTQ v1 format cannot store "
                "(it stores zero-1, so 0 becomes -1 and corrupts neighbouring values); "
                "write checkpoint_format 'gptq_v2' (v1=False) or quantize with min_zero=1"
            )
        z = z - 1
    return _pack_dim0(z.t().contiguous(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, *, v1: bool) -> torch.Tensor:
    """Unpack GPTQ ``qzeros`` to int32 zero points [n_groups, out_features] (v1 adds the 1 back)."""
    _check_bits(bits)
    _check_packed(qzeros, "qzeros")
    _check_count(out_features, "out_features")
    _check_multiple(out_features, "out_features", bits)
    expected = out_features * bits // _WORD_BITS
    if qzeros.shape[1] != expected:
        raise ValueError(
            f"qzeros has {qzeros.shape[1]} columns but out_features={out_features} at bits={bits} needs {expected}"
        )
    z = _unpack_dim0(qzeros.t(), bits).t()
    if v1:
        z = z + 1
    return z.contiguous().to(torch.int32)
