"""Validating untrusted uploads and measuring simple, real facts about a photo.

Why so strict: images come from phones over the network. A decompression bomb (a small PNG that
claims 100k x 100k pixels) must be refused before any pixel is decoded; a truncated JPEG must give
a clear 400, not a half-grey image that the model then "describes"; a phone's portrait photo must be
turned upright (EXIF orientation) before OCR, or nothing gets read.

The facts (brightness, contrast, sharpness) are what a text-only model can honestly say about a
photo, and they let any model tell a blind user to retake a photo instead of guessing.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ApiError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, never silently padded

DARK_BELOW = 45.0  # mean luminance 0..255
BRIGHT_ABOVE = 235.0
LOW_CONTRAST_BELOW = 12.0  # luminance standard deviation
BLURRY_BELOW = 30.0  # variance of the Laplacian at 512 px long side


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int  # decoded width x height; a JPEG counts at its reduced decoding size
    formats: tuple[str, ...]
    max_side: int = 4096  # the longest side kept: larger photos are downscaled (JPEGs while decoding)


DRAFT_FORMATS = ("JPEG", "MPO")  # libjpeg decodes these at 1/2, 1/4 or 1/8 scale for almost nothing
_METADATA_TOO_LARGE = re.compile(r"MAX_TEXT|too much memory|too large", re.I)  # Pillow's chunk-limit ValueErrors


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Bytes from the network -> an upright RGB image no larger than `limits.max_side`, or an `ApiError`
    (always 4xx) saying exactly what is wrong: every decoder failure is the upload's fault."""
    if not data:
        raise ApiError(400, "empty_image", "The image upload is empty.")
    if len(data) > limits.max_bytes:
        raise ApiError(413, "image_too_large", f"The image is {len(data)} bytes; the limit is {limits.max_bytes}.")
    try:
        return _decode(data, limits)
    except ApiError:
        raise
    except Exception as e:  # a hostile file can make a decoder raise anything
        raise _decoder_error(e, limits) from None


def _decode(data: bytes, limits: ImageLimits) -> Image.Image:
    # open() reads only the header (and metadata chunks before the pixels): size and format are known
    # before any pixel is decoded.
    img = Image.open(io.BytesIO(data))
    if img.format not in limits.formats:
        raise ApiError(
            415,
            "unsupported_image_format",
            f"{img.format} images are not accepted; use one of {', '.join(limits.formats)}.",
        )
    w, h = img.size
    if w < 1 or h < 1:
        raise ApiError(400, "corrupt_image", "The image has no pixels.")
    if img.format in DRAFT_FORMATS and max(w, h) > limits.max_side:
        # Decode a big photo at a reduced scale (longest side still >= max_side / 2): a 48 MP phone photo
        # costs a quarter of its pixels in memory and time, and nothing the OCR or the models could use.
        scale = limits.max_side / 2 / max(w, h)
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    dw, dh = img.size  # after draft(): the size that will be decoded
    if dw * dh > limits.max_pixels:
        raise ApiError(413, "too_many_pixels", f"The image is {w}x{h} pixels; the limit is {limits.max_pixels} pixels.")
    img.load()
    img = to_rgb(ImageOps.exif_transpose(img))  # phones store portrait photos sideways plus an orientation tag
    if max(img.size) > limits.max_side:
        img.thumbnail((limits.max_side, limits.max_side), Image.BILINEAR)
    return img


def _decoder_error(e: Exception, limits: ImageLimits) -> ApiError:
    """The 4xx for an exception Pillow raised while reading an upload."""
    if isinstance(e, UnidentifiedImageError):
        return ApiError(400, "not_an_image", "The upload is not an image Pillow can recognise.")
    if isinstance(e, (Image.DecompressionBombError, MemoryError)):
        return ApiError(413, "too_many_pixels", f"The image has more than {limits.max_pixels} pixels.")
    if isinstance(e, ValueError) and _METADATA_TOO_LARGE.search(str(e)):
        return ApiError(413, "image_metadata_too_large",
                        f"The image carries oversized metadata (text, ICC or EXIF chunks): {e}")  # fmt: skip
    return ApiError(400, "corrupt_image", f"The image is truncated or corrupt: {type(e).__name__}: {e}")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency flattened onto white (labels and screenshots are often RGBA)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        span = max(float(arr.max() - arr.min()), 1.0)
        img = Image.fromarray(((arr - arr.min()) * (255.0 / span)).astype(np.uint8))
    return img.convert("RGB")


@dataclass
class ImageFacts:
    """Measured, not guessed: what the server can truthfully say about a photo without vision."""

    width: int
    height: int
    brightness: float
    contrast: float
    sharpness: float
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("brightness", "contrast", "sharpness"):
            d[k] = round(d[k], 1)
        return d

    def sentences(self) -> list[str]:
        """The warnings as short sentences for the user, most important first."""
        text = {
            "dark": "The photo is very dark.",
            "overexposed": "The photo is very bright, almost white.",
            "low_contrast": "The photo has almost no contrast.",
            "blurry": "The photo is blurry.",
        }
        return [text[w] for w in self.warnings]


def measure(img: Image.Image) -> ImageFacts:
    """Brightness, contrast and sharpness (variance of the Laplacian) on a 512 px working copy."""
    gray = img.convert("L")
    scale = 512 / max(gray.size)
    if scale < 1:
        gray = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))), Image.BILINEAR)
    a = np.asarray(gray, dtype=np.float32)
    brightness, contrast = float(a.mean()), float(a.std())
    if min(a.shape) >= 3:
        lap = -4 * a[1:-1, 1:-1] + a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:]
        sharpness = float(lap.var())
    else:
        sharpness = 0.0
    warnings = []
    if brightness < DARK_BELOW:
        warnings.append("dark")
    elif brightness > BRIGHT_ABOVE and contrast < 2 * LOW_CONTRAST_BELOW:
        warnings.append("overexposed")
    if contrast < LOW_CONTRAST_BELOW:
        warnings.append("low_contrast")
    elif sharpness < BLURRY_BELOW:
        warnings.append("blurry")
    return ImageFacts(img.width, img.height, brightness, contrast, sharpness, warnings)
