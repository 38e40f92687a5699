"""/v1/speak: text -> WAV for screen readers (rate, voice, volume); /v1/voices: what `voice` accepts."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..deps import RuntimeDep, require_api_key, require_json, require_ready
from ..errors import ApiError
from ..schemas import SpeakRequest, VoiceList
from ..settings import ServerSettings
from .common import ERRORS, body_limited, wav_response


def max_body_bytes(settings: ServerSettings) -> int:
    return 4 * settings.max_text_chars + 4096


router = APIRouter(
    tags=["speech"],
    dependencies=[Depends(require_api_key), Depends(require_ready)],
    route_class=body_limited(max_body_bytes),
)


@router.post(
    "/v1/speak",
    response_class=Response,
    responses={200: {"content": {"audio/wav": {}}, "description": "16-bit mono WAV"}, **ERRORS},
    dependencies=[Depends(require_json)],
    summary="Speak a text",
)
async def speak(req: SpeakRequest, rt: RuntimeDep, request: Request) -> Response:
    if len(req.text) > rt.settings.max_text_chars:
        raise ApiError(
            413, "text_too_long", f"text is {len(req.text)} characters; the limit is {rt.settings.max_text_chars}."
        )
    ctx = rt.context(None)
    work = rt.speech.speak(req.text, rate=req.rate, voice=req.voice, volume=req.volume, cancel=ctx.cancel,
                           timeout=ctx.remaining())  # fmt: skip
    audio = await rt.guard(request, ctx, work)
    return wav_response(audio.wav, extra={"X-Rpiq-Voice": audio.voice, "X-Rpiq-Duration": f"{audio.duration_s:.3f}"})


@router.get("/v1/voices", response_model=VoiceList, summary="espeak-ng voices for /v1/speak")
async def list_voices(rt: RuntimeDep) -> VoiceList:
    voices = [{"id": v.id, "name": v.name, "languages": list(v.languages)} for v in rt.speech.voices]
    return VoiceList(default=rt.settings.voice, voices=voices)
