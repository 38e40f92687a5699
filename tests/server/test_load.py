"""Behaviour under load: bounded queue with 503 + Retry-After, timeouts (answers stopped early at the deadline),
cancellation, liveness, metrics, privacy."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from models.inference import Generation
from server.app import create_app
from server.assist import STOPPED_EARLY
from server.engine import Engine
from server.routers.chat import FINISH_HEADER
from server.runtime import Runtime
from server.settings import ServerSettings
from server.speech import VoiceInfo
from server.vision import VLMDescriber

from .helpers import data_uri, png_bytes, render_text

# Neither a read request nor answered by the facts: the model must generate.
QUESTION = "Why might someone have put this here?"


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
    assert codes.count(200) >= 9  # a queue of 8 plus the photos being worked on got through
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
        # refused where the line was full: at the image gate (photos wait there, undecoded) or at a lane
        assert sum(_metric(c, "rpiq_rejected_total", f'{{lane="{lane}"}}') for lane in ("image", "ocr", "model")) >= 1


def test_healthz_answers_during_generation_and_timeout_frees_the_model(tiny_server, small_png):
    """A 400-token generation (~8 s at 20 ms/token) with a 4 s timeout: stopped at the deadline (504, or what it
    said in time), and the model is free right after."""

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
    if r.status_code == 200:  # grounded sentences made in time are the answer (random weights rarely make any)
        assert r.json()["finish_reason"] == "deadline" and r.json()["answer"].endswith(STOPPED_EARLY)
    else:
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


# --- a deadline stops generation early and says what it has (in-process, a scripted model) ----------------


class ScriptedEngine(Engine):
    """A model that says `script` one word every `delay` s and stops like the real engine does: at its
    cancel event or deadline, with finish reason "cancelled". Counts its calls."""

    def __init__(self) -> None:
        super().__init__(None, name="scripted")
        self.script, self.delay, self.calls = "", 0.0, 0

    def load(self) -> None:
        self.model, self.can_see = object(), True  # sees: its sentences are not filtered against OCR text

    def generate(self, messages, options, cancel, deadline=None, on_text=None) -> Generation:
        self.calls += 1
        t0, out, reason = time.perf_counter(), [], "stop"
        for word in self.script.split(" "):
            time.sleep(self.delay)
            if cancel.is_set() or (deadline is not None and time.monotonic() > deadline):
                reason = "cancelled"
                break
            out.append(word + " ")
            if on_text is not None:
                on_text(word + " ")
        return Generation("".join(out), 10, len(out), time.perf_counter() - t0, reason)


@pytest.fixture(scope="module")
def scripted():
    settings = ServerSettings(ocr_engine="none", threads=1, request_timeout_s=30)
    engine = ScriptedEngine()
    rt = Runtime(settings, engine=engine)
    engine.load()
    rt.describer = VLMDescriber(None, perceiver=None)  # no OCR, no perception: the photo goes to the model
    rt.ready = True  # no lifespan: nothing else loads
    yield TestClient(create_app(settings, rt)), engine, rt
    rt.shutdown()


SCRIPT = "The sign is red. It hangs above the door. " * 40  # ~20 s at 0.05 s a word


def _ask(client: TestClient, small_png: bytes, **fields):
    return client.post("/v1/vqa", files={"image": ("e.png", small_png, "image/png")},
                       data={"question": QUESTION, "timeout_s": "1.5", **fields})  # fmt: skip


def _timeouts(rt: Runtime) -> float:
    return rt.metrics.timeouts._value.get()


def test_deadline_answers_with_the_whole_sentences_made_in_time(scripted, small_png):
    client, engine, rt = scripted
    engine.script, engine.delay = SCRIPT, 0.05
    before = _timeouts(rt)
    r = _ask(client, small_png)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] == "deadline"
    assert body["answer"].startswith("The sign is red.") and body["answer"].endswith(STOPPED_EARLY)
    said = body["answer"].removesuffix(STOPPED_EARLY).strip()
    assert said.endswith("."), said  # a sentence cut mid-way is not said
    assert _timeouts(rt) == before + 1


def test_deadline_in_a_stream_ends_with_done_and_finish_reason_deadline(scripted, small_png):
    client, engine, _ = scripted
    engine.script, engine.delay = SCRIPT, 0.05
    r = _ask(client, small_png, stream="true")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    done = events[-1]
    assert done["finish_reason"] == "deadline" and done["answer"].endswith(STOPPED_EARLY), done
    assert "error" not in done


def test_deadline_with_nothing_usable_is_504(scripted, small_png):
    client, engine, rt = scripted
    engine.script, engine.delay = "and then " * 100, 0.05  # never ends a sentence
    before = _timeouts(rt)
    r = _ask(client, small_png)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert _timeouts(rt) == before + 1
    r = _ask(client, small_png, stream="true")
    assert '"code": "timeout"' in [line for line in r.text.splitlines() if line][-1]


def test_chat_deadline_keeps_openai_finish_reason_and_says_why(scripted):
    client, engine, rt = scripted
    engine.script, engine.delay = SCRIPT, 0.05
    rt.settings.request_timeout_s = 1.5  # chat has no timeout field: the server's own limit applies
    try:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello?"}]})
    finally:
        rt.settings.request_timeout_s = 30
    assert r.status_code == 200, r.text
    assert r.headers[FINISH_HEADER] == "deadline"
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].endswith(STOPPED_EARLY)


def test_options_are_checked_before_the_photo_or_the_model(scripted, small_png):
    """A bad voice was a 504 after a whole generation; now a 422 before anything runs."""
    client, engine, rt = scripted
    engine.script, engine.delay, engine.calls = SCRIPT, 0.05, 0
    rt.speech.voices = [VoiceInfo("gmw/en", "English", ("en",))]  # as after the speech engine's warm-up
    try:
        for route in ("/v1/vqa", "/v1/scene"):
            r = client.post(route, files={"image": ("e.png", small_png, "image/png")},
                            data={"question": QUESTION, "voice": "klingon-xx", "speak": "true"})  # fmt: skip
            assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_voice", (route, r.text)
        r = client.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(small_png)}}]},
            {"role": "assistant", "content": "It is a sign."}]})  # fmt: skip
        assert r.status_code == 422 and "last message" in r.json()["error"]["message"]
    finally:
        rt.speech.voices = []
    assert engine.calls == 0 and rt.image_gate.depth == 0
