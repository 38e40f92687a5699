"""QR codes made with OpenCV's encoder and an EAN-13 barcode drawn from its digit pattern, read back."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from server.perception.codes import ean_checksum_ok, read_codes

L_CODES = ("0001101", "0011001", "0010011", "0111101", "0100011", "0110001", "0101111", "0111011", "0110111",
           "0001011")  # fmt: skip
G_CODES = tuple("".join("1" if b == "0" else "0" for b in code)[::-1] for code in L_CODES)  # reversed R code
R_CODES = tuple("".join("1" if b == "0" else "0" for b in code) for code in L_CODES)  # complement of L
PARITY = ("LLLLLL", "LLGLGG", "LLGGLG", "LLGGGL", "LGLLGG", "LGGLLG", "LGGGLL", "LGLGLG", "LGLGGL", "LGGLGL")


def ean13_modules(digits: str) -> str:
    """The 95 bar/space modules of an EAN-13 code: guard, 6 L/G digits, centre, 6 R digits, guard."""
    assert len(digits) == 13
    left = "".join((L_CODES if p == "L" else G_CODES)[int(d)] for p, d in zip(PARITY[int(digits[0])], digits[1:7],
                                                                            strict=True))  # fmt: skip
    right = "".join(R_CODES[int(d)] for d in digits[7:])
    return "101" + left + "01010" + right + "101"


def draw_ean13(digits: str, module_px: int = 3, height: int = 160, quiet: int = 12) -> np.ndarray:
    modules = ean13_modules(digits)
    row = np.array([0 if m == "1" else 255 for m in modules], dtype=np.uint8).repeat(module_px)
    row = np.concatenate([np.full(quiet * module_px, 255, np.uint8), row, np.full(quiet * module_px, 255, np.uint8)])
    bars = np.tile(row, (height, 1))
    canvas = np.full((height + 80, bars.shape[1]), 255, dtype=np.uint8)
    canvas[40 : 40 + height] = bars
    return cv2.cvtColor(canvas, cv2.COLOR_GRAY2RGB)


def qr_image(text: str, scale: int = 8, border: int = 4) -> np.ndarray:
    code = cv2.QRCodeEncoder.create().encode(text)
    code = cv2.resize(code, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    code = cv2.copyMakeBorder(code, border * scale, border * scale, border * scale, border * scale,
                              cv2.BORDER_CONSTANT, value=255)  # fmt: skip
    return cv2.cvtColor(code, cv2.COLOR_GRAY2RGB)


def test_ean13_pattern_matches_the_standard_example() -> None:
    modules = ean13_modules("4006381333931")
    assert len(modules) == 95 and modules.startswith("101") and modules[45:50] == "01010"
    assert modules[3:10] == L_CODES[0] and modules[10:17] == G_CODES[0]  # first digit 4: parity L G ...


@pytest.mark.parametrize("module_px", [2, 3])
@pytest.mark.parametrize("digits", ["4006381333931", "5901234123457", "9780201379624", "8711253001202"])
def test_ean13_barcode_is_read_exactly(digits: str, module_px: int) -> None:
    assert ean_checksum_ok(digits)
    codes = read_codes(draw_ean13(digits, module_px=module_px))
    assert [(c.kind, c.text) for c in codes] == [("EAN-13 barcode", digits)]


@pytest.mark.parametrize("text", ["https://example.org/menu?table=7", "Platform 3: trains to Leeds"])
def test_qr_code_is_read_exactly(text: str) -> None:
    codes = read_codes(qr_image(text))
    assert [(c.kind, c.text) for c in codes] == [("QR code", text)]


def test_qr_code_inside_a_larger_photo_is_read() -> None:
    photo = np.full((900, 1200, 3), 180, dtype=np.uint8)
    qr = qr_image("door 12B", scale=6)
    photo[300 : 300 + qr.shape[0], 700 : 700 + qr.shape[1]] = qr
    assert [c.text for c in read_codes(photo)] == ["door 12B"]


def test_checksum_rejects_misreads() -> None:
    assert not ean_checksum_ok("4006381333932")
    assert not ean_checksum_ok("40063813339")
    assert not ean_checksum_ok("abcdefghijklm")


def test_nothing_to_read() -> None:
    assert read_codes(np.full((200, 200, 3), 255, dtype=np.uint8)) == []
    assert read_codes(np.zeros((1, 1, 3), dtype=np.uint8)) == []
