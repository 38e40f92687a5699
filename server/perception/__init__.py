"""Perception for a text-only model: what is in a photo, measured by small pretrained nets and OpenCV.

Why: the default install's language model cannot see. These channels turn a photo into facts a
text model can use and a blind user can trust: objects with where they are (SSD-MobileNet, COCO),
whether a person faces the camera (MoveNet), what the photo looks like (EfficientNet-lite3), colours,
light, and QR/barcodes. Models come from a pinned PyPI wheel (`assets`) and load lazily.

Public API: `perceive(image) -> Scene`, `Scene.facts_block()`, `Scene.summary()`,
`answer_from_facts(question, scene)`.
"""

from __future__ import annotations

from .answers import answer_from_facts
from .assets import ensure_perception_models
from .scene import Scene, perceive

__all__ = ["Scene", "answer_from_facts", "ensure_perception_models", "perceive"]
