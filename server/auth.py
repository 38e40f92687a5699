"""Optional bearer-token auth for /v1/* and /metrics (health probes stay open for orchestrators)."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ApiError


def require_api_key(request: Request) -> None:
    key = request.app.state.rt.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "A valid 'Authorization: Bearer <API key>' header is required.",
                       {"WWW-Authenticate": "Bearer"})  # fmt: skip
