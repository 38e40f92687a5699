"""Unit tests of the server's pure parts: image validation, facts, reading order, OCR clean-up, sentences, grounding."""

from __future__ import annotations

import pytest
from PIL import Image, ImageFilter

from server.cleanup import choose, repair_candidate, same_characters
from server.errors import ApiError
from server.grounding import filter_answer, grounded, is_read_request, read_answer
from server.images import ImageLimits, decode_image, measure
from server.ocr import OcrLine, reading_order, rows_of
from server.settings import ServerSettings, is_loopback
from server.speech import SentenceSplitter, speakable

from .helpers import png_bytes, render_text

LIMITS = ImageLimits(1_000_000, 5_000_000, ("PNG", "JPEG"))


def test_decode_image_errors_and_modes():
    img = render_text(["Hello"], size=30)
    assert decode_image(png_bytes(img), LIMITS).size == img.size
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert decode_image(png_bytes(rgba), LIMITS).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    cases = [
        (b"", 400, "empty_image"),
        (b"GIF89a not really", 400, "not_an_image"),
        (png_bytes(img)[:200], 400, "corrupt_image"),
        (png_bytes(img, "BMP"), 415, "unsupported_image_format"),
        (png_bytes(Image.new("1", (3000, 3000))), 413, "too_many_pixels"),
        (b"\x89PNG" + b"0" * 1_000_001, 413, "image_too_large"),
    ]
    for data, status, code in cases:
        with pytest.raises(ApiError) as e:
            decode_image(data, LIMITS)
        assert (e.value.status, e.value.code) == (status, code)


def test_measured_facts():
    sharp = render_text(["Sharp text here"], size=40)
    assert measure(sharp).warnings == []
    assert "blurry" in measure(sharp.filter(ImageFilter.GaussianBlur(6))).warnings
    assert measure(Image.new("RGB", (100, 100), (5, 5, 5))).warnings[0] == "dark"
    assert measure(Image.new("RGB", (100, 100), (5, 5, 5))).sentences()[0] == "The photo is very dark."


def test_reading_order_rows_then_left_to_right():
    lines = [
        OcrLine("world", 0.9, (120, 12, 200, 40)),
        OcrLine("second line", 0.9, (10, 60, 200, 90)),
        OcrLine("Hello", 0.9, (10, 10, 100, 38)),
    ]
    ordered = reading_order(lines)
    assert [ln.text for ln in ordered] == ["Hello", "world", "second line"]
    assert rows_of(ordered) == ["Hello world", "second line"]


def test_space_repair_only_inserts_spaces():
    vocab = frozenset({"histogram", "of", "grey", "values", "region", "based", "segmentation", "a", "i"})
    assert repair_candidate("histogram ofgreyvalues:", vocab) == "histogram of grey values:"
    assert repair_candidate("background.These markers", vocab) == "background. These markers"
    assert repair_candidate("Region-basedsegmentation", vocab) == "Region-based segmentation"
    assert repair_candidate("already fine", vocab) is None
    assert repair_candidate("xqzvwkjplm", vocab) is None  # no split into words: left alone
    for a, b in [("ofgreyvalues", "of grey values"), ("a.b", "a. b")]:
        assert same_characters(a, b)
    assert not same_characters("cat", "cart")
    lines, cands = ["ofgreyvalues", "keep"], ["of grey values", None]
    assert choose(lines, cands, {"ofgreyvalues": -30.0, "of grey values": -12.0}) == ["of grey values", "keep"]
    assert choose(lines, cands, {"ofgreyvalues": -5.0, "of grey values": -12.0}) == ["ofgreyvalues", "keep"]


def test_sentence_splitter_and_speakable():
    sp = SentenceSplitter()
    out = []
    for piece in ["The door is ", "open. A sign", " says EXIT. Then", " more"]:
        out += sp.feed(piece)
    assert out == ["The door is open.", "A sign says EXIT."]
    assert sp.flush() == ["Then more"]
    assert speakable("**Bold** `code` # title\x07") == "Bold code title"


def test_grounding_and_read_intent():
    ocr = "Fresh Milk\nBest before 12 May"
    assert grounded("It is fresh milk, best before 12 May.", ocr, "Is it good?")
    assert not grounded("It was bottled in Paris in 2017 by Nestle.", ocr, "Is it good?")
    assert filter_answer("It was bottled in Paris in 2017 by Nestle.", ocr, "Is it good?", True).startswith(
        "I can't answer that from the text in the photo. It says: Fresh Milk Best before 12 May."
    )
    assert is_read_request("What does the label say?") and is_read_request("read it")
    assert not is_read_request("Is the milk still good?")
    assert read_answer("EXIT\nPlatform 2") == "It says: EXIT Platform 2."


def test_settings_exposure_rules(monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("myhost")
    with pytest.raises(ValueError, match="API key"):
        ServerSettings(host="0.0.0.0").check_exposure()
    ServerSettings(host="0.0.0.0", api_key="k").check_exposure()
    ServerSettings(host="0.0.0.0", allow_insecure_public=True).check_exposure()
    monkeypatch.setenv("RPIQ_QUEUE_SIZE", "3")
    monkeypatch.setenv("RPIQ_API_KEY", "from-env")
    s = ServerSettings()
    assert s.queue_size == 3 and s.api_key.get_secret_value() == "from-env"
