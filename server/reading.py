"""Reading text in a photo: OCR on its own lane, geometric reading order, then LM-chosen space repair.

The language model never writes here: it only scores readings made of the OCR's own characters
(see `cleanup.py`), so a sign is read as it is written or not at all.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from PIL import Image

from .cleanup import choose, repair_candidate, vocabulary_from_tokenizer
from .engine import Engine
from .lanes import Lane
from .ocr import OcrEngine, OcrLine, reading_order, rows_of

MIN_OCR_SIDE = 640  # small crops are upscaled: the detector misses letters under ~10 px


@dataclass
class Reading:
    lines: list[OcrLine]
    rows: list[str]
    raw_rows: list[str]
    engine: str
    cleaned: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n".join(self.rows)


class Reader:
    def __init__(self, ocr: OcrEngine, ocr_lane: Lane, engine: Engine | None, model_lane: Lane | None) -> None:
        self.ocr = ocr
        self.ocr_lane = ocr_lane
        self.engine = engine
        self.model_lane = model_lane
        self._vocab: frozenset[str] | None = None

    def _recognize(self, image: Image.Image) -> list[OcrLine]:
        scale = 1.0
        if max(image.size) < MIN_OCR_SIDE:
            scale = MIN_OCR_SIDE / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        lines = self.ocr.recognize(image)
        if scale != 1.0:
            for ln in lines:
                ln.box = tuple(v / scale for v in ln.box)
        return reading_order(lines)

    def vocabulary(self) -> frozenset[str]:
        if self._vocab is None:
            self._vocab = vocabulary_from_tokenizer(self.engine.tokenizer)
        return self._vocab

    async def read(
        self, image: Image.Image, *, cancel: threading.Event, timeout: float | None, cleanup: bool = True
    ) -> Reading:
        t0 = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        lines = await self.ocr_lane.run(self._recognize, image, cancel=cancel, timeout=timeout)
        timings = {"ocr_s": time.perf_counter() - t0}
        raw = rows_of(lines)
        rows, cleaned = raw, False
        if cleanup and raw and self.engine is not None and self.engine.loaded and self.model_lane is not None:
            vocab = self.vocabulary()
            cands = [repair_candidate(r, vocab) for r in raw]
            todo = [t for r, c in zip(raw, cands, strict=True) if c is not None for t in (r, c)]
            if todo:
                t1 = time.perf_counter()
                remaining = None if deadline is None else max(0.01, deadline - time.monotonic())
                scores = await self.model_lane.run(self.engine.score, todo, cancel=cancel, timeout=remaining)
                rows = choose(raw, cands, dict(zip(todo, scores, strict=True)))
                cleaned = rows != raw
                timings["cleanup_s"] = time.perf_counter() - t1
        return Reading(lines, rows, raw, self.ocr.name, cleaned, timings)
