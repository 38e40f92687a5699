"""Per-architecture adapters: where a model's decoder layers are and in which order their
linear layers run.

An adapter is data, not code: a dotted path to the `ModuleList` of decoder layers and the
sequence of linear groups inside one layer. Linears in one group read the same input (q/k/v,
or gate/up), so they share one Hessian; the groups are quantized in order, each calibrated on
the output of the already-quantized groups before it ("true sequential").

Vision-language models: an adapter describes the language tower (quantized by default) and,
in `vision`, a nested adapter for the vision encoder's blocks (quantized with
`--quantize-vision`); projectors and embeddings are never listed, so they stay 16-bit. `routing`
records which token type feeds a linear whose model routes tokens between experts (CogVLM2: image
positions to the `vision_*` weights, text positions to the `language_*` ones). The model's own
forward does the routing (it calls each expert on the selected rows only), so the hooks already
see exactly the routed tokens; the pipeline uses `routing` to refuse calibration data that never
reaches an expert instead of zeroing that expert's weights.

Architectures without an adapter fall back to discovery: the longest `ModuleList` of identical
blocks holding `nn.Linear`s is taken as the decoder, and one traced forward of a block groups
its linears by the input tensor they receive, in call order (`discover_linear_groups`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

LLAMA_LIKE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

CLIP_LIKE_GROUPS: tuple[tuple[str, ...], ...] = (  # CLIP / SigLIP encoder blocks
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.out_proj",),
    ("mlp.fc1",),
    ("mlp.fc2",),
)
QWEN2_VL_VISION_GROUPS: tuple[tuple[str, ...], ...] = (("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",))
QWEN2_5_VL_VISION_GROUPS: tuple[tuple[str, ...], ...] = (  # gated (SwiGLU) MLP, unlike Qwen2-VL's
    ("attn.qkv",),
    ("attn.proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
EVA_CLIP_GROUPS: tuple[tuple[str, ...], ...] = (
    ("attention.query_key_value",),
    ("attention.dense",),
    ("mlp.fc1",),
    ("mlp.fc2",),
)

VISION_TOKEN_TYPE = 1  # CogVLM's token_type_ids values
LANGUAGE_TOKEN_TYPE = 0
COGVLM_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.vision_expert_query_key_value",),
    ("self_attn.language_expert_query_key_value",),
    ("self_attn.vision_expert_dense",),
    ("self_attn.language_expert_dense",),
    ("mlp.vision_mlp.gate_proj", "mlp.vision_mlp.up_proj"),
    ("mlp.vision_mlp.down_proj",),
    ("mlp.language_mlp.gate_proj", "mlp.language_mlp.up_proj"),
    ("mlp.language_mlp.down_proj",),
)
COGVLM_ROUTING: dict[str, int] = {
    name: VISION_TOKEN_TYPE if ".vision_" in f".{name}" else LANGUAGE_TOKEN_TYPE
    for group in COGVLM_GROUPS
    for name in group
}


@dataclass(frozen=True)
class ModelAdapter:
    """Where the decoder layers are and the order of their linear groups."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    linear_groups: tuple[tuple[str, ...], ...]
    routing: Mapping[str, int] = field(default_factory=dict)  # linear name -> token type that feeds it
    vision: ModelAdapter | None = None  # the vision encoder's blocks, quantized only on request
    architectures: tuple[str, ...] = ()  # class names matched when config.model_type is unknown

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)  # type: ignore[return-value]

    def linear_names(self) -> list[str]:
        return [name for group in self.linear_groups for name in group]


ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "olmo2"),
        "model.layers",
        LLAMA_LIKE_GROUPS,
    ),
    ModelAdapter(
        "opt",
        ("opt",),
        "model.decoder.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    # Vision-language models: the language tower is quantized; vision tower and projector stay.
    ModelAdapter(
        "llava",
        ("llava",),
        "model.language_model.layers",
        LLAMA_LIKE_GROUPS,
        vision=ModelAdapter("llava:vision", ("llava",), "model.vision_tower.encoder.layers", CLIP_LIKE_GROUPS),
    ),
    ModelAdapter(
        "qwen2_vl",
        ("qwen2_vl",),
        "model.language_model.layers",
        LLAMA_LIKE_GROUPS,
        vision=ModelAdapter("qwen2_vl:vision", ("qwen2_vl",), "model.visual.blocks", QWEN2_VL_VISION_GROUPS),
    ),
    # Qwen2.5-VL's vision blocks alternate window and full attention (`fullatt_block_indexes`: a
    # different `cu_seqlens` per block); the runner replays each block's own recorded arguments.
    ModelAdapter(
        "qwen2_5_vl",
        ("qwen2_5_vl",),
        "model.language_model.layers",
        LLAMA_LIKE_GROUPS,
        vision=ModelAdapter("qwen2_5_vl:vision", ("qwen2_5_vl",), "model.visual.blocks", QWEN2_5_VL_VISION_GROUPS),
    ),
    ModelAdapter(
        "idefics3",
        ("idefics3", "smolvlm"),
        "model.text_model.layers",
        LLAMA_LIKE_GROUPS,
        vision=ModelAdapter("idefics3:vision", ("idefics3",), "model.vision_model.encoder.layers", CLIP_LIKE_GROUPS),
    ),
    ModelAdapter("gemma3", ("gemma3",), "model.language_model.layers", LLAMA_LIKE_GROUPS),
    # CogVLM2 (remote code, THUDM/cogvlm2-llama3-chat-19B; `models.cogvlm2` mirrors its layout).
    # Call order in a layer: vision QKV, language QKV, vision dense, language dense, then the
    # vision MLP and the language MLP; each expert sees only its own tokens.
    ModelAdapter(
        "cogvlm2",
        ("cogvlm2", "cogvlm"),
        "model.layers",
        COGVLM_GROUPS,
        routing=COGVLM_ROUTING,
        vision=ModelAdapter("cogvlm2:vision", ("cogvlm2",), "model.vision.transformer.layers", EVA_CLIP_GROUPS),
        architectures=("CogVLMForCausalLM",),
    ),
)


class UnsupportedModelError(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types})


def get_adapter(model: nn.Module, *, allow_discovery: bool = True) -> ModelAdapter:
    """The adapter for `model` (by `config.model_type`), else one discovered from its structure."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types or type(model).__name__ in adapter.architectures:
            _check(adapter, model)
            return adapter
    if allow_discovery:
        found = discover_adapter(model)
        if found is not None:
            return found
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported and no repeated decoder block with linear layers "
        f"was found; supported model types: {', '.join(supported_model_types())}"
    )


def _check(adapter: ModelAdapter, model: nn.Module) -> None:
    try:
        layers = adapter.layers(model)
    except AttributeError as e:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder layers at {adapter.layers_path!r} ({adapter.name} adapter)"
        ) from e
    for name in adapter.linear_names():
        module = layers[0].get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise UnsupportedModelError(f"{adapter.layers_path}.0.{name} is not an nn.Linear")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ModuleList of same-class blocks that contain nn.Linear layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def discover_adapter(model: nn.Module) -> ModelAdapter | None:
    found = find_decoder_layers(model)
    if found is None:
        return None
    path, layers = found
    groups = discover_linear_groups(model, layers[0])
    if not groups:
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    return ModelAdapter(f"discovered:{model_type}", (model_type,), path, groups)


@torch.no_grad()
def discover_linear_groups(model: nn.Module, layer: nn.Module) -> tuple[tuple[str, ...], ...]:
    """Group `layer`'s linears by shared input, in call order, by tracing one tiny forward."""
    names = {m: n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    calls: list[tuple[str, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple) -> None:
        calls.append((names[module], args[0]))

    handles = [m.register_forward_pre_hook(hook) for m in names]
    try:
        device = next(model.parameters()).device
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 8
        model(input_ids=torch.randint(0, min(vocab, 100), (1, 8), device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: dict[int, int] = {}
    for name, x in calls:
        if any(name in g for g in groups):
            continue
        key = id(x)
        if key in seen:
            groups[seen[key]].append(name)
        else:
            seen[key] = len(groups)
            groups.append([name])
    return tuple(tuple(g) for g in groups)
