"""`perceive`: every perception channel once over a photo, gathered into one `Scene`.

Why one pass: a request needs all the facts (objects, people, labels, colours, light, codes) to
answer well, and each channel is cheap (tens of ms) next to the language model. The photo is
converted once (any mode -> RGB, transparency over white) and shrunk once (longest side
`WORK_SIDE`; the nets shrink further to their own input sizes), so a 48-megapixel upload costs the
same as a phone photo. A channel that fails is recorded in `Scene.errors` and the others still
report: a broken model must never turn into a 500 or, worse, into an invented answer. A photo too
small or too flat to show anything skips the nets: their guesses on a blank wall are noise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, Field

from . import wording
from .answers import answer_from_facts
from .classify import classify
from .codes import read_codes
from .colour import centre_region, dominant_colours
from .detect import detect_objects
from .facts import Code, Colour, DetectedObject, Label, Light, Person
from .geometry import box_area
from .light import measure_light
from .pose import person_facing

__all__ = ["Scene", "answer_from_facts", "perceive", "prepare"]

log = logging.getLogger(__name__)
T = TypeVar("T")

WORK_SIDE = 1280  # codes need detail; 1280 reads a barcode filling a tenth of a phone photo
MIN_SIDE_FOR_NETS = 32
FLAT_STD_BELOW = 4.0  # largest per-channel standard deviation of a blank photo (sensor noise only)


class Scene(BaseModel):
    """Everything the perception layer measured about one photo."""

    width: int = Field(description="the photo's width in pixels, as received")
    height: int
    objects: list[DetectedObject] = Field(default_factory=list, description="strongest first; people included")
    people: list[Person] = Field(default_factory=list, description="detected people, largest first")
    labels: list[Label] = Field(default_factory=list, description="whole-photo guesses ('it looks like')")
    colours: list[Colour] = Field(default_factory=list, description="dominant colours of the whole photo")
    centre_colours: list[Colour] = Field(default_factory=list, description="dominant colours of the centre")
    light: Light | None = None
    codes: list[Code] = Field(default_factory=list)
    blank: bool = Field(False, description="too small or too flat for the nets to see anything")
    timings_ms: dict[str, float] = Field(default_factory=dict, description="milliseconds per stage")
    errors: dict[str, str] = Field(default_factory=dict, description="stage -> why it produced nothing")

    def facts_block(self) -> str:
        """A labelled plain-text block of the facts, for a language model's context."""
        return wording.facts_block(self)

    def summary(self) -> str:
        """One spoken paragraph describing the photo from the facts alone."""
        return wording.summary(self)

    def answer(self, question: str) -> str | None:
        """A direct answer when the facts answer ``question``; None otherwise."""
        return answer_from_facts(question, self)


def prepare(image: Image.Image, side: int = WORK_SIDE) -> Image.Image:
    """Upright RGB copy with the longest side at most ``side`` (transparent pixels shown over white)."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose the photo
        log.debug("EXIF orientation ignored", exc_info=True)
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(image, dtype=np.float32)
        top = float(arr.max()) or 1.0
        image = Image.fromarray((arr / top * 255.0).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def perceive(image: Image.Image) -> Scene:
    """Run every channel once over ``image``; never raises for a decodable image."""
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}

    def stage(name: str, fn: Callable[[], T], default: T) -> T:
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # one failed channel must not silence the others
            log.warning("perception stage %s failed", name, exc_info=True)
            errors[name] = f"{type(exc).__name__}: {exc}"
            return default
        finally:
            timings[name] = round((time.perf_counter() - t0) * 1000.0, 1)

    width, height = image.size
    work = stage("prepare", lambda: prepare(image), None)
    if work is None:
        return Scene(width=width, height=height, blank=True, timings_ms=timings, errors=errors)
    rgb = np.asarray(work)
    blank = min(work.size) < MIN_SIDE_FOR_NETS or float(rgb.reshape(-1, 3).std(axis=0).max()) < FLAT_STD_BELOW

    objects: list[DetectedObject] = [] if blank else stage("detect", lambda: detect_objects(rgb), [])
    people = stage("pose", lambda: _people(work, objects), []) if objects else []
    labels: list[Label] = [] if blank else stage("classify", lambda: classify(work), [])
    colours = stage("colour", lambda: _colours(rgb, objects), ([], []))
    light = stage("light", lambda: measure_light(rgb), None)
    codes: list[Code] = stage("codes", lambda: read_codes(rgb), [])
    return Scene(
        width=width,
        height=height,
        objects=objects,
        people=people,
        labels=labels,
        colours=colours[0],
        centre_colours=colours[1],
        light=light,
        codes=codes,
        blank=blank,
        timings_ms=timings,
        errors=errors,
    )


def _people(work: Image.Image, objects: list[DetectedObject]) -> list[Person]:
    """People from the detections, largest first; facing judged for the largest only (MoveNet is single-person)."""
    found = sorted((o for o in objects if o.label == "person"), key=lambda o: -box_area(o.box))
    people = [Person(box=o.box, score=o.score, clock=o.clock, nearness=o.nearness) for o in found]
    if people:
        people[0].facing = person_facing(work, people[0].box)
    return people


def _colours(rgb: np.ndarray, objects: list[DetectedObject]) -> tuple[list[Colour], list[Colour]]:
    """Whole-photo and centre colours; also the main colours in the middle of each object's box."""
    h, w = rgb.shape[:2]
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        region = rgb[int(y1 * h) : max(int(y2 * h), int(y1 * h) + 1), int(x1 * w) : max(int(x2 * w), int(x1 * w) + 1)]
        named = dominant_colours(centre_region(region, 0.6), clusters=3, min_share=0.25)
        obj.colour = " and ".join(c.name for c in named[:2]) or None
    return dominant_colours(rgb), dominant_colours(centre_region(rgb))
