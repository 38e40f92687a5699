"""One decode step of a Llama-family decoder in few torch ops: fused int4 projections, a preallocated KV cache.

A token of a small model on a CPU costs more in framework work than in arithmetic: transformers'
decoder launches ~7,000 torch ops a token for SmolLM2-135M (masks, cache bookkeeping, rotary
tables, module hooks), 72 % of the step's time. `LeanDecoder` runs the same layers' modules and
weights with ~30 ops a layer:

* the q/k/v projections are one int4 matmul, as are gate/up: the tinygemm CPU layout is plain
  rows, so the packed weights are concatenated once and the layers' own buffers become views of
  the fused ones (no extra memory);
* keys and values go into one preallocated cache per layer (no `torch.cat` per token), and the
  attention of one query is two small batched matmuls over the filled part;
* the rotary table is computed once per generation by the model's own rotary module, so every
  rope type it implements (default, linear, llama3, yarn) is handled by transformers.

The prompt is still run by the model's own forward (any attention implementation, images too);
its cache is copied into the lean one, and only the one-token steps run here. On a GPU the same
layers run as `step_static`: token and position are tensors and the attention covers the whole
cache under a mask, so no shape or host value depends on the position and the step can be
captured once as a CUDA graph (`models.graph_decode`). Which decoders can
run is data (`SUPPORTED_MODEL_TYPES`); anything else, and any layer shape the step does not know
(Qwen2's per-layer windows, soft-capping, dynamic rope, M-RoPE), is refused with a reason
(`unsupported`) and decodes through transformers as before.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .int4.linear import TinygemmCPULinear
from .memory import release_freed_memory

ATTENTION_DTYPE = torch.float32
"""The cache's and the attention's dtype: bf16 matmuls are 3-4x slower on CPUs without native bf16,
and the one-query attention is small; keys and values are the model's (bf16-rounded) numbers."""

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma3_text")
"""Decoders with the Llama layer: pre-norm attention (q/k/v/o, optional per-head q/k norm) and a
gated MLP (gate/up/down), a final norm and an LM head. Gemma 3 adds norms on the attention and MLP
outputs, sliding-window layers with their own rotary table, and scaled embeddings; the step reads
those from the modules (`_Layer`), not from the model type."""

_UNSUPPORTED_CONFIG = {
    "final_logit_softcapping": "logit soft-capping",
    "attn_logit_softcapping": "attention soft-capping",
}


# --------------------------------------------------------------------------- projections


class _Fused(nn.Module):
    """Several int4 layers reading the same input as one tinygemm matmul; outputs concatenated.

    The member layers' ``packed`` buffers are re-pointed at row slices of the fused buffer, so the
    model keeps one copy of the codes; their (small) scale tables are concatenated into a new one.
    """

    def __init__(self, layers: list[TinygemmCPULinear]) -> None:
        super().__init__()
        first = layers[0]
        self.group = first.kernel_group
        self.pad = first.in_padded - first.in_features
        fused = torch.cat([layer.packed for layer in layers])
        start = 0
        for layer in layers:
            rows = layer.packed.shape[0]
            layer.packed = fused[start : start + rows]
            start += rows
        self.register_buffer("packed", fused, persistent=False)
        self.register_buffer("scale_and_zero", torch.cat([la.scale_and_zero for la in layers], 1), persistent=False)
        biases = [la.bias if la.bias is not None else torch.zeros(la.out_features) for la in layers]
        with_bias = any(la.bias is not None for la in layers)
        self.bias = torch.cat([b.to(torch.bfloat16) for b in biases]) if with_bias else None

    @staticmethod
    def can_fuse(layers: list[nn.Module]) -> bool:
        if not all(type(la) is TinygemmCPULinear for la in layers):
            return False
        first = layers[0]
        same = all(
            la.perm is None
            and la.kernel_group == first.kernel_group
            and la.in_features == first.in_features
            and la.in_padded == first.in_padded
            and la.out_padded == la.out_features
            for la in layers
        )
        return same and _packs_by_rows(tuple(la.out_padded for la in layers))

    def call(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """The projection for inputs of `dtype`: the bare kernel when nothing needs adapting (a Python
        call less per projection, four a layer, every token), else `forward`."""
        if dtype != torch.bfloat16 or self.pad or self.bias is not None:
            return self.forward
        packed, group, scale_and_zero = self.packed, self.group, self.scale_and_zero
        return lambda x: _INT4_MM(x, packed, group, scale_and_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)  # the kernel's activation dtype
        if self.pad:
            xb = F.pad(xb, (0, self.pad))
        y = _INT4_MM(xb, self.packed, self.group, self.scale_and_zero)
        y = y if self.bias is None else y + self.bias
        return y if y.dtype == x.dtype else y.to(x.dtype)


_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default  # the overload itself: no lookup per call


@functools.lru_cache(maxsize=64)
def _packs_by_rows(rows: tuple[int, ...]) -> bool:
    """Whether packing layers of `rows` output rows one by one and concatenating equals packing them
    together. The CPU packer interleaves blocks of rows (64 in torch 2.13), so it holds when every
    layer but the last fills whole blocks; probed on small random codes rather than assumed."""
    codes = [torch.randint(0, 16, (r, 64), dtype=torch.int32) for r in rows]
    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    return torch.equal(torch.cat([pack(c, 1) for c in codes]), pack(torch.cat(codes), 1))


class _Separate(nn.Module):
    """The fallback: each layer on its own kernel, outputs concatenated (float weights, act-order, ...)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([la(x) for la in self.members], dim=-1)


def _projection(layers: list[nn.Module]) -> nn.Module:
    return _Fused(layers) if _Fused.can_fuse(layers) else _Separate(layers)


def _single(layer: nn.Module) -> nn.Module:
    """A one-layer projection without the module's reshape/pad/cast wrapper when tinygemm can take it."""
    return _Fused([layer]) if _Fused.can_fuse([layer]) else layer


# --------------------------------------------------------------------------- norms


class _RMSNorm(nn.Module):
    """A Llama RMSNorm (``weight * x / rms(x)``) in one kernel, rounded once to the model dtype
    (transformers rounds before the weight too; the difference is a bf16 ulp).

    RMSNorm is LayerNorm of a zero-mean vector: ``[x, -x]`` has mean 0 and variance mean(x^2), so one
    fused ``layer_norm`` gives ``x * rsqrt(mean(x^2) + eps) * w`` in its first half (``torch.rms_norm``
    is a composite of ~9 ops on the CPU). The step keeps its residual stream in that doubled form
    (`forward`); a single vector (Gemma's norms on a block's output) is doubled here (`single`).
    """

    def __init__(self, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype, self.eps, self.dim = dtype, eps, weight.shape[-1]
        self.twice = torch.cat([weight, weight]).detach().float()
        self.shape = (2 * self.dim,)

    def forward(self, doubled: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(doubled, self.shape, self.twice, None, self.eps)[..., : self.dim].to(self.dtype)

    def single(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(torch.cat([x, x.neg()], dim=-1).float())


class _AsIs(nn.Module):
    """Any other norm module, given the residual stream's first half in the model dtype as transformers does."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, doubled: torch.Tensor) -> torch.Tensor:
        return self.module(doubled[..., : doubled.shape[-1] // 2].to(self.dtype))

    def single(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype))


# RMSNorm classes: (added to the weight, the module's epsilon attribute). Gemma scales by 1 + w.
_RMS_NORMS = {
    "LlamaRMSNorm": (0.0, "variance_epsilon"),
    "MistralRMSNorm": (0.0, "variance_epsilon"),
    "Qwen2RMSNorm": (0.0, "variance_epsilon"),
    "Qwen3RMSNorm": (0.0, "variance_epsilon"),
    "SmolLM3RMSNorm": (0.0, "variance_epsilon"),
    "Gemma3RMSNorm": (1.0, "eps"),
}


def _norm(module: nn.Module, dtype: torch.dtype) -> _RMSNorm | _AsIs:
    """The norm of the doubled float32 residual stream (`_RMSNorm`), returning the model dtype."""
    known = _RMS_NORMS.get(type(module).__name__)
    if known is not None:
        offset, eps = known
        return _RMSNorm(module.weight.detach().float() + offset, getattr(module, eps), dtype)
    return _AsIs(module, dtype)


# --------------------------------------------------------------------------- the decoder


@dataclass
class _Layer:
    """One decoder layer's parts as the step calls them: bound methods, or the bare int4 kernel for a
    fused projection (a module's ``__call__`` costs microseconds of hook handling, times ~8 calls a
    layer, times every token)."""

    norm_in: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], torch.Tensor]
    q_norm: Callable[[torch.Tensor], torch.Tensor] | None
    k_norm: Callable[[torch.Tensor], torch.Tensor] | None
    o: Callable[[torch.Tensor], torch.Tensor]
    norm_post: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]
    attn_out_norm: Callable[[torch.Tensor], torch.Tensor] | None  # Gemma: on the attention's output
    mlp_out_norm: Callable[[torch.Tensor], torch.Tensor] | None  # Gemma: on the MLP's output
    window: int | None  # sliding-window layers attend to the last `window` positions only
    rope: str  # which rotary table (Gemma: local for sliding layers, global for the others)
    projections: dict[str, nn.Module]  # the modules behind qkv, o, gate_up and down (`_Fused` where fused)


def unsupported(model: Any) -> str | None:
    """Why `model` cannot decode through `LeanDecoder` (None: it can). A vision-language model is judged
    by its language model (LLaVA and Idefics3 decode Llama after the photo; Qwen2-VL's M-RoPE does not)."""
    config = model.config.get_text_config()
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    for key, what in _UNSUPPORTED_CONFIG.items():
        if getattr(config, key, None):
            return f"{what} is not implemented in the lean step"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        return f"layer types {sorted(set(layer_types))} are not implemented in the lean step"
    if getattr(config, "use_sliding_window", False):  # Qwen2's per-layer windows
        return "Qwen2-style sliding windows are not implemented in the lean step"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention is not a decoder"
    decoder = model.get_decoder()
    rope = getattr(getattr(decoder, "rotary_emb", None), "rope_type", None)  # Gemma: one per layer type
    for kind in rope.values() if isinstance(rope, dict) else [rope]:
        if kind is None or kind.startswith("dynamic") or kind == "longrope":
            return f"rope type {kind!r} changes with the sequence length"
    if model.device.type not in ("cpu", "cuda"):
        return f"the lean step runs on a CPU or a CUDA GPU, not {model.device.type}"
    return None


_BUILD_LOCK = threading.Lock()


@dataclass
class LeanCache:
    """One generation's state: per layer one key-value buffer (one copy a token writes both), and the
    rotary tables. `keys` and `values` are views of `kv` in the shapes the attention's matmuls take."""

    kv: list[torch.Tensor]  # [capacity, 2 * n_kv, head_dim] float32: a position's keys, then its values
    keys: list[torch.Tensor]  # [n_kv, head_dim, capacity], a view of kv
    values: list[torch.Tensor]  # [n_kv, capacity, head_dim], a view of kv
    # table name: (cos, sin), [capacity, n_q + 2 * n_kv, head_dim] float32 for the projection's rows
    # (q, k, v): sin carries rotate_half's sign, the q rows carry the attention scaling, and the v rows
    # are cos 1, sin 0 (rotating all rows at once is one op fewer than splitting v off first)
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def capacity(self) -> int:
        return self.kv[0].shape[0]


class LeanDecoder:
    """The one-token steps of `model` after a prompt. Built once per model (`for_model`); it keeps no
    per-generation state (that is a `LeanCache`), so generations may run side by side.
    Weights are the model's own (int4 q/k/v and gate/up fused in place)."""

    def __init__(self, model: Any) -> None:
        decoder = model.get_decoder()
        config = model.config.get_text_config()
        attn0 = decoder.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.n_kv = config.num_key_value_heads
        self.n_q = config.num_attention_heads
        self.scaling = float(attn0.scaling)
        self.dtype = model.dtype
        self.device = model.device
        self.sign = SIGN.to(self.device)
        self.embed = decoder.embed_tokens.forward
        self.rotary = decoder.rotary_emb
        self.rope_by_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.roll = torch.arange(self.head_dim, device=self.device).roll(self.head_dim // 2)  # rotate_half's columns
        self.norm = _norm(decoder.norm, self.dtype).forward
        head = _single(model.get_output_embeddings())
        self.head = head.call(self.dtype) if isinstance(head, _Fused) else head.forward
        self.layers = [self._layer(i, layer, config) for i, layer in enumerate(decoder.layers)]

    def _layer(self, index: int, layer: nn.Module, config: Any) -> _Layer:
        a, m = layer.self_attn, layer.mlp
        sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma: norms before and after each block
        parts = {
            "norm_in": _norm(layer.input_layernorm, self.dtype),
            "qkv": _projection([a.q_proj, a.k_proj, a.v_proj]),
            "q_norm": _norm(a.q_norm, self.dtype) if hasattr(a, "q_norm") else None,  # per head: Qwen3, Gemma 3
            "k_norm": _norm(a.k_norm, self.dtype) if hasattr(a, "k_norm") else None,
            "o": _single(a.o_proj),
            "norm_post": _norm(
                layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm, self.dtype
            ),
            "gate_up": _projection([m.gate_proj, m.up_proj]),
            "act": m.act_fn,
            "down": _single(m.down_proj),
            "attn_out_norm": _norm(layer.post_attention_layernorm, self.dtype) if sandwich else None,
            "mlp_out_norm": _norm(layer.post_feedforward_layernorm, self.dtype) if sandwich else None,
        }
        calls = {k: None if v is None else v.forward for k, v in parts.items()}
        for k in ("qkv", "o", "gate_up", "down"):
            if isinstance(parts[k], _Fused):
                calls[k] = parts[k].call(self.dtype)
        for k in ("q_norm", "k_norm", "attn_out_norm", "mlp_out_norm"):  # these norm vectors, not the residual stream
            calls[k] = None if parts[k] is None else parts[k].single
        layer_type = (getattr(config, "layer_types", None) or ["full_attention"] * (index + 1))[index]
        window = getattr(config, "sliding_window", None) if layer_type == "sliding_attention" else None
        if config.model_type == "mistral":  # Mistral slides every layer's window when it has one
            window = getattr(config, "sliding_window", None)
        projections = {k: parts[k] for k in ("qkv", "o", "gate_up", "down")}
        return _Layer(**calls, window=window, rope=layer_type if self.rope_by_type else "", projections=projections)

    @classmethod
    def for_model(cls, model: Any) -> LeanDecoder:
        """The model's decoder, built (and its projections fused) by the first caller only."""
        with _BUILD_LOCK:
            lean = model.__dict__.get("_rpiq_lean_decoder")
            if lean is None:
                lean = model.__dict__["_rpiq_lean_decoder"] = cls(model)
                release_freed_memory()  # the layers' own packed codes, now copied into the fused buffers
        return lean

    def start(self, cache: Any, capacity: int) -> LeanCache:
        """A `LeanCache` of `capacity` tokens holding the prompt's keys/values from a transformers cache."""
        return self.load(self.empty_cache(capacity), cache)

    def empty_cache(self, capacity: int, *, zeroed: bool = False) -> LeanCache:
        """A `LeanCache` of `capacity` positions. `step` reads only positions it wrote, so their memory may
        start uninitialised; `step_static` needs `zeroed` keys and values (its masked attention multiplies
        unfilled positions by a weight of 0, which must not meet a NaN from uninitialised memory)."""
        kvs, keys, values, nkv, dev = [], [], [], self.n_kv, self.device
        new = torch.zeros if zeroed else torch.empty
        for _ in self.layers:
            kv = new(capacity, 2 * nkv, self.head_dim, dtype=ATTENTION_DTYPE, device=dev)
            kvs.append(kv)
            keys.append(kv[:, :nkv].permute(1, 2, 0))
            values.append(kv[:, nkv:].permute(1, 0, 2))
        positions, probe, half = (
            torch.arange(capacity, device=dev)[None],
            torch.empty(0, dtype=self.dtype, device=dev),
            self.head_dim // 2,
        )
        rope = {}
        for name in {layer.rope for layer in self.layers}:
            cos, sin = self.rotary(probe, positions, name) if name else self.rotary(probe, positions)
            # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): the sign goes into the table;
            # q's rows also carry the attention scaling (rotation is linear), k's rows do not
            sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
            rows = torch.tensor([self.scaling] * self.n_q + [1.0] * nkv + [0.0] * nkv, device=dev)[None, :, None]
            cos = cos[0, :, None, :].float() * rows
            cos[:, self.n_q + nkv :] = 1.0
            rope[name] = (cos, sin[:, None, :].float() * rows)
        return LeanCache(kvs, keys, values, rope)

    def load(self, lean: LeanCache, cache: Any) -> LeanCache:
        """`lean` holding the prompt's keys/values from the transformers `cache` (copied in place, so a
        CUDA graph captured over `lean` sees them); positions after the prompt are left as they are."""
        n = cache.get_seq_length()
        if lean.capacity < n + 1:
            raise ValueError(f"capacity {lean.capacity} does not hold the {n}-token prompt and one more token")
        nkv = self.n_kv
        for i, kv in enumerate(lean.kv):
            k, v = cache.layers[i].keys[0], cache.layers[i].values[0]  # [n_kv, kept, head_dim]
            kept = k.shape[1]  # a sliding-window layer keeps only the last positions
            kv[n - kept : n, :nkv] = k.transpose(0, 1)
            kv[n - kept : n, nkv:] = v.transpose(0, 1)
        return lean

    def step(self, cache: LeanCache, token: int, pos: int) -> torch.Tensor:
        """Logits [vocab] (float32) for the token after `token`, which sits at position `pos`. The attention
        reads only the filled part of the cache, so every position's step has its own shapes (the CPU's way:
        no work on empty positions)."""
        x = self.embed(torch.tensor([token], device=self.device))
        rope = {name: (cos[pos], sin[pos]) for name, (cos, sin) in cache.rope.items()}
        return self._forward(cache, x, rope, pos, None)

    def step_static(self, cache: LeanCache, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """`step` for `token` and `pos` given as one-element int64 tensors on the model's device. Nothing
        depends on their values but the numbers: the key-value write is an `index_copy_`, and the attention
        covers the whole capacity with later (and out-of-window) positions masked, so every call runs the
        same kernels on the same shapes and reads no value back to the host: what a CUDA graph needs."""
        x = self.embed(token)
        rope = {
            name: (cos.index_select(0, pos)[0], sin.index_select(0, pos)[0]) for name, (cos, sin) in cache.rope.items()
        }
        slots = torch.arange(cache.capacity, device=self.device)
        later = slots > pos
        blocked = {w: later if w is None else later | (slots <= pos - w) for w in {la.window for la in self.layers}}
        return self._forward(cache, x, rope, pos, blocked)

    def _forward(
        self,
        cache: LeanCache,
        x: torch.Tensor,
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]],
        pos: int | torch.Tensor,
        blocked: dict[int | None, torch.Tensor] | None,
    ) -> torch.Tensor:
        """The layers and the head for the embedded token `x` [1, hidden] at `pos`: `blocked` None reads the
        cache's filled part (`step`), else the whole cache with each window's `blocked` positions masked."""
        hd, nq, nkv, group = self.head_dim, self.n_q, self.n_kv, self.n_q // self.n_kv
        rows, roll, sign = nq + 2 * nkv, self.roll, self.sign
        # The residual stream is float32 (transformers keeps it in the model dtype: one rounding less
        # per layer) and doubled, [x, -x], for the norms (`_RMSNorm`); a block's output `out` is added
        # to both halves by one addcmul with `sign`. What enters every matmul is in the model dtype.
        x = x.float()
        doubled = torch.cat([x, x.neg()], dim=-1)
        halves = doubled.view(2, -1)
        n = None if blocked is not None else pos + 1
        for layer, kv, keys, values in zip(self.layers, cache.kv, cache.keys, cache.values, strict=True):
            cos, sin = rope[layer.rope]
            qkv = layer.qkv(layer.norm_in(doubled)).view(rows, hd)
            if layer.q_norm is not None:
                qkv = torch.cat([layer.q_norm(qkv[:nq]), layer.k_norm(qkv[nq : nq + nkv]), qkv[nq + nkv :]])
            # rotate_half(qkv) is a permutation (the sign is in `sin`); float32 from here on, q scaled
            # already, v rows unrotated (cos 1, sin 0)
            q, new_kv = torch.addcmul(qkv * cos, qkv.index_select(1, roll), sin).split((nq, 2 * nkv))
            if blocked is None:
                lo = 0 if layer.window is None else max(0, n - layer.window)
                kv.select(0, pos).copy_(new_kv)
                scores = torch.bmm(q.view(nkv, group, hd), keys.narrow(2, lo, n - lo))
                attn = torch.bmm(scores.softmax(-1), values.narrow(1, lo, n - lo))
            else:
                kv.index_copy_(0, pos, new_kv[None])
                scores = torch.bmm(q.view(nkv, group, hd), keys).masked_fill_(blocked[layer.window], float("-inf"))
                attn = torch.bmm(scores.softmax(-1), values)
            out = layer.o(attn.view(1, nq * hd).to(self.dtype))
            halves.addcmul_(out if layer.attn_out_norm is None else layer.attn_out_norm(out), sign)
            gate, up = layer.gate_up(layer.norm_post(doubled)).chunk(2, -1)
            out = layer.down(layer.act(gate).mul_(up))
            halves.addcmul_(out if layer.mlp_out_norm is None else layer.mlp_out_norm(out), sign)
        return self.head(self.norm(doubled))[0].float()


SIGN = torch.tensor([[1.0], [-1.0]])
"""Adds a block's output [1, hidden] to the doubled residual stream viewed as [2, hidden]: x + out, -x - out."""


def prefill(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """(last position's logits [vocab] float32, the transformers cache) for the prompt in `inputs`."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float(), cache
