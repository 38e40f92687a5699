"""`rpiq serve` on int4 vision-language checkpoints: /v1/vqa answers by looking at the photo.

One real server process per family (Idefics3/SmolVLM, Qwen2-VL, LLaVA, and the CogVLM2 stand-in as
remote code with RPIQ_TRUST_REMOTE_CODE), started in parallel on checkpoints quantized with image
calibration (`tests.vlm_checkpoints`). Random weights answer gibberish, so the tests check the HTTP
contract and that the model saw the image, not wording.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.vlm_checkpoints import SERVED, build

from .helpers import ServerProcess, data_uri, png_bytes, render_text

OCR_FAMILY = "idefics3"  # one server reads with the real OCR engine; the others skip it to start faster
FAMILIES = (*SERVED, "cogvlm2")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-srv")  # made here: mktemp is not thread-safe

    def start(family: str) -> ServerProcess:
        ckpt = build(family)
        env = {"RPIQ_THREADS": "1", "RPIQ_OCR_ENGINE": "rapidocr" if family == OCR_FAMILY else "none",
               "RPIQ_MAX_NEW_TOKENS": "16", "RPIQ_TRUST_REMOTE_CODE": str(family == "cogvlm2").lower()}  # fmt: skip
        return ServerProcess(str(ckpt.path), root / family, env=env).start()

    for family in FAMILIES:  # quantize here, one at a time: the builds share the process's torch threads
        build(family)
    with ThreadPoolExecutor(len(FAMILIES)) as pool:
        futures = {family: pool.submit(start, family) for family in FAMILIES}
    running = {family: f.result() for family, f in futures.items() if f.exception() is None}
    failed = [f.exception() for f in futures.values() if f.exception() is not None]
    if failed:  # stop the ones that did start before reporting the first failure
        for server in running.values():
            server.stop()
        raise failed[0]
    yield running
    for server in running.values():
        server.stop()


@pytest.fixture(scope="module")
def sign() -> str:
    return data_uri(png_bytes(render_text(["EXIT"], size=48)))


@pytest.mark.parametrize("family", FAMILIES)
def test_vqa_answers_with_the_vlm_looking_at_the_photo(servers, sign, family):
    server = servers[family]
    name = build(family).path.name
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["model"] == name
    assert ready["components"]["model"] == "ready (int4, sees images)"
    with server.client() as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card == {**card, "id": name, "quantized": True, "can_see": True}
        r = c.post("/v1/vqa", json={"image": sign, "question": "What is in front of me?", "max_tokens": 8})
        assert r.status_code == 200, r.text[:500]
        body = r.json()
        assert isinstance(body["answer"], str) and body["answer"]
        assert body["model"] == name  # which model answered
        assert body["model_can_see"] is True
        assert body["finish_reason"] in ("stop", "length")
        # The model generated the answer (no fixed "cannot see" reply): generation timings are reported.
        assert body["timings"]["generate_s"] > 0 and 1 <= body["timings"]["completion_tokens"] <= 8
        assert "cannot see" not in body["answer"]
        assert body["image"]["width"] > 0


def test_read_still_uses_ocr_and_chat_takes_a_photo(servers, sign):
    server = servers[OCR_FAMILY]
    name = build(OCR_FAMILY).path.name
    with server.client() as c:
        r = c.post("/v1/read", json={"image": sign})
        assert r.status_code == 200, r.text[:500]
        body = r.json()
        assert body["model"] == name and body["engine"] == "rapidocr"
        assert "EXIT" in body["text"].upper()
        r = c.post("/v1/vqa", json={"image": sign, "question": "What does the sign say?", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model_can_see"] is True
        assert "EXIT" in r.json()["text_in_image"].upper()  # OCR text is still given to the seeing model
        content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": sign}}]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 4})
        assert r.status_code == 200, r.text[:500]
        assert r.json()["model"] == name and 1 <= r.json()["usage"]["completion_tokens"] <= 4


def test_vqa_stream_reports_the_seeing_model(servers, sign):
    import json

    server = servers["llava"]
    with server.client() as c:
        r = c.post("/v1/vqa", json={"image": sign, "question": "What is this?", "max_tokens": 4, "stream": True})
        assert r.status_code == 200
    events = [blk for blk in r.text.split("\n\n") if blk.strip()]
    start = json.loads(events[0].split("data: ", 1)[1])
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert start["model"] == build("llava").path.name and start["model_can_see"] is True
    assert events[-1].startswith("event: done") and done["model"] == start["model"]
