"""QR codes and product barcodes (EAN/UPC), read with OpenCV's detectors (no model file).

Why: a product's barcode or a QR code on a door or a leaflet is often the only machine-readable
label a blind user can get at. QR text is said as read; barcode digits are said only when their
check digit is right, so a misread never becomes a wrong product.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

from .facts import Code

BARCODE_KINDS = {"EAN_13": "EAN-13 barcode", "EAN_8": "EAN-8 barcode", "UPC_A": "UPC-A barcode",
                 "UPC_E": "UPC-E barcode"}  # fmt: skip


def ean_checksum_ok(digits: str) -> bool:
    """GS1 check digit (EAN-8, UPC-A, EAN-13): weights 3,1,3,... from the right, excluding the check digit."""
    if not digits.isdigit() or len(digits) not in (8, 12, 13):
        return False
    body, check = digits[:-1], int(digits[-1])
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(body)))
    return (10 - total % 10) % 10 == check


def read_qr_codes(gray: np.ndarray) -> list[Code]:
    """Decoded QR codes in a grayscale uint8 image (empty payloads, i.e. undecodable codes, left out)."""
    detector = cv2.QRCodeDetector()  # per call: the detector keeps state and is not thread-safe
    ok, texts, _, _ = detector.detectAndDecodeMulti(gray)
    if not ok:
        text, _, _ = detector.detectAndDecode(gray)
        texts = (text,)
    return [Code(kind="QR code", text=t) for t in dict.fromkeys(texts) if t]


def read_barcodes(gray: np.ndarray) -> list[Code]:
    """EAN/UPC barcodes in a grayscale uint8 image whose digits pass the check-digit test.

    OpenCV's decoder is sensitive to bar width and edge sharpness, so when the photo as given yields
    nothing it is tried softened (a 3x3 blur) and at half size; the first pass that decodes wins.
    """
    detector = cv2.barcode.BarcodeDetector()
    for candidate in _barcode_passes(gray):
        ok, texts, kinds, _ = detector.detectAndDecodeWithType(candidate)
        if not ok:
            continue
        found: dict[str, Code] = {}
        for text, kind in zip(texts, kinds, strict=False):
            if text and (kind not in ("EAN_13", "EAN_8", "UPC_A") or ean_checksum_ok(text)):
                found.setdefault(text, Code(kind=BARCODE_KINDS.get(kind, "barcode"), text=text))
        if found:
            return list(found.values())
    return []


def _barcode_passes(gray: np.ndarray) -> Iterator[np.ndarray]:
    yield gray
    yield cv2.GaussianBlur(gray, (3, 3), 0)
    if min(gray.shape[:2]) >= 200:
        yield cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)


def read_codes(rgb: np.ndarray) -> list[Code]:
    """All QR codes and barcodes in an RGB uint8 photo, QR codes first."""
    if min(rgb.shape[:2]) < 21:  # smaller than the smallest QR code (21 modules); nothing to read
        return []
    gray = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
    return read_qr_codes(gray) + read_barcodes(gray)
