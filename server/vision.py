"""The seam between images and language: a `Describer` turns a photo into context for the model.

Why a seam: the embedded default (SmolLM2-135M) is text-only. It must not pretend to see, so its
describer hands it only what the server can really extract: the text in the photo (offline OCR) and
measured facts (size, brightness, contrast, sharpness). A vision-language checkpoint plugs in here
with `VLMDescriber` (`can_see = True`): the context then carries the photo itself, which the planners
(`assist.plan_vqa`, `assist.plan_chat`) put into the user message for the model to look at, and the routes
do not change. The VLM still gets the OCR text and the measured facts: small VLMs misread print, and
the quality warnings are said first whatever model answers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from .images import ImageFacts, measure

if TYPE_CHECKING:
    from .reading import Reader, Reading


@dataclass
class ImageContext:
    facts: ImageFacts
    reading: Reading | None
    can_see: bool
    description: str | None = None  # a description made beforehand; None when the model looks itself
    timings: dict[str, float] = field(default_factory=dict)
    image: Any = None  # the photo (PIL), for a model that can see; None for the text-only describer

    def message_content(self, text: str) -> str | list[dict[str, Any]]:
        """A user message's content: the photo first (when the model can see it), then `text`."""
        if self.can_see and self.image is not None:
            return [{"type": "image", "image": self.image}, {"type": "text", "text": text}]
        return text

    @property
    def text(self) -> str:
        return self.reading.text if self.reading else ""

    def prompt_block(self, max_chars: int = 3000) -> str:
        """The photo as the language model gets it: only measured or read facts, labelled as such."""
        parts = []
        if self.description:
            parts.append(f"What the photo shows: {self.description}")
        if not self.can_see:
            parts.append("You cannot see the photo. The camera software measured and read the following.")
        f = self.facts
        quality = " ".join(f.sentences()) or "The photo is clear enough to read."
        parts.append(f"Photo: {f.width} by {f.height} pixels. {quality}")
        if self.text:
            parts.append(f'Text in the photo, read by OCR, verbatim:\n"""\n{self.text[:max_chars]}\n"""')
        else:
            parts.append("No text was found in the photo.")
        return "\n".join(parts)


class Describer(Protocol):
    can_see: bool

    async def describe(self, image: Image.Image, *, cancel: threading.Event, timeout: float | None) -> ImageContext: ...


class TextOnlyDescriber:
    """For text-only models: OCR + measured facts, nothing invented."""

    can_see = False

    def __init__(self, reader: Reader | None) -> None:
        self.reader = reader

    async def describe(self, image: Image.Image, *, cancel: threading.Event, timeout: float | None) -> ImageContext:
        facts = measure(image)
        reading = None
        if self.reader is not None:
            reading = await self.reader.read(image, cancel=cancel, timeout=timeout, cleanup=False)
        timings = dict(reading.timings) if reading else {}
        return ImageContext(
            facts, reading, can_see=self.can_see, timings=timings, image=image.convert("RGB") if self.can_see else None
        )


class VLMDescriber(TextOnlyDescriber):
    """For vision-language models: the photo itself goes to the model, with OCR text and measured facts."""

    can_see = True
