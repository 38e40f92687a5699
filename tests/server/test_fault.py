"""Faults under load: 16 concurrent clients mixing every photo route and speech with hostile uploads
against a real `rpiq serve` (tiny model, real OCR, perception and speech).

Whatever arrives, each request gets an answer a client can act on (2xx; 4xx saying what is wrong;
503 with Retry-After; 504), /healthz keeps answering, and the memory a burst of big photos took is
given back afterwards. No wall-clock budgets: a loaded machine may be slow, never wrong.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw, PngImagePlugin

from server.app import create_app
from server.memory import rss_bytes
from server.runtime import Runtime
from server.settings import ServerSettings
from tests.limits import generous

from .helpers import png_bytes, render_text
from .test_load import QUESTION, _wait_idle

CLIENTS = 16
ROUNDS = 3  # requests per client


def _big_png(width: int, height: int) -> bytes:
    """A mostly white photo of width x height pixels: a small file that decodes to a lot of memory."""
    img = Image.new("L", (width, height), 255)
    ImageDraw.Draw(img).rectangle((width // 4, height // 3, width // 2, height // 2), fill=0)
    return png_bytes(img)


def _text_bomb() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "A" * (8 << 20), zip=True)  # a few kB on the wire, 8 MB once inflated
    return png_bytes(Image.new("RGB", (64, 64), (20, 120, 200)), pnginfo=info)


@pytest.fixture(scope="module")
def uploads() -> dict[str, bytes]:
    good = png_bytes(render_text(["Platform 4", "Exit"], size=36))
    jpeg = png_bytes(render_text(["Fresh Milk"], size=36), "JPEG")
    return {
        "good": good,
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "one_byte": b"\x89",
        "text_bomb": _text_bomb(),
        "huge": _big_png(6000, 6000),  # 36 MP: under the pixel limit, decoded
        "too_many_pixels": _big_png(8000, 6000),  # 48 MP: refused from its header
    }


def _requests(uploads: dict[str, bytes]) -> list[tuple[str, dict]]:
    """(route, httpx keyword arguments): each image route with each upload, and speech."""
    out: list[tuple[str, dict]] = []
    for name, data in uploads.items():
        for route in ("/v1/read", "/v1/vqa", "/v1/scene"):
            fields = {"question": QUESTION, "max_tokens": "8"} if route == "/v1/vqa" else {}
            out.append((route, {"files": {"image": (f"{name}.png", data, "image/png")}, "data": fields}))
    out.append(("/v1/speak", {"json": {"text": "The next train leaves from platform four."}}))
    return out


def _acceptable(r: httpx.Response) -> bool:
    s = r.status_code
    return 200 <= s < 500 or s == 504 or (s == 503 and int(r.headers.get("retry-after", "0")) >= 1)


def _settled_rss(pid: int, ceiling: int | None = None) -> int:
    """The server's RSS once it stops falling (it gives memory back when a burst is over)."""
    deadline = time.monotonic() + generous(6)
    rss = rss_bytes(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_bytes(pid)
        if (ceiling is not None and now <= ceiling) or (ceiling is None and abs(now - rss) < 4 << 20):
            return now
        rss = now
    return rss_bytes(pid)


def test_burst_of_mixed_and_hostile_requests(tiny_server, uploads):
    pid = tiny_server.proc.pid
    todo = _requests(uploads)
    with tiny_server.client(timeout=generous(60)) as c:  # warm every route once: lazy loads are not a leak
        for route, kw in todo:
            c.post(route, **kw)
        _wait_idle(c, timeout=generous(20))
    before = _settled_rss(pid)

    async def main() -> tuple[list[httpx.Response], list[int]]:
        health: list[int] = []
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=tiny_server.url, headers=tiny_server.headers(),
                                     timeout=generous(120)) as ac:  # fmt: skip

            async def probe() -> None:
                while not done.is_set():
                    health.append((await ac.get("/healthz")).status_code)
                    await asyncio.sleep(0.2)

            async def client(i: int) -> list[httpx.Response]:
                picks = [todo[(i * ROUNDS + k) % len(todo)] for k in range(ROUNDS)]
                return [await ac.post(route, **kw) for route, kw in picks]

            prober = asyncio.ensure_future(probe())
            results = await asyncio.gather(*(client(i) for i in range(CLIENTS)))
            done.set()
            await prober
        return [r for rs in results for r in rs], health

    responses, health = asyncio.run(main())
    assert len(responses) == CLIENTS * ROUNDS
    bad = [(r.request.url.path, r.status_code, r.text[:200]) for r in responses if not _acceptable(r)]
    assert not bad, bad
    assert any(r.status_code == 200 for r in responses)
    assert {r.status_code for r in responses} & {400, 413}  # the hostile uploads were refused, not served
    assert health and set(health) == {200}, health
    with tiny_server.client() as c:
        _wait_idle(c, timeout=generous(20))
        assert c.get("/healthz").status_code == 200
    after = _settled_rss(pid, ceiling=int(before * 1.2))
    assert after <= before * 1.2, f"RSS {before >> 20} MB before the burst, {after >> 20} MB after"


def test_memory_ceiling_refuses_new_photos_with_retry_after(uploads):
    """Above max_rss_mb a photo request is refused before its photo is decoded (this process is far above 64 MB)."""
    settings = ServerSettings(max_rss_mb=64, ocr_engine="none")
    rt = Runtime(settings)
    rt.ready = True  # no lifespan: the refusal comes before any model or OCR work
    client = TestClient(create_app(settings, rt))
    try:
        r = client.post("/v1/scene", files={"image": ("good.png", uploads["good"], "image/png")})
        assert r.status_code == 503 and r.json()["error"]["code"] == "memory_full", r.text
        assert int(r.headers["retry-after"]) >= 1
        assert 'rpiq_rejected_total{lane="memory"} 1.0' in client.get("/metrics").text
    finally:
        rt.shutdown()
