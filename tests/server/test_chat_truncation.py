"""A conversation longer than the prompt budget keeps its system prompt and its last message, and the
answer says it was cut (`X-Rpiq-Prompt-Truncated`, or `prompt_truncated` in a stream's finish chunk)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from models.inference import fit_prompt
from server.app import create_app
from server.routers.chat import TRUNCATED_HEADER
from server.runtime import Runtime
from server.settings import ServerSettings

SYSTEM = "You are a careful assistant for blind users. SYSTEM-MARKER."
QUESTION = "What does the label say? FINAL-QUESTION"


def _conversation(turns: int, words: int = 60) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"turn {i} " + "filler " * words})
        msgs.append({"role": "assistant", "content": f"reply {i} " + "answer " * words})
    return [*msgs, {"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def _text(tok, ids) -> str:
    return tok.decode(ids[0])


def test_short_prompts_are_untouched(tok):
    ids, cut = fit_prompt(tok, _conversation(1), max_tokens=2048)
    assert not cut and "turn 0" in _text(tok, ids)


def test_oldest_turns_go_first_and_the_system_prompt_stays(tok):
    ids, cut = fit_prompt(tok, _conversation(12), max_tokens=400)
    text = _text(tok, ids)
    assert cut and ids.shape[1] <= 400
    assert "SYSTEM-MARKER" in text and "FINAL-QUESTION" in text
    assert "turn 0 " not in text and "turn 11 " in text  # the newest turns survive
    first_user = text.index("turn ")
    assert "reply" not in text[:first_user]  # no orphan assistant reply before the first kept user turn


def test_a_single_long_message_loses_its_middle(tok):
    long = "START-OF-TEXT " + "lorem ipsum " * 800 + QUESTION
    ids, cut = fit_prompt(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": long}],
                          max_tokens=256)  # fmt: skip
    text = _text(tok, ids)
    assert cut and ids.shape[1] <= 256
    assert "SYSTEM-MARKER" in text and "START-OF-TEXT" in text and "FINAL-QUESTION" in text and "[...]" in text


def test_raw_text_keeps_its_end(tok):
    ids, cut = fit_prompt(tok, "x " * 500 + "END", max_tokens=64)
    assert cut and ids.shape[1] == 64 and _text(tok, ids).endswith("END")


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    settings = ServerSettings(model=str(tiny_model_dir), max_prompt_tokens=400, ocr_engine="none", threads=1)
    rt = Runtime(settings)
    rt.engine.load()  # synchronously, without the app's lifespan (no OCR or speech needed for text chat)
    rt.ready = True
    yield TestClient(create_app(settings, rt))
    rt.shutdown()


def _chat(client, messages, **kw):
    return client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, **kw})


def test_chat_says_when_the_prompt_was_cut(client):
    r = _chat(client, _conversation(6))
    assert r.status_code == 200, r.text
    assert r.headers.get(TRUNCATED_HEADER) == "true"
    assert r.json()["usage"]["prompt_tokens"] <= 400


def test_chat_within_budget_has_no_truncation_header(client):
    r = _chat(client, [{"role": "user", "content": "Hi"}])
    assert r.status_code == 200, r.text
    assert TRUNCATED_HEADER not in r.headers


def test_stream_finish_chunk_says_truncated(client):
    r = _chat(client, _conversation(6), stream=True)
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    finish = [e for e in events if e.get("choices") and e["choices"][0].get("finish_reason")]
    assert finish and finish[-1].get("prompt_truncated") is True


def test_openapi_documents_the_header(client):
    spec = client.get("/openapi.json").json()
    ok = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    assert TRUNCATED_HEADER in ok["headers"]
