"""Every endpoint of a real `rpiq serve` process over HTTP (tiny random-weight model, real OCR and speech)."""

from __future__ import annotations

import base64
import io
import json
import re

import httpx
import pytest
from PIL import Image

from .conftest import API_KEY
from .helpers import cer, data_uri, parse_wav, png_bytes, render_text, sse_events

SIGN = ["Fresh Milk", "Best before 12 May"]


@pytest.fixture(scope="module")
def sign_png() -> bytes:
    return png_bytes(render_text(SIGN, size=40))


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["message"]
    return err


# --- health, models, docs --------------------------------------------------------------------------------


def test_health_ready_models_and_openapi(tiny_server, client):
    assert httpx.get(tiny_server.url + "/healthz").json() == {"status": "ok"}  # no key needed
    ready = httpx.get(tiny_server.url + "/readyz").json()
    assert ready["ready"] is True
    assert ready["components"]["model"].startswith("ready")
    assert ready["components"]["ocr"] == "ready (rapidocr)"
    assert ready["components"]["speech"] == "ready (espeak-ng)"
    assert ready["queue"]["model"]["capacity"] == 9  # queue 8 + the running one
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-llama"
    assert models["data"][0]["can_see"] is False
    spec = client.get("/openapi.json").json()
    paths = ("/v1/vqa", "/v1/scene", "/v1/read", "/v1/speak", "/v1/chat/completions", "/healthz", "/readyz", "/metrics")
    for path in paths:
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/vqa"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert "question" in body["multipart/form-data"]["schema"]["properties"]
    assert body["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"


# --- auth ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_api_key_is_required(tiny_server, headers):
    r = httpx.post(tiny_server.url + "/v1/speak", json={"text": "hi"}, headers=headers)
    _error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    _error(httpx.get(tiny_server.url + "/metrics", headers=headers), 401, "unauthorized")


# --- speech ------------------------------------------------------------------------------------------------


def test_speak_returns_a_real_wav(client):
    r = client.post("/v1/speak", json={"text": "The bus to the station leaves at nine."})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    channels, rate, duration = parse_wav(r.content)
    assert channels == 1 and rate == 22050
    assert 1.0 < duration < 10.0
    assert float(r.headers["x-rpiq-duration"]) == pytest.approx(duration, abs=0.01)


def test_speak_rate_voice_volume_change_the_audio(client):
    text = "Please read this sentence at two different speeds."
    slow = parse_wav(client.post("/v1/speak", json={"text": text, "rate": 100}).content)[2]
    fast = parse_wav(client.post("/v1/speak", json={"text": text, "rate": 300}).content)[2]
    assert slow > 1.8 * fast
    fr = client.post("/v1/speak", json={"text": "Bonjour, comment allez-vous ?", "voice": "fr"})
    assert fr.status_code == 200 and "fr" in fr.headers["x-rpiq-voice"]
    import array

    def peak(data: bytes) -> int:
        with __import__("wave").open(io.BytesIO(data)) as w:
            return max(abs(x) for x in array.array("h", w.readframes(w.getnframes())))

    loud = peak(client.post("/v1/speak", json={"text": text, "volume": 1.0}).content)
    quiet = peak(client.post("/v1/speak", json={"text": text, "volume": 0.2}).content)
    assert quiet < 0.5 * loud


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"text": "hi", "voice": "klingon-xx"}}, 422, "unknown_voice"),
        ({"json": {"text": "hi", "rate": 5000}}, 422, "invalid_request"),
        ({"json": {"rate": 100}}, 422, "missing_text"),
        ({"json": {"text": ""}}, 422, "invalid_request"),
        ({"json": {"text": "  \n "}}, 422, "empty_text"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_content_type"),
        ({"json": {"text": "word " * 2000}}, 413, "text_too_long"),
    ],
)
def test_speak_errors(client, kwargs, status, code):
    _error(client.post("/v1/speak", **kwargs), status, code)


@pytest.mark.parametrize("route", ["/v1/vqa", "/v1/read", "/v1/scene"])
def test_a_bad_voice_is_422_before_the_photo_is_read(client, sign_png, route):
    """Options are checked before OCR, perception or generation (a bad voice was a 504 after a generation)."""
    tokens = lambda: re.search(r"^rpiq_generated_tokens_total (\S+)$", client.get("/metrics").text, re.M).group(1)  # noqa: E731
    before = tokens()
    r = client.post(route, files={"image": ("sign.png", sign_png, "image/png")},
                    data={"question": "Why might this be here?", "voice": "klingon-xx", "speak": "true",
                          "max_tokens": "400"})  # fmt: skip
    _error(r, 422, "unknown_voice")
    assert "ocr_s" not in r.text and tokens() == before


# --- /v1/read --------------------------------------------------------------------------------------------


def test_read_rendered_sign(client, sign_png):
    r = client.post("/v1/read", files={"image": ("sign.png", sign_png, "image/png")}, data={"speak": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert cer("\n".join(SIGN), body["text"]) < 0.1, body["text"]
    assert body["engine"] == "rapidocr" and len(body["text"].splitlines()) == 2
    tops = [line["box"][1] for line in body["lines"]]
    assert tops[0] < tops[-1]  # reading order: top row first (a row may come as several boxes)
    # The clean-up may only change whitespace: it never invents or drops a letter.
    raw = "".join("".join(line["text"] for line in body["lines"]).split())
    assert "".join(body["text"].split()) == raw
    assert parse_wav(base64.b64decode(body["audio"]["base64"]))[2] > 0.5


def test_read_json_and_wav(client, sign_png):
    r = client.post("/v1/read", json={"image": base64.b64encode(sign_png).decode()})
    assert r.status_code == 200 and "Milk" in r.json()["text"]
    wav = client.post("/v1/read", json={"image": data_uri(sign_png)}, headers={"Accept": "audio/wav"})
    assert wav.headers["content-type"] == "audio/wav" and parse_wav(wav.content)[2] > 0.5
    assert "Milk" in httpx.URL("?t=" + wav.headers["x-rpiq-text"]).params["t"]


def test_exif_orientation_is_applied(client):
    """A phone stores a portrait photo sideways plus an orientation tag; it must be read upright."""
    upright = render_text(["STOP HERE"], size=48)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged = png_bytes(stored, "JPEG", exif=exif.tobytes(), quality=95)
    untagged = png_bytes(stored, "JPEG", quality=95)
    r = client.post("/v1/read", files={"image": ("p.jpg", tagged, "image/jpeg")}).json()
    assert (r["image"]["width"], r["image"]["height"]) == upright.size
    assert "STOP" in r["text"] and "HERE" in r["text"]
    r2 = client.post("/v1/read", files={"image": ("p.jpg", untagged, "image/jpeg")}).json()
    assert (r2["image"]["width"], r2["image"]["height"]) == stored.size  # no tag: left as stored


# --- /v1/vqa ---------------------------------------------------------------------------------------------


def test_vqa_read_question_answers_with_the_text_verbatim(client, sign_png):
    files = {"image": ("s.png", sign_png, "image/png")}
    r = client.post("/v1/vqa", files=files, data={"question": "What does it say?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"].startswith("It says:")
    assert "Fresh Milk" in body["answer"] and "12 May" in body["answer"]
    assert body["model"] == "tiny-llama" and body["model_can_see"] is False
    assert body["audio"] is None and body["timings"]["total_s"] > 0


def test_vqa_json_speak_and_model_answer(client, sign_png):
    r = client.post(
        "/v1/vqa",
        json={"image": data_uri(sign_png), "question": "Is it still good to drink?", "speak": True, "max_tokens": 12},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"]  # the random model's words are filtered to what is grounded, else the facts are read
    assert body["text_in_image"].startswith("Fresh Milk")
    assert body["timings"]["completion_tokens"] >= 1
    assert parse_wav(base64.b64decode(body["audio"]["base64"]))[2] > 0.3


def test_vqa_accept_wav(client, sign_png):
    r = client.post(
        "/v1/vqa",
        files={"image": ("s.png", sign_png, "image/png")},
        data={"question": "read it"},
        headers={"Accept": "audio/wav"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert parse_wav(r.content)[2] > 0.5


def test_vqa_dark_photo_says_so_first_and_does_not_guess(client):
    dark = png_bytes(Image.new("RGB", (320, 240), (8, 8, 10)))
    r = client.post("/v1/vqa", files={"image": ("d.png", dark, "image/png")}, data={"question": "What is this?"})
    body = r.json()
    assert body["answer"].startswith("The photo is very dark.")
    assert "can't make out" in body["answer"] and "cannot see" not in body["answer"]  # said plainly, from the facts
    assert "dark" in body["image"]["warnings"]
    assert "completion_tokens" not in body["timings"]  # the model was not asked to make something up


def test_vqa_stream_speaks_sentence_by_sentence(client, sign_png):
    with client.stream(
        "POST",
        "/v1/vqa",
        files={"image": ("s.png", sign_png, "image/png")},
        data={"question": "What does the label say?", "stream": "true", "speak": "true"},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "delta" in kinds and "audio" in kinds
    audio = [d for k, d in events if k == "audio"]
    assert [a["index"] for a in audio] == list(range(len(audio)))
    assert all(parse_wav(base64.b64decode(a["base64"]))[2] > 0 for a in audio)
    done = events[-1][1]
    assert "Fresh Milk" in done["answer"]
    assert 0 < done["timings"]["time_to_first_audio_s"] <= done["timings"]["total_s"]


# --- bad input -----------------------------------------------------------------------------------------


def _post_image(client, data: bytes, question: str | None = "What is it?", name="x.png", mime="image/png"):
    form = {"question": question} if question is not None else {}
    return client.post("/v1/vqa", files={"image": (name, data, mime)}, data=form)


def test_bad_uploads(client, sign_png):
    _error(_post_image(client, sign_png[: len(sign_png) // 2]), 400, "corrupt_image")
    _error(_post_image(client, b"this is not an image at all", name="x.txt", mime="text/plain"), 400, "not_an_image")
    _error(_post_image(client, b""), 400, "empty_image")
    _error(_post_image(client, sign_png, question=None), 422, "missing_question")
    _error(_post_image(client, sign_png, question=""), 422, "invalid_request")
    ico = png_bytes(Image.new("RGB", (32, 32), (200, 0, 0)), "ICO")
    _error(_post_image(client, ico, name="x.ico", mime="image/x-icon"), 415, "unsupported_image_format")
    _error(client.post("/v1/vqa", files={"other": ("a", b"x")}, data={"question": "hi"}), 422, "missing_image")


def test_limits(client, sign_png):
    big = png_bytes(Image.effect_noise((1200, 1200), 100).convert("RGB"))  # incompressible: ~4 MB
    assert len(big) > 2 * 2**20
    _error(_post_image(client, big), 413, "body_too_large")
    bomb = png_bytes(Image.new("1", (12000, 12000)))  # 144 Mpx in a few kB
    assert len(bomb) < 100_000
    _error(_post_image(client, bomb), 413, "too_many_pixels")
    r = client.post("/v1/vqa", json={"image": data_uri(sign_png), "question": "x", "max_tokens": 10**9})
    _error(r, 422, "max_tokens_too_large")
    _error(client.post("/v1/vqa", json={"image": "@@@not base64@@@", "question": "x"}), 400, "bad_base64")
    _error(client.post("/v1/vqa", json={"image": "https://example.com/a.png", "question": "x"}), 400, "remote_image")
    _error(client.post("/v1/vqa", json={"question": "x"}), 422, "missing_image")
    _error(client.post("/v1/vqa", content=b"{not json", headers={"content-type": "application/json"}), 400, "bad_json")
    r = client.post("/v1/vqa", content=b"q=1", headers={"content-type": "text/plain"})
    _error(r, 415, "unsupported_content_type")
    _error(client.post("/v1/vqa", json={"image": data_uri(sign_png), "question": "x", "language": "12"}), 422,
           "invalid_request")  # fmt: skip


# --- OpenAI-compatible chat -----------------------------------------------------------------------------


def test_chat_completion_plain_and_with_image(client, sign_png):
    r = client.post("/v1/chat/completions", json={"model": "anything", "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": "Hello"}]})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-llama"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    msg = [{"role": "user", "content": [{"type": "text", "text": "What is on this?"},
                                        {"type": "image_url", "image_url": {"url": data_uri(sign_png)}}]}]  # fmt: skip
    r = client.post("/v1/chat/completions", json={"messages": msg, "max_tokens": 8})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_chat_stream_sse(client):
    chunks = []
    with client.stream("POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 10, "stream": True,
        "stream_options": {"include_usage": True},
    }) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(p["object"] == "chat.completion.chunk" for p in parsed)
    assert parsed[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert parsed[-1]["usage"]["completion_tokens"] >= 1
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in parsed if p["choices"])
    assert text


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"messages": []}, 422, "invalid_request"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 422, "invalid_request"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 422, "max_tokens_too_large"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         400, "remote_image"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 422, "invalid_request"),
    ],
)  # fmt: skip
def test_chat_errors(client, payload, status, code):
    _error(client.post("/v1/chat/completions", json=payload), status, code)


def test_openai_client_compatibility(tiny_server, sign_png):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in oc.models.list()] == ["tiny-llama"]
    out = oc.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=6)
    assert out.choices[0].message.content is not None and out.usage.completion_tokens >= 1
    stream = oc.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Read this"},
                                               {"type": "image_url", "image_url": {"url": data_uri(sign_png)}}]}],
        max_tokens=6, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.UnprocessableEntityError):
        oc.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=10**6)
