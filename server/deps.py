"""FastAPI dependencies shared by the routers: the runtime, the API key, readiness, content negotiation.

The assistive routers declare ``dependencies=[Depends(require_api_key), Depends(require_ready)]``
once, so a route body starts with its own work; a route that needs the runtime takes `RuntimeDep`.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError
from .runtime import Runtime

WAV_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")


def get_runtime(request: Request) -> Runtime:
    return request.app.state.rt


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
_bearer = HTTPBearer(auto_error=False, description="the server's API key (RPIQ_API_KEY), when one is set")


def require_api_key(
    rt: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Optional bearer-token auth for /v1/* and /metrics (health probes stay open for orchestrators)."""
    key = rt.settings.api_key
    if key is None:
        return
    token = credentials.credentials.strip() if credentials is not None else ""
    if not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "A valid 'Authorization: Bearer <API key>' header is required.",
                       {"WWW-Authenticate": "Bearer"})  # fmt: skip


def require_ready(rt: RuntimeDep) -> None:
    """503 until the model, OCR and speech are loaded (Retry-After while loading; the reason if it failed)."""
    if not rt.ready:
        if rt.load_error:
            raise ApiError(503, "model_failed", f"The model failed to load: {rt.load_error}")
        raise ApiError(503, "model_loading", "The model is still loading.", {"Retry-After": "5"})


def require_json(request: Request) -> None:
    """415 for a JSON route sent anything but JSON (FastAPI would answer a vague 422)."""
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise ApiError(415, "unsupported_content_type", "Send this request as application/json.")


def accepts_wav(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return any(t in accept for t in WAV_TYPES)


AcceptsWav = Annotated[bool, Depends(accepts_wav)]
