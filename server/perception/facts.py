"""The facts each perception channel reports, as small pydantic models.

Why pydantic: a `Scene` is handed to the HTTP layer (JSON) and to a language model (text); one
validated, serialisable shape serves both and keeps every channel's output honest about its units
(scores 0..1, boxes normalised to the photo, shares of pixels).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Box = tuple[float, float, float, float]
"""x1, y1, x2, y2 as fractions of the photo's width and height (0..1), top-left origin."""

Nearness = Literal["close", "near", "far"]
Facing = Literal["towards the camera", "away from the camera", "unknown"]


class DetectedObject(BaseModel):
    """One object the detector found above its class's threshold."""

    label: str
    score: float = Field(ge=0.0, le=1.0)
    box: Box
    clock: str = Field(description="clock direction from the camera, e.g. '12 o'clock' is straight ahead")
    direction: str = Field(description="the same direction in words, e.g. 'straight ahead', 'on the left'")
    nearness: Nearness
    colour: str | None = Field(None, description="main colours of the middle of the box, e.g. 'orange and red'")


class Person(BaseModel):
    """A detected person; `facing` is judged from body keypoints for the largest person only."""

    box: Box
    score: float = Field(ge=0.0, le=1.0)
    clock: str
    nearness: Nearness
    facing: Facing = "unknown"


class Label(BaseModel):
    """A whole-photo ImageNet label, said as "it looks like ..." (a guess, not a detection)."""

    name: str
    score: float = Field(ge=0.0, le=1.0)


class Colour(BaseModel):
    """A named colour and the share of pixels (0..1) it covers in its region."""

    name: str
    share: float = Field(ge=0.0, le=1.0)


class Light(BaseModel):
    """How bright the photo is and where the light comes from."""

    level: Literal["dark", "dim", "bright"]
    mean: float = Field(description="mean luminance 0..255")
    brightest: str | None = Field(None, description="e.g. 'top left'; None when evenly lit")


class Code(BaseModel):
    """A machine-readable code and its decoded text (QR text or barcode digits)."""

    kind: str
    text: str
