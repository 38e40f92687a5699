"""A CogVLM2 module tree with the published remote code's exact names and token routing.

Why this exists: CogVLM2 (THUDM/cogvlm2-llama3-chat-19B) ships as remote code and 19 B weights,
neither of which this project can fetch or run on a laptop. Quantization only depends on the
module *names* (they become the checkpoint's tensor keys), on which tokens reach which linear
(routing) and on the shapes, so this re-implementation keeps exactly those:

* ``model.layers.N.self_attn`` (VisionExpertAttention): ``vision_expert_query_key_value`` (with
  bias), ``vision_expert_dense``, ``language_expert_query_key_value``, ``language_expert_dense``;
  grouped-query attention with ``num_multi_query_heads`` key/value heads.
* ``model.layers.N.mlp`` (VisionExpertMLP): ``vision_mlp`` and ``language_mlp``, each with
  ``gate_proj``, ``up_proj``, ``down_proj``.
* Routing by ``token_type_ids`` as the remote code's ``get_expert_mask`` does it: a position is a
  vision position when it and the next one are image tokens (so the closing ``eoi`` token goes to
  the language expert), and each expert is called on the already-selected rows
  (``hidden[vision_mask]``). A forward pre-hook on an expert linear therefore sees only the
  tokens routed to it.
* ``model.vision`` (EVA2-CLIP): ``patch_embedding``, ``transformer.layers.N`` with
  ``attention.query_key_value``/``attention.dense`` and ``mlp.fc1``/``mlp.fc2``, a 2x2 stride-2
  ``conv`` downsample, the GLU projector ``linear_proj`` and the ``boi``/``eoi`` embeddings.

Registered with transformers' Auto classes under ``model_type="cogvlm2"`` so that tiny
instances built from a config round-trip through ``save_quantized``/``load_quantized``, and so
that ``rpiq plan cogvlm2`` counts parameters on the real 19 B shapes (on the meta device).

It also generates (``GenerationMixin`` with a transformers ``DynamicCache``), as the remote code does:
the prompt's image is encoded on the first step only, later steps feed one text token whose type is
language and whose position continues `build_position_ids` over the whole sequence. The server runs
the stand-in end to end through exactly the path a real checkpoint takes. The file is self-contained
(torch and transformers only) so tests can also ship it as a checkpoint's remote code.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1

# THUDM/cogvlm2-llama3-chat-19B's vision_config (EVA2-CLIP-E at 1344 px).
COGVLM2_VISION_CONFIG: dict[str, Any] = {
    "dropout_prob": 0.0,
    "hidden_act": "gelu",
    "in_channels": 3,
    "num_hidden_layers": 63,
    "hidden_size": 1792,
    "patch_size": 14,
    "num_heads": 16,
    "intermediate_size": 15360,
    "layer_norm_eps": 1e-6,
    "num_positions": 9217,
    "image_size": 1344,
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CogVLM2Config(PretrainedConfig):
    """The remote code's CogVLMConfig fields; defaults are cogvlm2-llama3-chat-19B's."""

    model_type = "cogvlm2"

    def __init__(
        self,
        vocab_size: int = 128256,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_multi_query_heads: int = 8,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        template_version: str = "chat",
        vision_config: dict[str, Any] | None = None,
        bos_token_id: int = 128000,
        eos_token_id: int = 128001,
        pad_token_id: int | None = 128002,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_multi_query_heads = num_multi_query_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.template_version = template_version
        self.vision_config = dict(vision_config or COGVLM2_VISION_CONFIG)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


def get_expert_mask(token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(vision, language) boolean masks [B, L]: the remote code's rule, eoi goes to language."""
    vision = torch.zeros_like(token_type_ids, dtype=torch.bool)
    vision[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & (token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
    return vision, ~vision


def build_position_ids(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Positions as the remote code assigns them: boi and eoi count as text, the image tokens
    between them share one position (the first one advances, the rest repeat it)."""
    tt = token_type_ids.clone()
    edge = torch.zeros_like(tt, dtype=torch.bool)
    edge[:, 1:] |= (tt[:, 1:] == VISION_TOKEN_TYPE) & (tt[:, :-1] == LANGUAGE_TOKEN_TYPE)
    edge[:, 0] |= tt[:, 0] == VISION_TOKEN_TYPE
    edge[:, :-1] |= (tt[:, :-1] == VISION_TOKEN_TYPE) & (tt[:, 1:] == LANGUAGE_TOKEN_TYPE)
    edge[:, -1] |= tt[:, -1] == VISION_TOKEN_TYPE
    tt[edge] = LANGUAGE_TOKEN_TYPE
    step = torch.zeros_like(tt)
    step[:, 1:] = (tt[:, 1:] == LANGUAGE_TOKEN_TYPE) | (
        (tt[:, 1:] == VISION_TOKEN_TYPE) & (tt[:, :-1] == LANGUAGE_TOKEN_TYPE)
    )
    return step.cumsum(dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * x).to(dtype)


class MLP(nn.Module):
    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__()
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, hidden_states: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(hidden_states)
        vision, language = get_expert_mask(token_type_ids)
        out[vision] = self.vision_mlp(hidden_states[vision])
        out[language] = self.language_mlp(hidden_states[language])
        return out


def rope_inv_freq(head_dim: int) -> torch.Tensor:
    """Llama-3's rotary frequencies (base 500000), as the remote code computes them."""
    return 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionExpertAttention(nn.Module):
    def __init__(self, config: CogVLM2Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_kv_heads = config.num_multi_query_heads
        self.qkv_size = self.hidden_size + 2 * self.head_dim * self.num_kv_heads
        self.vision_expert_query_key_value = nn.Linear(self.hidden_size, self.qkv_size, bias=True)
        self.vision_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.language_expert_query_key_value = nn.Linear(self.hidden_size, self.qkv_size, bias=False)
        self.language_expert_dense = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(self.head_dim), persistent=False)

    def _rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # B, L, HD/2
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # B, 1, L, HD
        return (x.float() * emb.cos() + _rotate_half(x.float()) * emb.sin()).to(x.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        vision, language = get_expert_mask(token_type_ids)
        mixed = torch.empty(b, n, self.qkv_size, dtype=hidden_states.dtype, device=hidden_states.device)
        mixed[vision] = self.vision_expert_query_key_value(hidden_states[vision])
        mixed[language] = self.language_expert_query_key_value(hidden_states[language])
        kv = self.head_dim * self.num_kv_heads
        q, k, v = mixed.split([self.hidden_size, kv, kv], dim=-1)
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, position_ids), self._rope(k, position_ids)
        if cache is not None:  # keys and values of the earlier positions, then these
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        past = k.shape[2] - n
        if past == 0:
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new query i sees every cached key and the new keys up to itself
            keep = torch.ones(n, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=past)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        context = context.transpose(1, 2).reshape(b, n, self.hidden_size)
        out = torch.empty_like(context)
        out[vision] = self.vision_expert_dense(context[vision])
        out[language] = self.language_expert_dense(context[language])
        return out


class CogVLMDecoderLayer(nn.Module):
    def __init__(self, config: CogVLM2Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = VisionExpertAttention(config, layer_idx)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor]:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), token_type_ids, position_ids, cache)
        h = h + self.mlp(self.post_attention_layernorm(h), token_type_ids)
        return (h,)


# ------------------------------------------------------------------------------ EVA2-CLIP tower


class PatchEmbedding(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        d = vc["hidden_size"]
        self.proj = nn.Conv2d(vc["in_channels"], d, kernel_size=vc["patch_size"], stride=vc["patch_size"])
        self.cls_embedding = nn.Parameter(torch.zeros(1, d))
        self.position_embedding = nn.Embedding(vc["num_positions"], d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_embedding.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.position_embedding.weight.unsqueeze(0)


class VisionAttention(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        self.num_heads = vc["num_heads"]
        self.query_key_value = nn.Linear(vc["hidden_size"], vc["hidden_size"] * 3)
        self.dense = nn.Linear(vc["hidden_size"], vc["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.query_key_value(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.dense(out.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[vc["hidden_act"]]
        self.fc1 = nn.Linear(vc["hidden_size"], vc["intermediate_size"])
        self.fc2 = nn.Linear(vc["intermediate_size"], vc["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class TransformerLayer(nn.Module):
    """EVA2-CLIP's post-norm block: the norms apply to the sublayer outputs."""

    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vc["hidden_size"], eps=vc["layer_norm_eps"])
        self.attention = VisionAttention(vc)
        self.mlp = VisionMLP(vc)
        self.post_attention_layernorm = nn.LayerNorm(vc["hidden_size"], eps=vc["layer_norm_eps"])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = hidden_states + self.input_layernorm(self.attention(hidden_states))
        return h + self.post_attention_layernorm(self.mlp(h))


class Transformer(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(vc) for _ in range(vc["num_hidden_layers"])])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class GLU(nn.Module):
    """The vision-to-language projector (kept in 16-bit by default)."""

    def __init__(self, config: CogVLM2Config, in_features: int) -> None:
        super().__init__()
        self.linear_proj = nn.Linear(in_features, config.hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.act1 = nn.GELU()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__()
        vc = config.vision_config
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = Transformer(vc)
        self.linear_proj = GLU(config, in_features=vc["hidden_size"])
        self.conv = nn.Conv2d(vc["hidden_size"], vc["hidden_size"], kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(images))[:, 1:]
        b, s, h = x.shape
        g = math.isqrt(s)
        x = self.conv(x.view(b, g, g, h).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        x = self.linear_proj(x)
        return torch.cat((self.boi.expand(b, -1, -1), x, self.eoi.expand(b, -1, -1)), dim=1)


def vision_token_count(config: CogVLM2Config) -> int:
    """Image positions per image in the token stream: the downsampled grid plus boi and eoi."""
    side = config.vision_config["image_size"] // config.vision_config["patch_size"] // 2
    return side * side + 2


def to_clip_tensor(image: Any, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """A PIL image as a [3, size, size] normalised tensor (bicubic resize, as the remote code)."""
    from PIL import Image

    img = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = x.permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# ------------------------------------------------------------------------------ the model


class CogVLMPreTrainedModel(PreTrainedModel):
    config_class = CogVLM2Config
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["CogVLMDecoderLayer", "TransformerLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """Random init; also the rotary frequencies, which are not in checkpoints: `from_pretrained`
        builds the model on the meta device, so the buffer ``__init__`` computed would come back as
        uninitialised memory (garbage, NaN under torch's fill_uninitialized_memory)."""
        std = self.config.initializer_range
        if isinstance(module, VisionExpertAttention):
            with torch.no_grad():
                module.inv_freq.copy_(rope_inv_freq(module.head_dim))
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)


class CogVLMModel(CogVLMPreTrainedModel):
    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([CogVLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        images: torch.Tensor | list | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.full_like(input_ids, LANGUAGE_TOKEN_TYPE)
        embeds = self.embed_tokens(input_ids)
        if images is not None:
            if isinstance(images, list):  # the remote code's List[List[Tensor]] (one image per sample)
                images = torch.stack([img for sample in images for img in sample])
            features = self.vision(images.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
            embeds = embeds.index_put([token_type_ids == VISION_TOKEN_TYPE], features.to(embeds.dtype))
        if position_ids is None:
            position_ids = build_position_ids(token_type_ids)
        hidden = embeds
        for layer in self.layers:
            hidden = layer(hidden, token_type_ids=token_type_ids, position_ids=position_ids, cache=cache)[0]
        return self.norm(hidden)


class CogVLMForCausalLM(CogVLMPreTrainedModel, GenerationMixin):
    """Named as in the remote code, so checkpoints carry ``architectures: [CogVLMForCausalLM]``."""

    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        images: torch.Tensor | list | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for `input_ids`; with a `cache` (or `use_cache`), earlier positions come from it and
        `position_ids` must then be given for the new tokens only (`prepare_inputs_for_generation`)."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.model(
            input_ids, token_type_ids=token_type_ids, images=images, position_ids=position_ids, cache=cache
        )
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), cache=cache)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        token_type_ids: torch.Tensor | None = None,
        images: torch.Tensor | list | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Positions over the whole sequence (the image shares positions), then only what the cache
        has not seen: the full prompt with its image first, one text token per step after that."""
        if token_type_ids is None:
            token_type_ids = torch.full_like(input_ids, LANGUAGE_TOKEN_TYPE)
        position_ids = build_position_ids(token_type_ids)
        seen = cache.get_seq_length() if cache is not None else 0
        if seen:
            input_ids, token_type_ids, position_ids = (
                input_ids[:, seen:],
                token_type_ids[:, seen:],
                position_ids[:, seen:],
            )
            images = None
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "images": images,
            "attention_mask": attention_mask,
            "cache": cache,
            "use_cache": kwargs.get("use_cache"),
        }

    def _update_model_kwargs_for_generation(
        self,
        outputs: Any,
        model_kwargs: dict[str, Any],
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict[str, Any]:
        """Generated tokens are text: their type is language whatever the prompt ended with."""
        token_type_ids = model_kwargs.pop("token_type_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if token_type_ids is not None:
            new = torch.full_like(token_type_ids[:, :num_new_tokens], LANGUAGE_TOKEN_TYPE)
            model_kwargs["token_type_ids"] = torch.cat([token_type_ids, new], dim=-1)
        return model_kwargs

    def build_conversation_input_ids(
        self,
        tokenizer: Any,
        *,
        query: str,
        history: list[tuple[str, str]] | None = None,
        images: list[Any] | None = None,
        template_version: str | None = None,
        answer: str | None = None,
    ) -> dict[str, Any]:
        """The remote code's prompt builder: BOS, the image's positions, then the chat text.

        Images are resized to ``image_size`` and CLIP-normalised with PIL + torch (the remote
        code uses torchvision for the same transform).
        """
        vc = self.config.vision_config
        text = "".join(f"Question: {q} Answer: {a}\n" for q, a in history or [])
        text += f"Question: {query} Answer:" if (template_version or self.config.template_version) == "chat" else query
        input_ids = [tokenizer.bos_token_id]
        token_type_ids = [LANGUAGE_TOKEN_TYPE]
        pixel = None
        if images:
            pixel = [to_clip_tensor(images[0], vc["image_size"], CLIP_MEAN, CLIP_STD)]
            n = vision_token_count(self.config)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.config.pad_token_id
            input_ids += [pad] * n
            token_type_ids += [VISION_TOKEN_TYPE] * n
        text_ids = tokenizer.encode(text, add_special_tokens=False)
        if answer is not None:
            text_ids += [*tokenizer.encode(" " + answer, add_special_tokens=False), tokenizer.eos_token_id]
        input_ids += text_ids
        token_type_ids += [LANGUAGE_TOKEN_TYPE] * len(text_ids)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "token_type_ids": torch.tensor(token_type_ids, dtype=torch.long),
            "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
            "images": pixel,
        }


AutoConfig.register("cogvlm2", CogVLM2Config, exist_ok=True)
AutoModelForCausalLM.register(CogVLM2Config, CogVLMForCausalLM, exist_ok=True)
