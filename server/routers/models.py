"""/v1/models (OpenAI-compatible) and /v1/voices (what /v1/speak's `voice` accepts)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..auth import require_api_key
from ..schemas import ModelCard, ModelList
from .common import runtime

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    rt = runtime(request)
    e = rt.engine
    cards = [ModelCard(id=e.name, created=e.created, quantized=e.quantized, can_see=e.can_see)] if e.loaded else []
    return ModelList(data=cards)


@router.get("/v1/voices", summary="espeak-ng voices for /v1/speak")
async def list_voices(request: Request) -> dict:
    rt = runtime(request)
    rt.require_ready()
    voices = [{"id": v.id, "name": v.name, "languages": list(v.languages)} for v in rt.speech.voices]
    return {"default": rt.settings.voice, "voices": voices}
