"""Vision-language inference: a checkpoint's own processor, and chat messages with photos as model inputs.

Why a module of its own: the server, the CLI and the tests must turn "system prompt + photo + question"
into exactly the inputs the model was trained on, which only the model's processor (image resizing,
normalisation, image-token expansion, chat template) knows. Two kinds of model are covered:

* transformers VLMs (LLaVA, Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL, ...): ``AutoProcessor`` from the
  checkpoint directory (`save_quantized` copies the processor files there), its chat template, then
  the processor call on text and images;
* CogVLM-style remote code (``build_conversation_input_ids``): the model builds its own ids,
  token types and image tensors from the tokenizer; it takes one image per conversation.

Messages use the engine's format: ``{"role": ..., "content": str | list[part]}`` where a part is
``{"type": "text", "text": str}`` or ``{"type": "image", "image": PIL.Image}``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class ProcessorLoadError(ValueError):
    pass


def is_cogvlm_style(model: Any) -> bool:
    """CogVLM(2) builds its own inputs (remote code and `models.cogvlm2` alike)."""
    return hasattr(model, "build_conversation_input_ids")


def load_processor(where: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The model's multimodal processor, offline.

    Processors with a video half (Qwen2-VL, Qwen2.5-VL, SmolVLM2) refuse to build without torchvision
    even for images only. torchvision is not a dependency (the server takes photos, never video, and
    an edge install stays smaller), so those are rebuilt here without their video processor.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(where), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises ImportError, AttributeError or ValueError here
        first = e
    try:
        processor = _without_video(Path(where), trust_remote_code)
    except Exception as e:
        raise ProcessorLoadError(f"{where}: no usable processor ({first}; without video: {e})") from first
    if processor is None:
        raise ProcessorLoadError(f"{where}: no usable processor ({first})") from first
    log.info("%s: %s loaded without its video processor (%s)", where, type(processor).__name__, first)
    return processor


def _processor_class_name(where: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = where / name
        if f.is_file():
            cls = json.loads(f.read_text()).get("processor_class")
            if cls:
                return cls
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = json.loads((where / "config.json").read_text()).get("model_type")
    return PROCESSOR_MAPPING_NAMES.get(model_type)


def _without_video(where: Path, trust_remote_code: bool) -> Any:
    """`where`'s processor class built from its image processor, tokenizer and chat template only."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    cls = getattr(transformers, _processor_class_name(where) or "", None)
    if cls is None or "video_processor" not in cls.get_attributes():
        return None
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    image_only = type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda _c: list(attributes))})
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    image_processor = AutoImageProcessor.from_pretrained(str(where), **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(where), **kw)
    return image_only(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_chat_template(where, tokenizer)
    )


def _chat_template(where: Path, tokenizer: Any) -> str | None:
    if (where / "chat_template.jinja").is_file():
        return (where / "chat_template.jinja").read_text()
    if (where / "chat_template.json").is_file():
        return json.loads((where / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


# --------------------------------------------------------------------------- messages -> inputs


def _parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def images_of(messages: list[dict[str, Any]]) -> list[Any]:
    return [p["image"] for m in messages for p in _parts(m["content"]) if p.get("type") == "image"]


def flat_text(content: Any) -> str:
    """A message's text parts joined (images dropped): for text-only templates and prompt builders."""
    return "\n\n".join(p["text"] for p in _parts(content) if p.get("type") == "text")


def chat_inputs(model: Any, processor: Any, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Model inputs ([1, n] ids and whatever the model needs for its images) for a chat ending with
    a user turn, with the generation prompt appended; floats in the model's dtype.

    `processor` is the transformers processor, or the tokenizer for CogVLM-style models.
    """
    if is_cogvlm_style(model):
        inputs = _cogvlm_inputs(model, processor, messages)
    else:
        inputs = _processor_inputs(processor, messages)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    device = next(p.device for p in model.parameters())

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    return {k: move(v) for k, v in inputs.items()}


def _processor_inputs(processor: Any, messages: list[dict[str, Any]]) -> dict[str, Any]:
    images = images_of(messages)
    templated = [
        {
            "role": m["role"],
            "content": [{"type": "image"} if p.get("type") == "image" else p for p in _parts(m["content"])],
        }
        for m in messages
    ]
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(templated, add_generation_prompt=True, tokenize=False)
    else:  # no template: a plain transcript, one image token per photo where the photo was
        token = getattr(processor, "image_token", None) or "<image>"
        lines = []
        for m in templated:
            body = "".join(token if p.get("type") == "image" else p["text"] for p in m["content"])
            lines.append(f"{m['role'].capitalize()}: {body}\n")
        text = "".join(lines) + "Assistant:"
    out = processor(text=[text], images=[images] if images else None, return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _cogvlm_inputs(model: Any, tokenizer: Any, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """CogVLM's prompt: earlier (question, answer) pairs as history; the system text leads the query.
    Only the last photo is used: CogVLM2 takes one image per conversation."""
    system = " ".join(flat_text(m["content"]) for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    history, question = [], None
    for m in turns:
        if m["role"] == "user":
            question = flat_text(m["content"])
        elif question is not None:
            history.append((question, flat_text(m["content"])))
            question = None
    query = f"{system}\n\n{question or ''}".strip() if not history else question or ""
    if history and system:
        history[0] = (f"{system}\n\n{history[0][0]}", history[0][1])
    images = images_of(messages)[-1:]
    built = model.build_conversation_input_ids(tokenizer, query=query, history=history, images=images or None)
    inputs = {
        "input_ids": built["input_ids"][None],
        "token_type_ids": built["token_type_ids"][None],
        "attention_mask": built["attention_mask"][None],
    }
    if images:
        inputs["images"] = [built["images"]]
    return inputs
