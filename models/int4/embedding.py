"""Int8 token embeddings at run time: a row gather, and the LM head tied to the same int8 rows.

`QuantEmbedding` keeps the table as the checkpoint stores it (`gptq_format.embedding`: int8 codes
and one scale per row) and dequantizes only the rows a forward pass looks up, so the model never
holds a 16-bit table. `QuantTiedHead` is the output projection of a model with tied word
embeddings: ``logits = h @ (s * Q)^T = (h @ Q^T) * s``, on torch's int8 weight-only matmul
(``aten._weight_int8pack_mm``, bf16/fp16 activations on the CPU) for a few rows at a time, and
otherwise by dequantizing the table a chunk of rows at a time (a few MiB transient, never the whole).
It holds no tensor of its own: the embedding's buffers are the only copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptq_format import CheckpointError, CheckpointStream
from gptq_format.embedding import Int8Rows

INT8PACK_MAX_ROWS = 8  # above this, dequantizing by chunks into a dense matmul is faster (2-core CPU, bf16)
CHUNK_ROWS = 8192  # rows of the table dequantized at once on the chunked path (576 columns: 9 MiB in bf16)


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` over an int8 table with per-row scales; returns `dtype` rows.

    `embed_scale` reproduces scaled embeddings (Gemma multiplies the looked-up rows by sqrt(hidden)).
    """

    def __init__(self, rows: Int8Rows, device: torch.device, dtype: torch.dtype, *, like: nn.Module) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = rows.shape
        self.padding_idx = getattr(like, "padding_idx", None)
        self.dtype = dtype
        self.register_buffer("qweight", rows.qweight.to(device=device, dtype=torch.int8), persistent=False)
        self.register_buffer("scales", rows.scales.to(device=device, dtype=torch.float32), persistent=False)
        scale = getattr(like, "embed_scale", None)
        self.embed_scale = None if scale is None else float(scale)
        # the scale as a tensor made once: one made per call would be a host-to-device copy, which a CUDA
        # graph cannot record (`models.graph_decode`)
        scale_t = None if scale is None else torch.tensor(float(scale), dtype=dtype, device=device)
        self.register_buffer("embed_scale_t", scale_t, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        rows = self.qweight.index_select(0, ids).float() * self.scales.index_select(0, ids)[:, None]
        out = rows.to(self.dtype)
        if self.embed_scale is not None:
            out = out * self.embed_scale_t
        return out.reshape(*input_ids.shape, self.embedding_dim)

    def rows(self) -> Int8Rows:
        return Int8Rows(qweight=self.qweight, scales=self.scales)

    def scales_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The row scales in `dtype`, converted once (the tied head asks for them every token)."""
        cached = self.__dict__.setdefault("_scales_by_dtype", {})
        if dtype not in cached or cached[dtype].device != self.scales.device:
            cached[dtype] = self.scales.to(dtype)
        return cached[dtype]

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows, dtype={self.dtype}"


def int8_rows_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, scales_like_x: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (scales[:, None] * qweight)^T`` for a 2-D `x`, in `x`'s dtype, never dequantizing the whole table.
    `scales_like_x`: the same scales already in `x`'s dtype (the int8 kernel's operand), if the caller keeps them."""
    fast = hasattr(torch.ops.aten, "_weight_int8pack_mm") and x.device.type == "cpu"
    if fast and x.shape[0] <= INT8PACK_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16):
        lowp = scales_like_x if scales_like_x is not None else scales.to(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), qweight, lowp)
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, qweight.shape[0], CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        w = (qweight[start:stop].float() * scales[start:stop, None]).to(x.dtype)
        out[:, start:stop] = F.linear(x, w)
    return out


class QuantTiedHead(nn.Module):
    """The output projection tied to a `QuantEmbedding`: reads its int8 rows, keeps nothing itself.

    The embedding is referenced outside the module tree (not a submodule), so ``model.to()`` moves
    the one copy and ``state_dict``/``parameters`` never list it twice.
    """

    def __init__(self, embedding: QuantEmbedding) -> None:
        super().__init__()
        self.__dict__["embedding"] = embedding
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        x2 = x.reshape(-1, self.in_features)
        y = int8_rows_matmul(x2, emb.qweight, emb.scales, emb.scales_in(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to int8 embedding"


def load_quant_embeddings(
    model: nn.Module, stream: CheckpointStream, device: torch.device, dtype: torch.dtype
) -> list[str]:
    """Swap in a `QuantEmbedding` for each int8 table of the checkpoint, and a `QuantTiedHead` for each
    head tied to one; returns the names of the modules replaced (straight from the int8 rows: no
    full-precision table is ever built)."""
    swapped: list[str] = []
    embeddings: dict[str, QuantEmbedding] = {}
    for name in stream.embedding_names:
        rows = stream.embedding(name)
        old = _module(model, name, nn.Embedding, stream)
        if tuple(old.weight.shape) != rows.shape:
            raise CheckpointError(
                f"{stream.path}: embedding '{name}' is {list(rows.shape)} in the checkpoint but "
                f"{list(old.weight.shape)} in the model built from config.json"
            )
        embeddings[name] = QuantEmbedding(rows, device, dtype, like=old)
        model.set_submodule(name, embeddings[name])
        swapped.append(name)
    for head, table in stream.tied_heads.items():
        old = _module(model, head, nn.Linear, stream)
        emb = embeddings[table]
        if old.bias is not None or (old.out_features, old.in_features) != (emb.num_embeddings, emb.embedding_dim):
            raise CheckpointError(f"{stream.path}: head '{head}' cannot be tied to the int8 table '{table}'")
        model.set_submodule(head, QuantTiedHead(emb))
        swapped.append(head)
    return swapped


def _module(model: nn.Module, name: str, cls: type[nn.Module], stream: CheckpointStream) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, cls):
        raise CheckpointError(
            f"{stream.path}: int8 module '{name}' is not an {cls.__name__} of the model built from config.json"
        )
    return module
