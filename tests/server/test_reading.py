"""Reading: the dictionary clean-up (only spaces, no invented words), layout order, orientation, one code path.

Pages are rendered with PIL and DejaVu fonts from known text (benchmarks/reading.py), so the truth is exact.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.reading import render_page, word_accuracy
from server.cleanup import clean_line, clean_rows, same_characters
from server.ocr import OcrLine, RapidOcrEngine, reading_order, rows_of, upright_lines
from server.wordseg import Lexicon, segment_run

from .helpers import png_bytes, render_text

SHARED_PAGE = Path(__file__).resolve().parents[3] / "shared" / "data" / "images" / "page.png"
GLUED = {  # what rapidocr really returned on rendered and photographed pages -> what a listener should hear
    "Fewwomencouldthinkmoreoftheirpersonalappearance": "Few women could think more of their personal appearance",
    "technicaldetailsare toocomplextocoverinthebook": "technical details are too complex to cover in the book",
    "Vanitywasthebeginning andtheendofSirWalterElliot'scharacter;": (
        "Vanity was the beginning and the end of Sir Walter Elliot's character;"
    ),
    "respectablefamily,in theusual terms;how it": "respectable family, in the usual terms; how it",
    "histogram ofgreyvalues:": "histogram of grey values:",
    "background.These markers": "background. These markers",
    "Region-basedsegmentation": "Region-based segmentation",
    "buildon imagesand": "build on images and",
    "CharlesII,with": "Charles II, with",
    "NOPARKING": "NO PARKING",
}
KEPT = ["already fine", "together atone", "xqzvwkjplm", "www.example.com e.g. 3.14", ">>markers=np.zeros like(coins)",
        "Kellynch Hall", "covering the book", "sandwich images"]  # fmt: skip


@pytest.fixture(scope="module")
def ocr() -> RapidOcrEngine:
    return RapidOcrEngine()


# --- clean-up ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("glued", "expected"), GLUED.items())
def test_cleanup_splits_glued_words(glued, expected):
    assert clean_line(glued) == expected


@pytest.mark.parametrize("line", KEPT)
def test_cleanup_leaves_words_names_and_non_words_alone(line):
    assert clean_line(line) == line


def test_segmentation_never_splits_a_dictionary_word_and_only_uses_listed_pieces():
    counts = [("the", 1000), ("of", 900), ("at", 800), ("one", 700), ("book", 50), ("cov", 40), ("erin", 30)]
    lex = Lexicon.from_counts(counts, ["the", "of", "at", "one", "book", "atone"])
    assert segment_run("ofthebook", lex) == "of the book"
    assert segment_run("atone", lex) == "atone"  # a dictionary word, though "at"+"one" would be words too
    assert segment_run("zzofzz", lex) == "zzofzz"  # no cover by listed words: left alone, never guessed
    for run in ("ofthebook", "Ofthebook", "coverin"):
        assert same_characters(run, segment_run(run, lex))


# --- layout order ---------------------------------------------------------------------------------------


def _box_line(text: str, x: float, y: float, w: float = 300, h: float = 20, slope: float = 0.0) -> OcrLine:
    return OcrLine(text, 0.9, (x, y, x + w, y + h + abs(slope) * w), slope=slope, text_height=h)


def test_two_columns_read_column_by_column_under_a_title():
    lines = [_box_line("A Title Across Both Columns", 20, 10, w=700)]
    lines += [_box_line(f"left column line {i} here", 20, 60 + 30 * i) for i in range(4)]
    lines += [_box_line(f"right column line {i} here", 420, 60 + 30 * i) for i in range(4)]
    expected = [f"{side} column line {i} here" for side in ("left", "right") for i in range(4)]
    assert rows_of(reading_order(lines)) == ["A Title Across Both Columns", *expected]


def test_a_price_list_is_read_row_by_row():
    lines = [_box_line(item, 20, 40 * i, w=120) for i, item in enumerate(["Milk", "Fresh bread", "Eggs"])]
    lines += [_box_line(price, 400, 40 * i, w=60) for i, price in enumerate(["2.50", "1.20", "3.10"])]
    assert rows_of(reading_order(lines)) == ["Milk 2.50", "Fresh bread 1.20", "Eggs 3.10"]


def test_skewed_lines_keep_their_rows():
    # a page turned ~6 degrees: each box is taller than the line spacing, and a row's right half sits higher
    slope = -0.1
    lines = []
    for i in range(4):
        y = 100 + 30 * i
        lines.append(_box_line(f"r{i} left", 20, y, slope=slope))
        lines.append(_box_line(f"r{i} right", 340, y + slope * 320, slope=slope))
    assert rows_of(reading_order(lines)) == [f"r{i} left r{i} right" for i in range(4)]


def test_rendered_two_column_page_reads_column_by_column(ocr):
    left = ["The left column is read", "first and it goes on", "down to its very end"]
    right = ["and then the right one", "follows it in the same", "way down to the end"]
    img = Image.new("RGB", (1000, 260), "white")
    img.paste(render_page(left, size=26, width=460), (0, 0))
    img.paste(render_page(right, size=26, width=460), (520, 0))
    text = " ".join(clean_rows(rows_of(upright_lines(ocr, img)[0])))
    assert word_accuracy(" ".join(left + right), text) >= 0.9, text


# --- orientation ------------------------------------------------------------------------------------------

SIGN = ["NOTICE", "DOUBLE PARKING", "PROHIBITED", "AT ALL TIMES"]


@pytest.mark.parametrize("angle", [90, 270, 180])
def test_a_turned_sign_without_exif_is_read_upright_in_order(ocr, angle):
    img = render_text(SIGN, size=40).rotate(angle, expand=True)  # no EXIF tag: only the pixels say which way is up
    lines, turned = upright_lines(ocr, img)
    assert (angle + turned) % 360 == 0
    assert same_characters(" ".join(rows_of(lines)), " ".join(SIGN))  # in order (spaces are the clean-up's job)
    for ln in lines:  # boxes are reported on the photo as sent
        assert 0 <= ln.box[0] < ln.box[2] <= img.width + 1 and 0 <= ln.box[1] < ln.box[3] <= img.height + 1


def test_an_upright_page_costs_one_pass(ocr, monkeypatch):
    calls = []
    real = ocr.recognize_detailed
    monkeypatch.setattr(ocr, "recognize_detailed", lambda img, fix_flips=True: calls.append(1) or real(img, fix_flips))
    assert upright_lines(ocr, render_text(SIGN, size=40))[1] == 0
    assert len(calls) == 1


@pytest.mark.skipif(not SHARED_PAGE.is_file(), reason="../shared/data/images is not present")
def test_photographed_page_is_cleaned(ocr):
    rows = clean_rows(rows_of(upright_lines(ocr, Image.open(SHARED_PAGE).convert("RGB"))[0]))
    text = " ".join(rows)
    assert "Region-based segmentation" in text and "histogram of grey values" in text
    assert "the markers are found" in text


# --- one code path ---------------------------------------------------------------------------------------


def test_vqa_read_this_says_what_read_says(client):
    page = png_bytes(render_page(["Fewwomencouldthinkmore of their", "personal appearance thanhe did."], size=30))
    files = {"image": ("page.png", page, "image/png")}
    read = client.post("/v1/read", files=files)
    vqa = client.post("/v1/vqa", files=files, data={"question": "Read this to me"})
    assert read.status_code == 200 and vqa.status_code == 200, (read.text, vqa.text)
    text = read.json()["text"]
    assert "Few women could think more" in text, text
    assert vqa.json()["answer"] == "It says: " + " ".join(text.split("\n")) + ("" if text[-1:] in ".!?" else ".")


def test_describer_and_reader_share_the_cleaned_text(ocr):
    from server.lanes import Lane
    from server.reading import Reader
    from server.vision import TextOnlyDescriber

    reader = Reader(ocr, Lane("ocr", 4), cleanup=True)
    img = render_page(["Fewwomencouldthinkmoreoftheir", "personalappearance"], size=30)
    read = asyncio.run(reader.read(img, cancel=threading.Event(), timeout=60))
    ctx = asyncio.run(TextOnlyDescriber(reader, perceiver=None).describe(img, cancel=threading.Event(), timeout=60))
    assert read.cleaned and ctx.text == read.text
    assert "women could think" in read.text
