"""What the whole photo looks like, from EfficientNet-lite3 (ImageNet-1k, int8).

Why a classifier besides the detector: COCO has 80 classes; ImageNet's 1000 include many things a
blind user meets that COCO lacks (a pill bottle, a radiator, an espresso) and finer kinds
(a tabby cat). It judges the whole photo and gives no place, so its labels are only ever said as
"it looks like ...", and only above a threshold: a low-confidence guess is left unsaid.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .facts import Label
from .runtime import Lazy, model_files, tflite_interpreter

INPUT = 280
MIN_SCORE = 0.35
TOP_K = 2


def _load() -> tuple[object, list[str]]:
    files = model_files()
    names = files.classifier_labels.read_text(encoding="utf-8").splitlines()
    return tflite_interpreter(str(files.classifier)), names


_model = Lazy(_load)


def spoken_label(imagenet_name: str) -> str:
    """'tabby, tabby cat' -> 'tabby cat': the first synonym, or a later one that spells it out."""
    synonyms = [s.strip() for s in imagenet_name.split(",") if s.strip()]
    if not synonyms:
        return imagenet_name.strip()
    first = synonyms[0]
    return next((s for s in synonyms[1:] if first in s.split() and len(s) > len(first)), first)


def probabilities(image: Image.Image) -> np.ndarray:
    """The 1000 class probabilities (dequantised from the uint8 output) for an RGB photo."""
    interpreter, _ = _model.get()
    x = np.asarray(image.convert("RGB").resize((INPUT, INPUT), Image.Resampling.BILINEAR), dtype=np.uint8)[None]
    with _model.lock:
        inp = interpreter.get_input_details()[0]
        out = interpreter.get_output_details()[0]
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        raw = interpreter.get_tensor(out["index"])[0]
    scale, zero_point = out["quantization"]
    probs = (raw.astype(np.float32) - zero_point) * scale if scale else raw.astype(np.float32)
    return probs


def classify(image: Image.Image, min_score: float = MIN_SCORE, top_k: int = TOP_K) -> list[Label]:
    """Up to ``top_k`` labels with probability at least ``min_score``, most likely first."""
    _, names = _model.get()
    probs = probabilities(image)
    labels = []
    for idx in np.argsort(-probs)[:top_k]:
        if probs[idx] >= min_score and idx < len(names):
            labels.append(Label(name=spoken_label(names[idx]), score=round(float(probs[idx]), 3)))
    return labels
