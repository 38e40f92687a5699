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
from .routers import chat, health, models, read, speak, ui, vqa
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


def create_app(settings: ServerSettings | None = None, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    rt = runtime or Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.start_loading()
        yield
        rt.shutdown()

    app = FastAPI(title="rpiq assistive server", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.rt = rt
    install_handlers(app)
    for r in (health.router, models.router, vqa.router, read.router, speak.router, chat.router):
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
