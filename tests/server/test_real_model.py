"""The real embedded model (SmolLM2-135M-Instruct) behind `rpiq serve` with no model argument."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from .helpers import cer, parse_wav, png_bytes, render_text, sse_events

pytestmark = pytest.mark.slow

PARAGRAPH = [
    "Take two tablets every morning with water.",
    "Do not exceed the stated dose.",
    "Keep out of the reach of children.",
]
PAGE = Path(__file__).resolve().parents[3] / "shared" / "data" / "images" / "page.png"
PAGE_TRUTH = """Region-based segmentation
Let us first determine markers of the coins and the
background. These markers are pixels that we can label
unambiguously as either object or background. Here,
the markers are found at the two extreme parts of the
histogram of grey values:"""


def test_read_rendered_text_cer(real_server, record_property):
    with real_server.client() as c:
        r = c.post("/v1/read", files={"image": ("p.png", png_bytes(render_text(PARAGRAPH, size=34)), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    rate = cer("\n".join(PARAGRAPH), body["text"])
    record_property("cer_rendered", rate)
    print(f"CER on rendered text: {rate:.4f}")
    assert rate < 0.03, body["text"]
    assert body["text"].splitlines()[0].startswith("Take two tablets")


@pytest.mark.skipif(not PAGE.is_file(), reason="../shared/data/images/page.png is not on this machine")
def test_read_photographed_page(real_server, record_property):
    with real_server.client() as c:
        r = c.post("/v1/read", files={"image": ("page.png", PAGE.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    text = r.json()["text"]
    rows = text.splitlines()
    assert rows[0] == "Region-based segmentation"
    rate = cer(PAGE_TRUTH, "\n".join(rows[: len(PAGE_TRUTH.splitlines())]))
    record_property("cer_page", rate)
    print(f"CER on page.png (first 6 lines): {rate:.4f}")
    assert rate < 0.05, text


def test_openai_client_gets_a_real_answer(real_server):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=real_server.url + "/v1", api_key="unused-on-loopback", max_retries=0)
    out = oc.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24
    )
    assert "Paris" in out.choices[0].message.content


def test_streamed_answer_speaks_early(real_server, record_property):
    sign = png_bytes(render_text(["PLATFORM 2", "Trains to Leeds"], size=44))
    with (
        real_server.client() as c,
        c.stream(
            "POST",
            "/v1/vqa",
            files={"image": ("s.png", sign, "image/png")},
            data={"question": "Where do trains from here go?", "stream": "true", "speak": "true", "max_tokens": "40"},
        ) as r,
    ):
        assert r.status_code == 200
        events = sse_events(r)
    done = events[-1][1]
    assert events[-1][0] == "done", events[-1]
    first_audio = done["timings"]["time_to_first_audio_s"]
    record_property("time_to_first_audio_s", first_audio)
    print(f"time to first audio: {first_audio:.2f} s, answer: {done['answer']!r}, timings: {done['timings']}")
    # Goal: under 2 s on an idle 2-core CPU, measured by benchmarks/serve.py, not here: a time bound in a
    # test fails whenever the suite shares the CPU (18 s at load average 5, over 30 s at 7). What a test
    # can check is the order: the first audio is ready before the answer is finished.
    assert 0 < first_audio <= done["timings"]["total_s"]
    audio = [d for k, d in events if k == "audio"]
    assert audio and parse_wav(base64.b64decode(audio[0]["base64"]))[2] > 0.2
