"""Offline OCR engines and reading order.

rapidocr_onnxruntime is the default: its PP-OCRv4 models ship inside the wheel (no download at run
time) and it reads scene text such as street signs. Tesseract is the option for documents
(`RPIQ_OCR_ENGINE=tesseract`, needs the `tesseract-ocr` package and `pytesseract`). Both return
lines with boxes; `reading_order` puts them in the order a sighted reader would read them
(top to bottom, left to right within a row), which is geometry, not language modelling.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image


@dataclass
class OcrLine:
    text: str
    confidence: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2


class OcrEngine(Protocol):
    name: str

    def recognize(self, img: Image.Image) -> list[OcrLine]:
        """All text lines found in an RGB image, in any order."""
        ...


class OcrUnavailableError(RuntimeError):
    pass


class RapidOcrEngine:
    """PP-OCRv4 (detection + angle classification + recognition) on onnxruntime, models in the wheel."""

    name = "rapidocr"

    def __init__(self, min_confidence: float = 0.5, threads: int = 1) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:  # pragma: no cover - a dependency of the package
            raise OcrUnavailableError(f"rapidocr_onnxruntime is not installed: {e}") from e
        # det_box_thresh 0.3 (default 0.5): measured on a photographed page, 0.5 dropped a whole faint line.
        # threads: onnxruntime's default is one per core, which would fight torch for the same CPUs.
        self._ocr = RapidOCR(det_box_thresh=0.3, intra_op_num_threads=threads, inter_op_num_threads=1)
        self._lock = threading.Lock()  # one inference at a time: the lane is single-threaded anyway
        self.min_confidence = min_confidence

    def recognize(self, img: Image.Image) -> list[OcrLine]:
        arr = np.asarray(img.convert("RGB"))[:, :, ::-1].copy()  # RapidOCR expects OpenCV's BGR order
        with self._lock:
            result, _elapsed = self._ocr(arr)
        lines = []
        for quad, text, score in result or []:
            xs = [p[0] for p in quad]
            ys = [p[1] for p in quad]
            if float(score) >= self.min_confidence and text.strip():
                lines.append(OcrLine(text.strip(), float(score), (min(xs), min(ys), max(xs), max(ys))))
        return lines


class TesseractEngine:
    """Tesseract 5 via pytesseract: near-perfect on documents, weaker on scene photos."""

    name = "tesseract"

    def __init__(self, lang: str = "eng") -> None:
        try:
            import pytesseract
        except ImportError as e:
            raise OcrUnavailableError("pytesseract is not installed (pip install pytesseract)") from e
        if shutil.which("tesseract") is None:
            raise OcrUnavailableError(
                "the tesseract binary is missing (apt-get install tesseract-ocr tesseract-ocr-eng)"
            )
        self._tess = pytesseract
        self.lang = lang

    def recognize(self, img: Image.Image) -> list[OcrLine]:
        scale = 2 if max(img.size) < 1500 else 1  # Tesseract wants ~30 px letters
        work = img.resize((img.width * scale, img.height * scale), Image.LANCZOS) if scale > 1 else img
        data = self._tess.image_to_data(work, lang=self.lang, output_type=self._tess.Output.DICT)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, word in enumerate(data["text"]):
            if word.strip() and float(data["conf"][i]) >= 0:
                groups.setdefault((data["block_num"][i], data["par_num"][i], data["line_num"][i]), []).append(i)
        lines = []
        for idx in groups.values():
            x0 = min(data["left"][i] for i in idx) / scale
            y0 = min(data["top"][i] for i in idx) / scale
            x1 = max(data["left"][i] + data["width"][i] for i in idx) / scale
            y1 = max(data["top"][i] + data["height"][i] for i in idx) / scale
            conf = float(np.mean([float(data["conf"][i]) for i in idx])) / 100.0
            lines.append(OcrLine(" ".join(data["text"][i] for i in idx), conf, (x0, y0, x1, y1)))
        return lines


def make_engine(name: str, threads: int = 1) -> OcrEngine | None:
    """The OCR engine `name`; `threads` bounds rapidocr's onnxruntime sessions (tesseract runs as its own process)."""
    if name == "none":
        return None
    if name == "tesseract":
        return TesseractEngine()
    return RapidOcrEngine(threads=threads)


def reading_order(lines: list[OcrLine]) -> list[OcrLine]:
    """Top-to-bottom rows (boxes whose vertical centres fall within half a line height), each left to right."""
    rows: list[list[OcrLine]] = []
    for line in sorted(lines, key=lambda ln: ln.cy):
        if rows:
            row = rows[-1]
            ref = np.mean([r.cy for r in row])
            tol = 0.5 * max(np.median([r.height for r in row]), line.height, 1.0)
            if abs(line.cy - ref) <= tol:
                row.append(line)
                continue
        rows.append([line])
    ordered = []
    for row in rows:
        ordered.extend(sorted(row, key=lambda ln: ln.box[0]))
    return ordered


def rows_of(lines: list[OcrLine]) -> list[str]:
    """The ordered lines joined into visual rows (one string per row)."""
    out: list[str] = []
    last_cy, last_h = None, None
    for line in lines:
        if last_cy is not None and abs(line.cy - last_cy) <= 0.5 * max(last_h, line.height, 1.0):
            out[-1] = out[-1] + " " + line.text
        else:
            out.append(line.text)
            last_cy, last_h = line.cy, line.height
    return out
