"""Image-aware calibration for vision-language models: (image, question, answer) samples and the
model inputs they become.

Why: in a VLM some weights only ever see image tokens (CogVLM2's visual experts, the vision
encoder) and the language tower sees image features mixed with text. Text-only calibration gives
those weights no (or unrepresentative) activations, so each sample here runs through the full
model, its own processor and its own vision tower, and every Hessian sees the tokens the model
really routes to that weight.

The built-in set (`builtin_samples`, CLI name ``images``) works offline on a fresh machine:

* three small photographs shipped as package data (``calib_images/``: a cat, a cup of coffee, a
  printed book page; downscaled from scikit-image's data directory, BSD-3-Clause, see
  ``calib_images/ATTRIBUTION.txt``);
* generated scenes of what a blind user's phone captures when asked to read something: signs,
  labels and notices rendered with Pillow at several sizes, tilted, blurred, dimmed, on plain and
  textured backgrounds. Their answers are the rendered text, so the calibration answer is exact.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

IMAGES = "images"
"""The CLI name of the built-in image calibration set (`rpiq quantize --calib-data images`)."""


@dataclass(frozen=True)
class CalibSample:
    """One calibration conversation: the user shows `image`, asks `question`, the model answers."""

    image: Any  # PIL.Image.Image
    question: str
    answer: str


PHOTOS: tuple[tuple[str, str, str], ...] = (
    (
        "chelsea.jpg",
        "What is in front of me?",
        "A tabby cat with orange, brown and black striped fur, sitting and looking to the side.",
    ),
    (
        "coffee.jpg",
        "What is in front of me?",
        "A small cup of espresso on a red saucer with a metal spoon, on a wooden table.",
    ),
    (
        "page.jpg",
        "Read this to me.",
        "Region-based segmentation. Let us first determine markers of the coins and the background. "
        "These markers are pixels that we can label unambiguously as either object or background.",
    ),
)

TEXTS: tuple[str, ...] = (
    "EXIT",
    "Platform 2",
    "Bus 47 to City Centre",
    "Paracetamol 500 mg - take 1 tablet every 4 hours",
    "Best before 12 MAR 2026",
    "PUSH",
    "Pharmacy open 9:00-18:00",
    "Room 214",
    "Caution: wet floor",
    "Whole milk 1 L",
    "Do not use if seal is broken",
    "Ticket office closed",
)
QUESTIONS: tuple[str, ...] = ("Read this to me.", "What does the sign say?", "What is written here?")
FONT_DIR = "/usr/share/fonts/truetype/dejavu"


def _font(size: int) -> Any:
    from PIL import ImageFont

    for name in ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(f"{FONT_DIR}/{name}", size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)  # Pillow's built-in scalable font: no system fonts needed


def render_text_scene(text: str, rng: random.Random, size: tuple[int, int] = (320, 240)) -> Any:
    """A phone-camera-like picture of `text`: random colours, font size, tilt, blur and light."""
    from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

    w, h = size
    bg = (
        tuple(rng.randint(150, 255) for _ in range(3))
        if rng.random() < 0.6
        else tuple(rng.randint(0, 90) for _ in range(3))
    )
    fg = tuple(255 - c for c in bg)
    img = Image.new("RGB", (w * 2, h * 2), bg)
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # texture: stripes or speckles like a wall, a box or a poster
        for _ in range(rng.randint(5, 40)):
            x, y = rng.randrange(w * 2), rng.randrange(h * 2)
            shade = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in bg)
            draw.rectangle((x, y, x + rng.randint(4, 60), y + rng.randint(4, 60)), fill=shade)
    font = _font(rng.choice((18, 24, 32, 44)))
    words, lines, line = text.split(), [], ""
    for word in words:  # wrap to the picture's width
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > w * 0.85:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    y = h - len(lines) * font.size // 2
    for text_line in lines:
        draw.text((w - draw.textlength(text_line, font=font) / 2, y), text_line, fill=fg, font=font)
        y += int(font.size * 1.2)
    img = img.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BICUBIC, fillcolor=bg)
    img = img.crop((w // 2, h // 2, w // 2 + w, h // 2 + h))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    if rng.random() < 0.4:
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.25, 0.6))  # a dim room
    return img


def photo_samples() -> list[CalibSample]:
    """The shipped photographs with their questions and reference answers."""
    from PIL import Image

    folder = resources.files("quantizer") / "calib_images"
    samples = []
    for name, question, answer in PHOTOS:
        with (folder / name).open("rb") as f:
            img = Image.open(f)
            img.load()
        samples.append(CalibSample(img.convert("RGB"), question, answer))
    return samples


def builtin_samples(n: int = 16, *, seed: int = 0, size: tuple[int, int] = (320, 240)) -> list[CalibSample]:
    """`n` samples: the shipped photos first, then generated text scenes (deterministic in `seed`)."""
    if n < 1:
        raise ValueError(f"the image calibration set needs at least one sample, got n={n}")
    rng = random.Random(seed)
    samples = photo_samples()[:n]
    while len(samples) < n:
        text = rng.choice(TEXTS)
        samples.append(CalibSample(render_text_scene(text, rng, size), rng.choice(QUESTIONS), text))
    return samples


# ------------------------------------------------------------------------------ model inputs


def _float_to(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        if isinstance(v, list):
            return [cast(x) for x in v]
        return v

    return {k: cast(v) for k, v in batch.items()}


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _conversation(sample: CalibSample) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]},
        {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]},
    ]


def processor_batch(processor: Any, sample: CalibSample) -> dict[str, Any]:
    """One sample through a transformers processor: chat template (question and answer), image."""
    if getattr(processor, "chat_template", None):
        prompt = processor.apply_chat_template(_conversation(sample), tokenize=False)
    else:
        token = getattr(processor, "image_token", None) or "<image>"
        prompt = f"{token}\n{sample.question}\n{sample.answer}"
    out = processor(text=[prompt], images=[[sample.image]], return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def cogvlm_batch(model: Any, tokenizer: Any, sample: CalibSample) -> dict[str, Any]:
    """One sample through CogVLM's own prompt builder (remote code and `models.cogvlm2` alike)."""
    built = model.build_conversation_input_ids(
        tokenizer, query=sample.question, answer=sample.answer, images=[sample.image]
    )
    return {
        "input_ids": built["input_ids"][None],
        "token_type_ids": built["token_type_ids"][None],
        "attention_mask": built["attention_mask"][None],
        "images": [built["images"]],
    }


def vlm_batches(
    model: torch.nn.Module,
    samples: Sequence[CalibSample],
    *,
    processor: Any = None,
    tokenizer: Any = None,
) -> list[dict[str, Any]]:
    """Model-input batches (one sample each) for `quantize_model`, in the model's float dtype.

    CogVLM-style models (with ``build_conversation_input_ids``) take `tokenizer`; every other VLM
    takes its transformers `processor` (``AutoProcessor.from_pretrained(model_dir)``).
    """
    dtype = _model_dtype(model)
    if hasattr(model, "build_conversation_input_ids"):
        if tokenizer is None:
            raise ValueError("CogVLM-style models need their tokenizer to build calibration inputs")
        return [_float_to(cogvlm_batch(model, tokenizer, s), dtype) for s in samples]
    if processor is None:
        raise ValueError(f"{type(model).__name__}: image calibration needs the model's processor")
    return [_float_to(processor_batch(processor, s), dtype) for s in samples]


def image_calibration(
    model: torch.nn.Module, where: Any, tokenizer: Any, nsamples: int, seed: int = 0
) -> tuple[list[dict[str, Any]], Any]:
    """The built-in image set as `model`'s inputs, and what to save beside the checkpoint (its
    processor, or its tokenizer for CogVLM-style models that have none)."""
    samples = builtin_samples(nsamples, seed=seed)
    if hasattr(model, "build_conversation_input_ids"):
        return vlm_batches(model, samples, tokenizer=tokenizer), tokenizer
    from models.loading import load_processor

    processor = load_processor(where)
    return vlm_batches(model, samples, processor=processor), processor
