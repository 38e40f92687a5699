"""Offline OCR engines and reading order.

rapidocr_onnxruntime is the default: its PP-OCRv4 models ship inside the wheel (no download at run
time) and it reads scene text such as street signs. Tesseract is the option for documents
(`RPIQ_OCR_ENGINE=tesseract`, needs the `tesseract-ocr` package and `pytesseract`). Both return
lines with boxes; `reading_order` puts them in the order a sighted reader would read them
(top to bottom, left to right within a row), which is geometry, not language modelling.
"""

from __future__ import annotations

import math
import shutil
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image


@dataclass
class OcrLine:
    text: str
    confidence: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    slope: float = 0.0  # dy/dx of the text baseline (a skewed photo), from the detector's quadrilateral
    text_height: float | None = None  # letter height from the quadrilateral; a skewed line's box is taller
    row: int | None = None  # the visual row `reading_order` put the line in

    @property
    def height(self) -> float:
        return self.text_height if self.text_height is not None else self.box[3] - self.box[1]

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2


def _quad_line(text: str, score: float, quad: Any) -> OcrLine:
    """An OcrLine from a detector quadrilateral (top-left, top-right, bottom-right, bottom-left)."""
    (tlx, tly), (trx, try_), (brx, bry), (blx, bly) = (tuple(map(float, p)) for p in quad)
    xs, ys = (tlx, trx, brx, blx), (tly, try_, bry, bly)
    width = max(abs(trx - tlx), 1.0)
    height = (math.dist((tlx, tly), (blx, bly)) + math.dist((trx, try_), (brx, bry))) / 2
    return OcrLine(text, score, (min(xs), min(ys), max(xs), max(ys)), slope=(try_ - tly) / width, text_height=height)


class OcrEngine(Protocol):
    name: str

    def recognize(self, img: Image.Image) -> list[OcrLine]:
        """All text lines found in an RGB image, in any order."""
        ...


class OcrUnavailableError(RuntimeError):
    pass


class _ClassifierLabels:
    """Wraps rapidocr's angle classifier to keep its labels, which rapidocr itself drops from its result."""

    def __init__(self, classifier: Any) -> None:
        self.classifier = classifier
        self.labels: list[str] = []

    def __call__(self, crops: Any) -> Any:
        out = self.classifier(crops)
        thresh = getattr(self.classifier, "cls_thresh", 0.9)  # rapidocr turns a crop only above this score
        self.labels = ["180" if "180" in str(label) and score > thresh else "0" for label, score in out[1]]
        return out


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
        self._flips = _ClassifierLabels(self._ocr.text_cls)
        self._ocr.text_cls = self._flips
        self.min_confidence = min_confidence

    def recognize(self, img: Image.Image) -> list[OcrLine]:
        return self.recognize_detailed(img)[0]

    def recognize_detailed(self, img: Image.Image, fix_flips: bool = True) -> tuple[list[OcrLine], float]:
        """Lines and the share of text crops the angle classifier turned 180 degrees (0 without it).

        fix_flips=False reads every crop as it lies: upside-down text then reads as junk with low
        confidence, which is what `upright_lines` needs to tell 90 from 270 and 0 from 180."""
        arr = np.asarray(img.convert("RGB"))[:, :, ::-1].copy()  # RapidOCR expects OpenCV's BGR order
        with self._lock:
            self._flips.labels = []
            result, _elapsed = self._ocr(arr, use_cls=fix_flips)
            labels = self._flips.labels
        flipped = sum(1 for label in labels if label == "180") / len(labels) if labels else 0.0
        lines = []
        for quad, text, score in result or []:
            if float(score) >= self.min_confidence and text.strip():
                lines.append(_quad_line(text.strip(), float(score), quad))
        return lines, flipped


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


def _skew(lines: list[OcrLine]) -> float:
    """The page's baseline slope: the median over lines long enough to measure it (zero when level)."""
    slopes = [ln.slope for ln in lines if ln.box[2] - ln.box[0] > 2 * ln.height]
    return float(np.median(slopes)) if slopes else 0.0


def _gutter(lines: list[OcrLine]) -> float | None:
    """The x of a gutter between columns of prose: an empty vertical band at least 1.5 line heights wide,
    with two or more lines of 15 or more characters on average wholly on each side (characters, not
    words: OCR glues words). Lines crossing it (a title over both columns) are ignored here. A table
    or a receipt ("Milk   2.50") has short cells, so it keeps being read row by row."""
    if len(lines) < 4:
        return None
    h = float(np.median([ln.height for ln in lines]))
    span = max(ln.box[2] for ln in lines) - min(ln.box[0] for ln in lines)
    narrow = sorted((ln for ln in lines if ln.box[2] - ln.box[0] < 0.6 * span), key=lambda ln: ln.box[0])
    reach = None
    for ln in narrow:
        if reach is not None and ln.box[0] - reach >= 1.5 * h:
            gap = (reach + ln.box[0]) / 2
            left = [len(o.text) for o in lines if o.box[2] <= gap]
            right = [len(o.text) for o in lines if o.box[0] >= gap]
            if min(len(left), len(right)) >= 2 and min(np.mean(left), np.mean(right)) >= 15:
                return gap
        reach = ln.box[2] if reach is None else max(reach, ln.box[2])
    return None


def _rows(lines: list[OcrLine], skew: float) -> list[list[OcrLine]]:
    """Top-to-bottom rows (centres, de-skewed, within half a line height), each left to right."""
    level = {id(ln): ln.cy - skew * ln.cx for ln in lines}
    rows: list[list[OcrLine]] = []
    for line in sorted(lines, key=lambda ln: level[id(ln)]):
        if rows:
            row = rows[-1]
            ref = np.mean([level[id(r)] for r in row])
            tol = 0.5 * max(np.median([r.height for r in row]), line.height, 1.0)
            if abs(level[id(line)] - ref) <= tol:
                row.append(line)
                continue
        rows.append([line])
    return [sorted(row, key=lambda ln: ln.box[0]) for row in rows]


def _ordered_rows(lines: list[OcrLine], skew: float) -> list[list[OcrLine]]:
    """Rows in reading order: a two-column section reads its left column, then its right one."""
    gap = _gutter(lines)
    if gap is None:
        return _rows(lines, skew)
    out: list[list[OcrLine]] = []
    section: list[OcrLine] = []
    for line in [*sorted(lines, key=lambda ln: ln.cy), None]:
        if line is None or line.box[0] < gap < line.box[2]:  # a line across the gutter ends a section
            left = [ln for ln in section if ln.cx < gap]
            out += _ordered_rows(left, skew) + _ordered_rows([ln for ln in section if ln.cx >= gap], skew)
            section = []
            if line is not None:
                out.append([line])
        else:
            section.append(line)
    return [row for row in out if row]


def reading_order(lines: list[OcrLine]) -> list[OcrLine]:
    """Lines in the order a sighted reader reads them: columns one after the other, within a column
    top-to-bottom rows (de-skewed), each row left to right. Sets each line's `row`."""
    ordered = []
    for i, row in enumerate(_ordered_rows(lines, _skew(lines))):
        for line in row:
            line.row = i
            ordered.append(line)
    return ordered


def rows_of(lines: list[OcrLine]) -> list[str]:
    """The ordered lines joined into visual rows (one string per row)."""
    out: list[str] = []
    last_row, last_cy, last_h = None, None, None
    for line in lines:
        if line.row is not None:
            same = line.row == last_row
        else:  # lines that did not come through `reading_order`: rows by vertical centre
            same = last_cy is not None and abs(line.cy - last_cy) <= 0.5 * max(last_h, line.height, 1.0)
        if same and out:
            out[-1] = out[-1] + " " + line.text
        else:
            out.append(line.text)
            last_cy, last_h = line.cy, line.height
        last_row = line.row
    return out


# --- orientation -----------------------------------------------------------------------------------
_TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
LOW_CONFIDENCE = 0.7  # mean line confidence below this on a sideways-looking result triggers a check


def _tall(line: OcrLine) -> bool:
    """A vertical text line: several characters in a box much taller than wide (the photo lies on its side)."""
    x0, y0, x1, y1 = line.box
    return len(line.text) >= 3 and (y1 - y0) > 1.5 * (x1 - x0)


def orientation_score(lines: list[OcrLine]) -> float:
    """Confidence x characters over horizontal lines: high only when the text stands upright."""
    return sum(ln.confidence * len(ln.text) for ln in lines if not _tall(ln))


def _unturn(box: tuple[float, float, float, float], angle: int, size: tuple[int, int]) -> tuple[float, ...]:
    """A box in an image turned `angle` degrees counter-clockwise, mapped back onto the original `size`."""
    w, h = size
    x0, y0, x1, y1 = box
    if angle == 90:
        return (w - y1, x0, w - y0, x1)
    if angle == 180:
        return (w - x1, h - y1, w - x0, h - y0)
    return (y0, h - x1, y1, h - x0)  # 270


def _candidate_turns(lines: list[OcrLine], flipped: float) -> tuple[tuple[int, ...], bool]:
    """Which turns to try, and whether the first reading competes: sideways boxes -> 90/270; most crops
    flipped -> 0/180 read as they lie; a weak reading -> the other three turns against it."""
    chars = sum(len(ln.text) for ln in lines)
    if chars and sum(len(ln.text) for ln in lines if _tall(ln)) >= 0.5 * chars:
        return (90, 270), False
    if flipped >= 0.5:
        return (0, 180), False
    if lines and sum(ln.confidence for ln in lines) / len(lines) < LOW_CONFIDENCE:
        return (90, 180, 270), True
    return (), True


def upright_lines(ocr: OcrEngine, img: Image.Image) -> tuple[list[OcrLine], int]:
    """Lines read from `img` in reading order, turned upright, and the turn used (degrees counter-clockwise).

    Why: a phone photo without an EXIF orientation tag can lie on its side; rapidocr still reads the
    sideways lines (it turns tall crops) but reading order then runs bottom to top ("AT ALL TIMES
    PROHIBITED PARKING DOUBLE NOTICE"). Only a suspicious first reading (sideways boxes, mostly
    flipped crops, low confidence) pays for more passes; each candidate turn is read without the
    per-crop flip fix, so upside-down text scores low, and the best confidence x characters wins.
    Boxes come back in the original photo's coordinates; the order is the upright reading order."""
    detailed = getattr(ocr, "recognize_detailed", None)
    lines, flipped = detailed(img) if detailed else (ocr.recognize(img), 0.0)
    turns, first_competes = _candidate_turns(lines, flipped)
    if not turns or detailed is None:
        return reading_order(lines), 0
    best_angle, best_lines, best_score = 0, lines, orientation_score(lines) if first_competes else -1.0
    for angle in turns:
        turned = img.transpose(_TURNS[angle]) if angle else img
        cand, _ = detailed(turned, fix_flips=False)
        score = orientation_score(cand)
        if score > best_score:
            best_angle, best_lines, best_score = angle, cand, score
    ordered = reading_order(best_lines)
    if best_angle:
        for ln in ordered:
            ln.box = _unturn(ln.box, best_angle, img.size)
    return ordered, best_angle
