"""/v1/models: the served model, OpenAI-compatible (empty while it loads)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..deps import RuntimeDep, require_api_key
from ..schemas import ModelCard, ModelList

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("/v1/models", response_model=ModelList)
async def list_models(rt: RuntimeDep) -> ModelList:
    e = rt.engine
    cards = [ModelCard(id=e.name, created=e.created, quantized=e.quantized, can_see=e.can_see)] if e.loaded else []
    return ModelList(data=cards)
