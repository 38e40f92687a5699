"""The accessible web page: `/` and its assets under `/static/` (open without an API key; the page asks for one).

One static page, no build step and no external resources, so it works offline against the device. The
Content-Security-Policy keeps it that way: the page may only load from and talk to this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: data:; connect-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The camera page: Describe, Read text, Ask; the answer in a live region and as speech."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


def mount(app: FastAPI) -> None:
    """Serve the page at `/` and its files at `/static/`."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
