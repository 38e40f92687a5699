"""The FastAPI application: routers, error shape, metrics middleware, and background model loading.

`create_app(settings)` is what `rpiq serve` (and uvicorn's factory mode) runs. Work is never done
on the event loop: the model, OCR and speech each have a lane thread (see `lanes.py`), so
/healthz answers while a generation runs.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import install_handlers
from .routers import chat, health, models, read, scene, speak, ui, vqa
from .runtime import Runtime
from .settings import ServerSettings

log = logging.getLogger("rpiq.server")

DESCRIPTION = """Assistive inference for blind and visually impaired users: answers about photos,
text reading and speech, offline, with int4 models. Answers are short and screen-reader friendly.
Camera frames and answers are never written to disk or logs (unless RPIQ_LOG_CONTENT=true for answers)."""


class MetricsMiddleware:
    """Counts and times every request by route template and status (pure ASGI: streaming-safe)."""

    def __init__(self, app: ASGIApp, rt: Runtime) -> None:
        self.app = app
        self.rt = rt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            m = self.rt.metrics
            m.requests.labels(label, str(status[0])).inc()
            m.latency.labels(label).observe(time.perf_counter() - t0)


def mount_docs(app: FastAPI) -> None:
    """/docs with Swagger UI served from the swagger-ui-bundle wheel: FastAPI's default page loads its
    JS and CSS from a CDN and stays blank on an offline device. ReDoc is CDN-only, so it is not offered."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # pragma: no cover - a declared dependency; a plain page rather than a blank one
        swagger_ui_path = None

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if swagger_ui_path is None:
            return HTMLResponse('<!doctype html><title>rpiq API</title><p>The API schema is at '
                                '<a href="/openapi.json">/openapi.json</a>.</p>')  # fmt: skip
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - docs",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")  # fmt: skip

    if swagger_ui_path is not None:
        app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")


def create_app(settings: ServerSettings | None = None, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    rt = runtime or Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.start_loading()
        yield
        rt.shutdown()

    app = FastAPI(title="rpiq assistive server", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # fmt: skip
    app.state.rt = rt
    mount_docs(app)
    install_handlers(app)
    for r in (health.router, models.router, vqa.router, scene.router, read.router, speak.router, chat.router):
        app.include_router(r)
    ui.mount(app)  # the accessible web page at / (and /static/), open without an API key
    app.add_middleware(MetricsMiddleware, rt=rt)
    return app


def run(settings: ServerSettings) -> None:
    """Start uvicorn with `settings` (the `rpiq serve` entry point)."""
    import uvicorn

    settings.check_exposure()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # access_log=False: paths are harmless, but the policy is simply that requests are not logged.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=5)  # fmt: skip
