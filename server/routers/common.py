"""What the route modules share: the documented error responses, the image-route request body, WAV replies,
voices, timed speech."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from ..errors import ApiError
from ..runtime import RequestCtx, Runtime
from ..schemas import SpeechOptions
from ..settings import ServerSettings
from ..speech import Audio
from ..uploads import read_body

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
        503: "queue full or memory above the ceiling (both with Retry-After), model loading, speech unavailable",
        504: "request timed out before anything usable was made (a partial answer is a 200, finish_reason deadline)",
    }.items()
}


def body_limited(limit: Callable[[ServerSettings], int]) -> type[APIRoute]:
    """A route class whose request body is read with a byte limit first (413 ``body_too_large``
    beyond `limit(settings)`); FastAPI alone would read a typed body of any size."""

    class LimitedRequest(Request):
        async def body(self) -> bytes:
            if not hasattr(self, "_body"):
                self._body = await read_body(self, limit(self.app.state.rt.settings))
            return self._body

    class BodyLimitedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def limited(request: Request) -> Response:
                request = LimitedRequest(request.scope, request.receive)
                await request.body()  # here, so that its 413 is ours rather than FastAPI's parse error
                return await handler(request)

            return limited

    return BodyLimitedRoute


def wav_response(wav: bytes, text: str | None = None, extra: dict[str, str] | None = None) -> Response:
    headers = dict(extra or {})
    if text is not None:
        headers["X-Rpiq-Text"] = quote(text[:2000])  # percent-encoded: headers are latin-1 only
    return Response(content=wav, media_type="audio/wav", headers=headers)


def rounded(timings: dict) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in timings.items()}


async def speak_timed(
    rt: Runtime, ctx: RequestCtx, text: str, opts: SpeechOptions, timings: dict, voice: str | None = None
) -> Audio:
    """`text` spoken with `voice` (`speech_voice`'s choice; else the request's), the request's rate and
    volume; its time goes into `timings`."""
    t0 = time.perf_counter()
    audio = await rt.speech.speak(text, rate=opts.rate, voice=voice or opts.voice, volume=opts.volume,
                                  cancel=ctx.cancel, timeout=ctx.remaining())  # fmt: skip
    timings["speech_s"] = time.perf_counter() - t0
    return audio


def speech_voice(rt: Runtime, opts: SpeechOptions, wanted: bool, language: str | None = None) -> str | None:
    """Checked before any work, so a bad option never costs an OCR pass or a generation: a voice no
    espeak-ng voice matches is a 422 at once, and speech that is `wanted` but unavailable a 503 at once.
    The voice to speak with: the requested one; else one for the answer `language`; else None (the
    server default)."""
    status = rt.components.get("speech", "")
    if wanted and status.startswith("unavailable"):
        raise ApiError(503, "speech_unavailable", f"Speech is {status}.")
    if opts.voice:
        if rt.speech.voices:
            rt.speech.resolve_voice(opts.voice)  # 422 unknown_voice
        return opts.voice
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
