"""One error shape for every failure: ``{"error": {"code", "message", "type"}}`` with a 4xx/5xx status.

The shape is OpenAI's, so OpenAI clients show our reasons, and a phone app can branch on `code`
(e.g. ask the user to retake a blurry photo) instead of parsing text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error the client should see, with a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class ClientGone(Exception):
    """The client disconnected; nobody will read the response (logged as status 499)."""


def error_body(code: str, message: str, status: int) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"code": code, "message": message, "type": kind}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, status), status_code=status, headers=headers)


def validation_error(errors: Sequence[Any]) -> ApiError:
    """A 422 for pydantic/FastAPI validation errors: ``missing_<field>`` when a top-level field is
    absent (the client forgot it), else ``invalid_request``; the message names up to five problems."""
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    code = f"missing_{loc[0]}" if first.get("type") == "missing" and len(loc) == 1 else "invalid_request"
    return ApiError(422, code, "; ".join(parts) or "invalid request")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc.errors())
        return error_response(err.status, err.code, err.message)

    @app.exception_handler(ClientGone)
    async def _gone(_request: Request, _exc: ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))
