"""Reading text in a photo: OCR on its own lane, upright orientation, layout reading order, space repair.

One code path for every caller: /v1/read and the describer behind /v1/vqa ("Read this to me") both
call `Reader.read`, so both say the same words. The clean-up only inserts spaces, chosen by word
frequencies (`cleanup.py`), never by the language model: a sign is read as it is written or not at
all, and a page costs milliseconds of clean-up instead of one LM pass per line.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from PIL import Image

from .cleanup import clean_rows
from .engine import Engine
from .lanes import Lane
from .ocr import OcrEngine, OcrLine, rows_of, upright_lines
from .wordseg import default_lexicon

MIN_OCR_SIDE = 640  # small crops are upscaled: the detector misses letters under ~10 px


@dataclass
class Reading:
    lines: list[OcrLine]
    rows: list[str]
    raw_rows: list[str]
    engine: str
    cleaned: bool
    timings: dict[str, float] = field(default_factory=dict)
    turned: int = 0  # degrees counter-clockwise the photo was turned to read it upright

    @property
    def text(self) -> str:
        return "\n".join(self.rows)


class Reader:
    """OCR plus clean-up. `engine` and `model_lane` are kept for callers that pass them; the clean-up
    needs neither. `cleanup` is the default for `read`; None keeps the old wiring's meaning (on when a
    model lane was given, which the runtime does exactly when `ocr_cleanup` is set)."""

    def __init__(
        self,
        ocr: OcrEngine,
        ocr_lane: Lane,
        engine: Engine | None = None,
        model_lane: Lane | None = None,
        *,
        cleanup: bool | None = None,
    ) -> None:
        self.ocr = ocr
        self.ocr_lane = ocr_lane
        self.engine = engine
        self.model_lane = model_lane
        self.cleanup = model_lane is not None if cleanup is None else cleanup
        if self.cleanup:  # the word list loads in the background (~0.5 s) instead of on the first request
            threading.Thread(target=default_lexicon, name="rpiq-lexicon", daemon=True).start()

    def _recognize(self, image: Image.Image) -> tuple[list[OcrLine], int]:
        scale = 1.0
        if max(image.size) < MIN_OCR_SIDE:
            scale = MIN_OCR_SIDE / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        lines, turned = upright_lines(self.ocr, image)
        if scale != 1.0:
            for ln in lines:
                ln.box = tuple(v / scale for v in ln.box)
        return lines, turned

    def _read_now(self, image: Image.Image, cleanup: bool) -> Reading:
        """OCR and clean-up, run on the OCR lane (the clean-up is milliseconds, no LM involved)."""
        t0 = time.perf_counter()
        lines, turned = self._recognize(image)
        timings = {"ocr_s": time.perf_counter() - t0}
        raw = rows_of(lines)
        rows = raw
        if cleanup and raw:
            t1 = time.perf_counter()
            rows = clean_rows(raw)
            timings["cleanup_s"] = time.perf_counter() - t1
        return Reading(lines, rows, raw, self.ocr.name, rows != raw, timings, turned)

    async def read(
        self, image: Image.Image, *, cancel: threading.Event, timeout: float | None, cleanup: bool | None = None
    ) -> Reading:
        """The text in `image`, upright, in reading order; cleaned unless `cleanup` (default: the reader's) is off."""
        do_clean = self.cleanup if cleanup is None else cleanup
        return await self.ocr_lane.run(self._read_now, image, do_clean, cancel=cancel, timeout=timeout)
