"""Small helpers the route modules share: runtime access, content negotiation, SSE framing, body docs."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from ..engine import GenParams
from ..errors import ApiError
from ..lanes import QueueFull
from ..runtime import RequestCtx, Runtime

WAV_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")
ERRORS = {
    code: {
        "description": text,
        "content": {"application/json": {"example": {"error": {"code": "...", "message": "..."}}}},
    }
    for code, text in {
        400: "bad input (corrupt or non-image upload, bad base64)",
        401: "missing or wrong API key",
        413: "upload too large (bytes or pixels)",
        415: "wrong content type or image format",
        422: "invalid or missing field, absurd max_tokens",
        503: "queue full (Retry-After) or model loading",
        504: "request timed out",
    }.items()
}


def runtime(request: Request) -> Runtime:
    return request.app.state.rt


def wants_wav(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return any(t in accept for t in WAV_TYPES)


def wav_response(wav: bytes, text: str | None = None, extra: dict[str, str] | None = None) -> Response:
    headers = dict(extra or {})
    if text is not None:
        headers["X-Rpiq-Text"] = quote(text[:2000])  # percent-encoded: headers are latin-1 only
    return Response(content=wav, media_type="audio/wav", headers=headers)


def sse(event: str | None, data: Any) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def queue_full(rt: Runtime, e: QueueFull) -> ApiError:
    rt.metrics.rejected.labels(e.lane).inc()
    return ApiError(503, "queue_full", f"The server is busy ({e.lane} queue full); retry in {e.retry_after} s.",
                    {"Retry-After": str(e.retry_after)})  # fmt: skip


def start_generation(
    rt: Runtime, ctx: RequestCtx, messages: list, params: GenParams, q: asyncio.Queue[tuple[str, str | None]]
) -> asyncio.Future:
    """Generate on the model lane for a streaming route: text arrives on `q` as ("delta", text) from the
    model thread, then ("end", None) once generation is over; a full lane is a 503 before anything streams."""
    loop = asyncio.get_running_loop()

    def on_text(text: str) -> None:  # called on the model thread
        loop.call_soon_threadsafe(q.put_nowait, ("delta", text))

    try:
        cfut = rt.model_lane.submit_sync(rt.engine.generate, messages, params, ctx.cancel, ctx.deadline, on_text,
                                         cancel=ctx.cancel)  # fmt: skip
    except QueueFull as e:
        raise queue_full(rt, e) from None
    future = asyncio.wrap_future(cfut)
    future.add_done_callback(lambda _f: q.put_nowait(("end", None)))
    return future


def pick_voice(rt: Runtime, voice: str | None, language: str | None) -> str | None:
    """The requested voice; else one for the answer language; else the server default."""
    if voice:
        return voice
    if language and rt.speech.voices:
        try:
            return rt.speech.resolve_voice(language)
        except ApiError:
            return None
    return None


def image_body(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict:
    """OpenAPI requestBody for routes taking an image as multipart or JSON (parsed by hand, see uploads.py)."""
    form = form_model.model_json_schema()
    form["properties"] = {"image": {"type": "string", "format": "binary", "description": "the photo"},
                          **form["properties"]}  # fmt: skip
    form["required"] = ["image", *form.get("required", [])]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form},
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }
