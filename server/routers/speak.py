"""/v1/speak: text -> WAV for screen readers (rate, voice, volume)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..auth import require_api_key
from ..errors import ApiError
from ..runtime import ClientGone
from ..schemas import SpeakRequest
from ..uploads import read_body
from .common import ERRORS, runtime, wav_response

router = APIRouter(tags=["speech"], dependencies=[Depends(require_api_key)])


@router.post(
    "/v1/speak",
    response_class=Response,
    responses={200: {"content": {"audio/wav": {}}, "description": "16-bit mono WAV"}, **ERRORS},
    openapi_extra={"requestBody": {"required": True,
                                   "content": {"application/json": {"schema": SpeakRequest.model_json_schema()}}}},
)  # fmt: skip
async def speak(request: Request) -> Response:
    rt = runtime(request)
    rt.require_ready()
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith("application/json"):
        raise ApiError(415, "unsupported_content_type", 'Send JSON: {"text": ..., "rate"?, "voice"?, "volume"?}.')
    body = await read_body(request, 4 * rt.settings.max_text_chars + 4096)
    try:
        req = SpeakRequest.model_validate_json(body)
    except ValueError as e:
        missing = '"text"' not in body.decode("utf-8", "replace")
        code = "missing_text" if missing else "invalid_request"
        raise ApiError(422, code, str(e).splitlines()[0] if not missing else "'text' is required.") from None
    if len(req.text) > rt.settings.max_text_chars:
        raise ApiError(
            413, "text_too_long", f"text is {len(req.text)} characters; the limit is {rt.settings.max_text_chars}."
        )
    ctx = rt.context(None)
    work = rt.speech.speak(req.text, rate=req.rate, voice=req.voice, volume=req.volume, cancel=ctx.cancel,
                           timeout=ctx.remaining())  # fmt: skip
    try:
        audio = await rt.guard(request, ctx, work)
    except ClientGone:
        return Response(status_code=499)
    return wav_response(audio.wav, extra={"X-Rpiq-Voice": audio.voice, "X-Rpiq-Duration": f"{audio.duration_s:.3f}"})
