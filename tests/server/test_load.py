"""Behaviour under load: bounded queue with 503 + Retry-After, timeouts, cancellation, liveness, metrics, privacy."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from .helpers import png_bytes, render_text

QUESTION = "Why might someone have put this here?"  # neither a read request nor answered by the facts: the model must generate


@pytest.fixture(scope="module")
def small_png() -> bytes:
    return png_bytes(render_text(["Exit"], size=32))


def _metric(client: httpx.Client, name: str, labels: str = "") -> float:
    text = client.get("/metrics").text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _wait_idle(client: httpx.Client, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = httpx.get(str(client.base_url) + "/readyz").json()["queue"]
        if all(v["depth"] == 0 for v in q.values()):
            return q
        time.sleep(0.1)
    raise AssertionError(f"lanes still busy: {q}")


def test_32_concurrent_requests_queue_8_all_answered(tiny_server, small_png):
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tiny_server.url, headers=tiny_server.headers(), timeout=120) as ac:

            async def one(i: int) -> httpx.Response:
                return await ac.post("/v1/vqa", files={"image": ("e.png", small_png, "image/png")},
                                     data={"question": QUESTION, "max_tokens": "6"})  # fmt: skip

            return await asyncio.gather(*(one(i) for i in range(32)))

    t0 = time.monotonic()
    responses = asyncio.run(main())
    elapsed = time.monotonic() - t0
    codes = [r.status_code for r in responses]
    assert len(codes) == 32 and set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 9  # the running one plus a full queue of 8 got through
    assert codes.count(503) >= 1  # 32 at once cannot all fit
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["answer"]
    assert elapsed < 60
    with tiny_server.client() as c:
        _wait_idle(c)
        assert (
            _metric(c, "rpiq_rejected_total", '{lane="ocr"}') + _metric(c, "rpiq_rejected_total", '{lane="model"}') >= 1
        )


def test_healthz_answers_during_generation_and_timeout_frees_the_model(tiny_server, small_png):
    """A 400-token generation (~8 s at 20 ms/token) with a 4 s timeout: 504, and the model is free right after."""

    async def main():
        async with httpx.AsyncClient(base_url=tiny_server.url, headers=tiny_server.headers(), timeout=60) as ac:
            form = {"question": QUESTION, "max_tokens": "400", "timeout_s": "4"}
            slow = asyncio.ensure_future(
                ac.post("/v1/vqa", files={"image": ("e.png", small_png, "image/png")}, data=form)
            )
            for _ in range(60):  # wait until OCR is done and the model lane is busy generating
                await asyncio.sleep(0.05)
                if (await ac.get("/readyz")).json()["queue"]["model"]["depth"] == 1:
                    break
            health_times = []
            for _ in range(3):
                t = time.monotonic()
                h = await ac.get("/healthz")
                health_times.append(time.monotonic() - t)
                assert h.status_code == 200
            busy = (await ac.get("/readyz")).json()["queue"]["model"]["depth"]
            t0 = time.monotonic()
            r = await slow
            return r, health_times, busy, time.monotonic() - t0

    with tiny_server.client() as c:
        before = _metric(c, "rpiq_timeouts_total")
    r, health_times, busy, _ = asyncio.run(main())
    assert max(health_times) < 0.5, health_times
    assert busy == 1, (r.status_code, r.text[:300])  # /healthz was answered while the model was generating
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    with tiny_server.client() as c:
        t = time.monotonic()
        _wait_idle(c, timeout=3)  # generation stopped at the deadline, not after 400 tokens
        assert time.monotonic() - t < 3
        assert _metric(c, "rpiq_timeouts_total") >= before + 1


def test_client_disconnect_cancels_generation(tiny_server, small_png):
    with tiny_server.client() as c:
        before = _metric(c, "rpiq_cancelled_total")
        tokens_before = _metric(c, "rpiq_generated_tokens_total")
    with (
        httpx.Client(base_url=tiny_server.url, headers=tiny_server.headers(), timeout=30) as c,
        c.stream("POST", "/v1/vqa", files={"image": ("e.png", small_png, "image/png")},
                 data={"question": QUESTION, "max_tokens": "400", "stream": "true"}) as r,
    ):  # fmt: skip
        assert r.status_code == 200
        next(r.iter_lines())  # the stream has started: the model is generating
        time.sleep(0.5)
    # the connection is closed: within a few tokens the model lane must be free again
    with tiny_server.client() as c:
        _wait_idle(c, timeout=5)
        assert _metric(c, "rpiq_cancelled_total") >= before + 1
        assert _metric(c, "rpiq_generated_tokens_total") - tokens_before < 400


def test_non_streaming_disconnect_cancels_too(tiny_server, small_png):
    with tiny_server.client() as c:
        before = _metric(c, "rpiq_cancelled_total")
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=tiny_server.url, headers=tiny_server.headers(),
                                                       timeout=httpx.Timeout(10, read=1.5)) as c:  # fmt: skip
        c.post("/v1/vqa", files={"image": ("e.png", small_png, "image/png")},
               data={"question": QUESTION, "max_tokens": "400"})  # fmt: skip
    with tiny_server.client() as c:
        _wait_idle(c, timeout=5)
        assert _metric(c, "rpiq_cancelled_total") >= before + 1


def test_metrics_are_prometheus_text(tiny_server, small_png):
    with tiny_server.client() as c:
        c.post("/v1/vqa", files={"image": ("e.png", small_png, "image/png")},
               data={"question": QUESTION, "max_tokens": "4"})  # fmt: skip
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
    assert re.search(r'^rpiq_requests_total\{route="/v1/vqa",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^rpiq_request_seconds_bucket\{le="1.0",route="/v1/vqa"\} ', text, re.M)
    assert re.search(r'^rpiq_queue_depth\{lane="model"\} 0.0$', text, re.M)
    assert re.search(r"^rpiq_tokens_per_second [0-9.]+$", text, re.M)
    assert float(re.search(r"^rpiq_tokens_per_second ([0-9.e+-]+)$", text, re.M).group(1)) > 0
    assert re.search(r"^rpiq_generated_tokens_total [1-9]", text, re.M)
    assert "rpiq_time_to_first_audio_seconds_bucket" in text


def test_privacy_no_frames_or_answers_on_disk_or_in_logs(tiny_server):
    """Runs after the other tests on this server: its cwd and TMPDIR stay empty, its log has no content."""
    secrets = ("Fresh Milk", "Best before", "Describe the colours", "STOP HERE", "It says", "Audio saved")
    # onnxruntime writes one session-id file (a timestamp and a UUID) into TMPDIR; nothing else may appear.
    leftovers = [p for p in tiny_server.workdir.rglob("*") if p.is_file() and p.name != ".ses"]
    assert leftovers == [], leftovers
    for p in tiny_server.workdir.rglob("*"):
        if p.is_file():
            assert p.stat().st_size < 256 and not any(s.encode() in p.read_bytes() for s in secrets), p
    log = tiny_server.log()
    assert "Uvicorn running" in log  # the log is real
    for secret in secrets:
        assert secret not in log, secret
