"""Reading accuracy and time: raw OCR vs the old LM-chosen clean-up vs the dictionary clean-up.

Why: the clean-up decides whether a blind user hears "Few women could think" or
"Fewwomencouldthink", and used to cost an LM pass per request. Pages are rendered with PIL and
DejaVu fonts from known text (Austen, from quantizer/corpus), so the ground truth is exact; each is
read by rapidocr, then scored by word accuracy (1 - word edit distance / reference words) for:

* raw: the OCR rows as they come;
* old: the previous `server/cleanup.py` (from git HEAD, or --old-ref) with the embedded
  SmolLM2-135M scoring each line against its space-repair candidate;
* new: `server.cleanup.clean_rows` (word-frequency segmentation, no LM).

Also times the whole read of ../shared/data/images/page.png (or quantizer/calib_images/page.jpg).

    python benchmarks/reading.py            # table + benchmarks/results/reading.json
    python benchmarks/reading.py --no-old   # skip the LM (no model needed)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

REPO = Path(__file__).resolve().parents[1]
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
PAGE_PHOTOS = (REPO.parent / "shared" / "data" / "images" / "page.png",
               REPO / "quantizer" / "calib_images" / "page.jpg")  # fmt: skip
# (corpus, first paragraph, font, size, blur): serif and sans, small to large print, sharp and soft.
PAGES = [
    ("persuasion", 3, "DejaVuSerif", 20, 0.0),
    ("persuasion", 9, "DejaVuSans", 18, 0.0),
    ("persuasion", 15, "DejaVuSerif", 26, 0.8),
    ("northangerabbey", 4, "DejaVuSerif", 22, 0.0),
    ("northangerabbey", 10, "DejaVuSans", 24, 0.6),
    ("northangerabbey", 16, "DejaVuSerif", 16, 0.0),
]


def paragraphs(corpus: str) -> list[str]:
    """Paragraphs of at least 300 characters from a bundled novel, whitespace collapsed."""
    text = (REPO / "quantizer" / "corpus" / f"{corpus}.txt").read_text(encoding="utf-8")
    paras = (re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n"))
    return [p for p in paras if len(p) >= 300]


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap at spaces (no hyphenation, so every rendered word is a reference word)."""
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if cur and font.getlength(trial) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return [*lines, cur] if cur else lines


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    path = FONT_DIR / f"{name}.ttf"
    return ImageFont.truetype(str(path), size) if path.is_file() else ImageFont.load_default(size=size)


def render_page(
    lines: list[str], font: str = "DejaVuSerif", size: int = 20, blur: float = 0.0, width: int = 1100
) -> Image.Image:
    """`lines` printed black on white, one per row, 1.6 line spacing; optionally Gaussian-blurred."""
    f = _font(font, size)
    step = int(size * 1.6)
    img = Image.new("RGB", (width, step * len(lines) + 60), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((30, 30 + i * step), line, font=f, fill="black")
    return img.filter(ImageFilter.GaussianBlur(blur)) if blur else img


def page_text(corpus: str, first: int, font: str, size: int, max_lines: int = 14) -> list[str]:
    """The lines of one benchmark page: paragraphs from `first` on, wrapped to the page width."""
    f = _font(font, size)
    lines: list[str] = []
    for para in paragraphs(corpus)[first:]:
        lines += wrap(para, f, 1100 - 60)
        if len(lines) >= max_lines:
            break
    return lines[:max_lines]


def words(text: str) -> list[str]:
    """Lower-case words with surrounding punctuation stripped: what a listener hears."""
    out = (re.sub(r"^\W+|\W+$", "", w.lower()) for w in text.split())
    return [w for w in out if w]


def word_accuracy(reference: str, hypothesis: str) -> float:
    """1 - (substitutions + deletions + insertions) / reference words, floored at 0."""
    ref, hyp = words(reference), words(hypothesis)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return max(0.0, 1.0 - prev[-1] / max(1, len(ref)))


def old_cleanup(ref: str) -> Callable[[list[str]], list[str]]:
    """The previous clean-up (server/cleanup.py at `ref`) with the embedded model's scores, as a function."""
    source = subprocess.run(["git", "show", f"{ref}:server/cleanup.py"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "old_cleanup.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("old_cleanup", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from models.embedded import ensure_default_model
    from server.engine import Engine

    engine = Engine(str(ensure_default_model()))
    engine.load()
    vocab = mod.vocabulary_from_tokenizer(engine.tokenizer)

    def clean(rows: list[str]) -> list[str]:
        cands = [mod.repair_candidate(r, vocab) for r in rows]
        todo = [t for r, c in zip(rows, cands, strict=True) if c is not None for t in (r, c)]
        return mod.choose(rows, cands, dict(zip(todo, engine.score(todo), strict=True))) if todo else rows

    return clean


def timed(fn: Callable, *args) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-old", action="store_true", help="skip the old LM clean-up (no model load)")
    parser.add_argument("--old-ref", default="HEAD", help="git revision holding the old server/cleanup.py")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reading.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from server.cleanup import clean_rows
    from server.ocr import RapidOcrEngine, rows_of, upright_lines
    from server.reading import Reader
    from server.wordseg import default_lexicon

    _, lexicon_s = timed(default_lexicon)
    ocr = RapidOcrEngine()
    methods: dict[str, Callable[[list[str]], list[str]]] = {"raw": lambda rows: rows, "new": clean_rows}
    if not args.no_old:
        methods["old"] = old_cleanup(args.old_ref)
    pages = []
    for corpus, first, font, size, blur in PAGES:
        truth = page_text(corpus, first, font, size)
        (lines, _turn), ocr_s = timed(upright_lines, ocr, render_page(truth, font, size, blur))
        rows = rows_of(lines)
        page = {"page": f"{corpus}#{first} {font} {size}px blur {blur}", "ocr_s": round(ocr_s, 3)}
        for name, fn in methods.items():
            out, dt = timed(fn, rows)
            page[name] = {"word_acc": round(word_accuracy("\n".join(truth), "\n".join(out)), 4), "s": round(dt, 4)}
        pages.append(page)
        print(page, flush=True)

    photo = next((p for p in PAGE_PHOTOS if p.is_file()), None)
    read_s = {}
    if photo is not None:  # the read path as /v1/read runs it (upscaling, orientation), minus HTTP
        image = Image.open(photo).convert("RGB")
        reader = Reader(ocr, None, cleanup=False)
        raw, ocr_read_s = timed(reader._read_now, image, False)
        read_s = {"photo": photo.name, "ocr_s": round(ocr_read_s, 3)}
        for name, fn in methods.items():
            _, dt = timed(fn, raw.rows)
            read_s[f"{name}_total_s"] = round(ocr_read_s + dt, 3)

    names = list(methods)
    summary = {n: round(sum(p[n]["word_acc"] for p in pages) / len(pages), 4) for n in names}
    clean_s = {n: round(sum(p[n]["s"] for p in pages) / len(pages), 4) for n in names}
    print(f"\n{'page':44s} " + " ".join(f"{n:>8s}" for n in names))
    for p in pages:
        print(f"{p['page']:44s} " + " ".join(f"{p[n]['word_acc']:8.3f}" for n in names))
    print(f"{'mean word accuracy':44s} " + " ".join(f"{summary[n]:8.3f}" for n in names))
    print(f"{'mean clean-up time per page (s)':44s} " + " ".join(f"{clean_s[n]:8.3f}" for n in names))
    print(f"lexicon load {lexicon_s:.2f} s; read of {read_s.get('photo')}: {read_s}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.machine(), "python": platform.python_version(),
              "lexicon_load_s": round(lexicon_s, 3), "mean_word_accuracy": summary, "mean_cleanup_s": clean_s,
              "pages": pages, "page_photo_read": read_s}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
