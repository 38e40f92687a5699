"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import RuntimeDep, require_api_key

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Alive (answers even while the model is generating or loading)")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Ready: model, OCR and speech loaded (503 until then)")
async def readyz(rt: RuntimeDep) -> JSONResponse:
    body = {
        "ready": rt.ready,
        "model": rt.engine.name if rt.engine.loaded else None,
        "components": rt.components,
        "queue": {name: {"depth": lane.depth, "capacity": lane.capacity} for name, lane in rt.lanes.items()},
    }
    if rt.load_error:
        body["error"] = rt.load_error
    return JSONResponse(body, status_code=200 if rt.ready else 503)


@router.get("/metrics", summary="Prometheus text format", dependencies=[Depends(require_api_key)])
async def metrics(rt: RuntimeDep) -> Response:
    return Response(rt.metrics.render(rt.lanes), media_type=CONTENT_TYPE_LATEST)
