"""`rpiq plan`: what a model's weights cost in 16-bit and after 4-bit quantization, from its config.

Why: CogVLM2 (19 B) cannot be downloaded or run here, but its memory budget on a device can be
computed exactly from the config numbers. The model is built on the meta device (no memory, no
weights) from the same module tree the quantizer uses (`models.cogvlm2` for CogVLM2, transformers
for the rest), and every parameter is assigned to a component by the model's adapter:

* language-tower linears (CogVLM2: the language experts) and CogVLM2's visual experts, both
  quantized by default;
* vision-tower linears, quantized only with ``--quantize-vision``;
* everything else stays 16-bit: the rest of the vision tower (patch embedding, norms), the
  projector, the token embeddings, the LM head, norms.

A quantized linear costs what a GPTQ checkpoint stores: ``bits/8`` bytes per weight (qweight), per
group and output row a 16-bit scale and a ``bits``-wide zero (qzeros), an int32 g_idx per input
column, and its bias in 16-bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

PAPER_CLAIM = (0.60, 0.75)
"""The RPIQ paper's claimed memory reduction for CogVLM2 (60-75 %)."""

# Modules between the vision encoder and the language model: kept in 16-bit in every policy.
PROJECTOR_PREFIXES: tuple[str, ...] = (
    "model.multi_modal_projector",  # LLaVA
    "model.connector",  # Idefics3 / SmolVLM
    "model.visual.merger",  # Qwen2-VL / Qwen2.5-VL
    "model.vision.linear_proj",  # CogVLM2's GLU
    "model.vision.conv",  # CogVLM2's 2x2 downsample
    "model.vision.boi",
    "model.vision.eoi",
)
VISION_PREFIXES: tuple[str, ...] = ("model.vision_tower", "model.vision_model", "model.visual", "model.vision")

LANGUAGE = "language tower linears"
EXPERTS = "visual experts (image tokens)"
VISION_LINEARS = "vision tower linears"
VISION_OTHER = "vision tower, other"
PROJECTOR = "projector"
EMBEDDINGS = "token embeddings"
HEAD = "LM head"
OTHER = "norms, other"
COMPONENTS = (LANGUAGE, EXPERTS, VISION_LINEARS, VISION_OTHER, PROJECTOR, EMBEDDINGS, HEAD, OTHER)


@dataclass
class Component:
    params: int = 0
    fp16_bytes: int = 0
    int4_bytes: int = 0  # if quantized; equals fp16_bytes for parts that are never quantized


@dataclass
class Plan:
    """Per-component parameter counts and bytes, for one model config."""

    name: str
    bits: int
    group_size: int
    components: dict[str, Component] = field(default_factory=lambda: {c: Component() for c in COMPONENTS})

    def total_params(self) -> int:
        return sum(c.params for c in self.components.values())

    def fp16_bytes(self) -> int:
        return sum(c.fp16_bytes for c in self.components.values())

    def quantized_bytes(self, *, vision: bool = False) -> int:
        """Bytes with the default policy (language tower incl. experts), plus the vision tower if asked."""
        chosen = {LANGUAGE, EXPERTS} | ({VISION_LINEARS} if vision else set())
        return sum(c.int4_bytes if n in chosen else c.fp16_bytes for n, c in self.components.items())

    def reduction(self, *, vision: bool = False) -> float:
        return 1.0 - self.quantized_bytes(vision=vision) / self.fp16_bytes()


def quantized_linear_bytes(out_features: int, in_features: int, bits: int, group_size: int, bias: bool) -> int:
    """Bytes of one GPTQ-packed linear: qweight, qzeros, fp16 scales, int32 g_idx, fp16 bias."""
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    qweight = in_features * out_features * bits // 8
    qzeros = groups * out_features * bits // 8
    scales = groups * out_features * 2
    g_idx = in_features * 4
    return qweight + qzeros + scales + g_idx + (2 * out_features if bias else 0)


def _linear_names(model: nn.Module, adapter: Any) -> Iterable[tuple[str, str]]:
    for i in range(len(adapter.layers(model))):
        for name in adapter.linear_names():
            yield f"{adapter.layers_path}.{i}.{name}", name


def plan_model(model: nn.Module, name: str, bits: int = 4, group_size: int = 128) -> Plan:
    """Assign every parameter of `model` (meta tensors are fine) to a component and cost it."""
    from quantizer.adapters import VISION_TOKEN_TYPE, get_adapter

    adapter = get_adapter(model, allow_discovery=False)
    plan = Plan(name, bits, group_size)
    linears: dict[str, str] = {}  # module name -> component
    for full, short in _linear_names(model, adapter):
        linears[full] = EXPERTS if adapter.routing.get(short) == VISION_TOKEN_TYPE else LANGUAGE
    if adapter.vision is not None:
        linears.update(dict.fromkeys((full for full, _ in _linear_names(model, adapter.vision)), VISION_LINEARS))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    special = {id(p): EMBEDDINGS for p in embed.parameters()}
    if head is not None:
        special.update({id(p): HEAD for p in head.parameters() if id(p) not in special})
    seen: set[int] = set()
    modules = dict(model.named_modules())
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue  # tied weights are stored once
        seen.add(id(p))
        module_name = pname.rpartition(".")[0]
        if module_name in linears:
            continue  # costed per module below
        comp = special.get(id(p)) or _component(pname)
        c = plan.components[comp]
        c.params += p.numel()
        c.fp16_bytes += 2 * p.numel()
        c.int4_bytes += 2 * p.numel()
    for module_name, comp in linears.items():
        m = modules[module_name]
        c = plan.components[comp]
        n = sum(p.numel() for p in m.parameters())
        c.params += n
        c.fp16_bytes += 2 * n
        c.int4_bytes += quantized_linear_bytes(m.out_features, m.in_features, bits, group_size, m.bias is not None)
    return plan


@dataclass
class CalibrationMemory:
    """What each calibration mode keeps resident for the language tower (arithmetic, not measured)."""

    tokens: int
    stream_bytes: int  # sequential: one stream of hidden states for every calibration token
    hessian_bytes: int  # single-instance: every layer's Hessians, float32, upper bound
    largest_layer_bytes: int  # the least a --hessian-budget-mib can hold


def calibration_memory(model: nn.Module, nsamples: int, seqlen: int, act_bytes: int = 2) -> CalibrationMemory:
    """Sequential's resident hidden states against single-instance's Hessians, from shapes alone.

    The Hessian figure is the bound the budget planner uses (`quantizer.hessian_store`): one
    `in x in` float32 matrix per linear, though members fed the same input share one.
    """
    from quantizer.adapters import get_adapter
    from quantizer.hessian_store import hessian_bytes

    adapter = get_adapter(model, allow_discovery=False)
    per_layer = [hessian_bytes(layer, adapter.linear_groups) for layer in adapter.layers(model)]
    hidden = model.config.get_text_config().hidden_size
    tokens = nsamples * seqlen
    return CalibrationMemory(tokens, tokens * hidden * act_bytes, sum(per_layer), max(per_layer))


def _component(param_name: str) -> str:
    if param_name.startswith(PROJECTOR_PREFIXES):
        return PROJECTOR
    if param_name.startswith(VISION_PREFIXES):
        return VISION_OTHER
    return OTHER


def meta_model(config: Any) -> nn.Module:
    """`config`'s model with every parameter on the meta device (costs no memory)."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    from models.architectures import from_config

    with init_empty_weights(), no_init_weights():
        return from_config(config)


def load_config(source: str) -> tuple[Any, str]:
    """`cogvlm2` (built-in: THUDM/cogvlm2-llama3-chat-19B's numbers) or a directory with config.json."""
    from models.cogvlm2 import CogVLM2Config

    if source.lower() in ("cogvlm2", "cogvlm2-llama3-chat-19b"):
        return CogVLM2Config(), "CogVLM2 (cogvlm2-llama3-chat-19B)"
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"{source!r} is neither 'cogvlm2' nor a directory with a config.json")
    from transformers import AutoConfig

    import models.cogvlm2  # noqa: F401  (registers model_type "cogvlm2" for configs of that type)

    return AutoConfig.from_pretrained(str(path), local_files_only=True), path.name


def plan_rows(plan: Plan) -> list[tuple[str, int, int, str, int]]:
    """(component, params, fp16 bytes, default policy, bytes under the default policy) per component."""
    rows = []
    for name, c in plan.components.items():
        if not c.params:
            continue
        quantized = name in (LANGUAGE, EXPERTS)
        policy = f"int{plan.bits} g{plan.group_size}" if quantized else "16-bit"
        if name == VISION_LINEARS:
            policy = f"16-bit (int{plan.bits} with --quantize-vision)"
        rows.append((name, c.params, c.fp16_bytes, policy, c.int4_bytes if quantized else c.fp16_bytes))
    return rows
