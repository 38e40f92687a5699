"""Hostile and broken uploads: every decoder failure is a 4xx JSON error with a stable code, never a 500.

In-process (FastAPI's TestClient, no model loaded): the routes decode the upload before any model work,
so a runtime marked ready is enough to see each error exactly as a client would.
"""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from server.app import create_app
from server.images import ImageLimits, decode_image
from server.reading import Reader
from server.runtime import Runtime
from server.settings import ServerSettings

from .helpers import png_bytes


class NoText:
    name = "none"

    def recognize(self, img: Image.Image) -> list:
        return []


@pytest.fixture(scope="module")
def client():
    settings = ServerSettings(max_pixels=30_000_000, image_formats=["JPEG", "PNG"], ocr_engine="none")
    rt = Runtime(settings)
    rt.reader = Reader(NoText(), rt.ocr_lane, rt.engine, None)
    rt.ready = True  # the lifespan (model loading) never runs: these requests fail before any model work
    # Not entered as a context manager: the lifespan (background model loading) must not start.
    yield TestClient(create_app(settings, rt), raise_server_exceptions=False)
    rt.shutdown()


def _post(client: TestClient, data: bytes, route: str = "/v1/read", name: str = "photo.png"):
    fields = {"question": "What is this?"} if route == "/v1/vqa" else {}
    return client.post(route, files={"image": (name, data, "application/octet-stream")}, data=fields)


def _error(r) -> str:
    return r.json()["error"]["code"]


def _png_with_text_chunk(nbytes: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "A" * nbytes, zip=True)  # zTXt: compresses ~1000:1
    return png_bytes(Image.new("RGB", (32, 32), (20, 120, 200)), pnginfo=info)


def _jpeg(size: tuple[int, int], **kw) -> bytes:
    return png_bytes(Image.new("RGB", size, (90, 160, 30)), "JPEG", **kw)


def test_png_with_a_huge_compressed_text_chunk_is_413(client):
    data = _png_with_text_chunk(20 * 2**20)
    assert len(data) < 64 * 1024
    r = _post(client, data)
    assert r.status_code == 413, r.text
    assert _error(r) == "image_metadata_too_large"


def test_png_with_a_huge_icc_profile_is_413(client):
    data = png_bytes(Image.new("RGB", (16, 16)), icc_profile=b"\0" * (20 * 2**20))
    r = _post(client, data)
    assert (r.status_code, _error(r)) == (413, "image_metadata_too_large")


def test_truncated_jpeg_is_400_corrupt(client):
    data = _jpeg((400, 300))
    r = _post(client, data[: len(data) // 2], name="photo.jpg")
    assert (r.status_code, _error(r)) == (400, "corrupt_image")


@pytest.mark.parametrize("data", [b"\x89", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"garbage" * 100])
def test_tiny_or_garbage_files_are_400(client, data):
    r = _post(client, data)
    assert r.status_code == 400, r.text
    assert _error(r) in {"not_an_image", "corrupt_image"}


def test_one_byte_file_is_not_an_image(client):
    r = _post(client, b"x")
    assert (r.status_code, _error(r)) == (400, "not_an_image")


def test_png_bomb_is_refused_from_its_header(client):
    data = png_bytes(Image.new("L", (6000, 6000), 0))  # 36 M pixels in a few kB
    assert len(data) < 100_000
    r = _post(client, data)
    assert (r.status_code, _error(r)) == (413, "too_many_pixels")


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_formats_outside_the_list_are_415(client, fmt):
    r = _post(client, png_bytes(Image.new("RGB", (8, 8)), fmt))
    assert (r.status_code, _error(r)) == (415, "unsupported_image_format")


def test_errors_are_json_on_the_vqa_route_too(client):
    r = _post(client, _png_with_text_chunk(20 * 2**20), route="/v1/vqa")
    assert (r.status_code, _error(r)) == (413, "image_metadata_too_large")


LIMITS = ImageLimits(max_bytes=12 * 2**20, max_pixels=40_000_000, formats=("JPEG", "PNG", "MPO"), max_side=1024)


def test_big_jpeg_is_decoded_at_reduced_scale():
    img = decode_image(_jpeg((5000, 3000), quality=50), LIMITS)
    assert img.size == (625, 375) and img.mode == "RGB"  # 1/8 scale: the longest side stays >= max_side / 2


def test_jpeg_above_the_pixel_limit_is_accepted_when_its_reduced_decode_fits():
    limits = ImageLimits(12 * 2**20, 2_000_000, ("JPEG",), max_side=1024)
    assert decode_image(_jpeg((3000, 2000)), limits).size == (750, 500)  # 6 M pixels in the header, decoded at 1/4
    with pytest.raises(Exception) as e:
        decode_image(png_bytes(Image.new("RGB", (3000, 2000))), ImageLimits(12 * 2**20, 2_000_000, ("PNG",)))
    assert e.value.code == "too_many_pixels"


def test_large_png_within_limits_is_downscaled():
    img = decode_image(png_bytes(Image.new("RGBA", (2048, 1024), (0, 0, 0, 0))), LIMITS)
    assert img.size == (1024, 512) and img.mode == "RGB"


def test_small_images_are_untouched():
    img = decode_image(_jpeg((640, 480)), LIMITS)
    assert img.size == (640, 480)


def test_decoder_errors_never_escape_as_other_exceptions():
    from server.errors import ApiError

    for data in (_jpeg((64, 64))[:200], b"BM" + b"\xff" * 60, io.BytesIO(b"\x89PNG").getvalue()):
        with pytest.raises(ApiError) as e:
            decode_image(data, ImageLimits(2**20, 10**6, ("JPEG", "PNG", "BMP")))
        assert 400 <= e.value.status < 500
