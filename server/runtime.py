"""The server's long-lived parts (settings, model engine, lanes, image gate, memory guard, OCR, speech, metrics)
and per-request context.

Loading happens in a background thread after startup, so /healthz answers at once and /readyz
turns 200 only when the model, OCR and speech are usable (what an orchestrator should wait for).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from .cpus import apply_thread_budgets
from .engine import Engine
from .errors import ApiError, ClientGone
from .lanes import Cancelled, Gate, Lane, QueueFull
from .memory import MemoryGuard
from .metrics import Metrics
from .ocr import OcrUnavailableError, make_engine
from .reading import Reader
from .settings import ServerSettings
from .speech import Speech, SpeechUnavailableError
from .vision import Describer, TextOnlyDescriber, VLMDescriber

log = logging.getLogger("rpiq.server")
T = TypeVar("T")
SPEECH_RESERVE_S = 2.0  # a spoken answer stops generating this long (at most a quarter of the timeout) early
SPEECH_SHARE = 0.25


@dataclass
class RequestCtx:
    """Per request: a cancel event shared by every job it queues, and one deadline for all of them.

    Generation has its own, earlier deadline when the answer is to be spoken: a generation stopped by
    the deadline still answers with the sentences it made (`assist.answer`), and those need time to
    be spoken before the request's own deadline."""

    timeout_s: float
    t0: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s
        self.generation_deadline = self.deadline

    def reserve(self, seconds: float) -> None:
        """Stop generating `seconds` (at most a quarter of the timeout) before the deadline."""
        self.generation_deadline = self.deadline - min(seconds, SPEECH_SHARE * self.timeout_s)

    def remaining(self, until: float | None = None) -> float:
        """Seconds left until the deadline (or `until`); TimeoutError when none are."""
        left = (self.deadline if until is None else until) - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def out_of_time(self) -> bool:
        """The generation deadline has passed."""
        return time.monotonic() >= self.generation_deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


class Runtime:
    def __init__(self, settings: ServerSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        s = settings
        self.metrics = Metrics()
        self.engine = engine or Engine(
            s.model, device=s.device, kernel=s.kernel, dtype=s.dtype, name=s.model_name, threads=s.threads,
            max_prompt_tokens=s.max_prompt_tokens, token_delay_s=s.token_delay_s,
            trust_remote_code=s.trust_remote_code,
        )  # fmt: skip
        self.model_lane = Lane("model", s.queue_size)
        self.ocr_lane = Lane("ocr", s.queue_size)
        self.speech_lane = Lane("speech", max(16, 4 * s.queue_size))
        self.memory = MemoryGuard(s.max_rss_mb)
        # Photos are decoded only once this gate admits them, so a burst holds compressed bytes, not pixels.
        self.image_gate = Gate("image", s.max_decoded_images, s.queue_size, on_idle=self.memory.settle)
        self.lanes: dict[str, Lane | Gate] = {"model": self.model_lane, "ocr": self.ocr_lane,
                                              "speech": self.speech_lane, "image": self.image_gate}  # fmt: skip
        self.speech = Speech(self.speech_lane, s.voice, s.speech_rate, s.speech_volume)
        self.reader: Reader | None = None
        self.describer: Describer = TextOnlyDescriber(None)
        self.ready = False
        self.load_error: str | None = None
        self.components: dict[str, str] = {"model": "loading", "ocr": "loading", "speech": "loading"}
        self._loader: threading.Thread | None = None

    # --- start-up ----------------------------------------------------------------------------------
    def start_loading(self) -> None:
        apply_thread_budgets(self.settings.threads, self.settings.perception_threads)
        self._loader = threading.Thread(target=self._load_all, name="rpiq-loader", daemon=True)
        self._loader.start()

    def _load_all(self) -> None:
        try:
            # Speech and OCR initialise on their own lane threads (pyttsx3 must stay on one thread).
            speech = self.speech_lane.submit_sync(self.speech.warm_up)
            ocr_engine = self.ocr_lane.submit_sync(make_engine, self.settings.ocr_engine, self.settings.ocr_threads)
            self.model_lane.submit_sync(self.engine.load).result()
            kind = "int4" if self.engine.quantized else "full precision"
            self.components["model"] = f"ready ({kind}, sees images)" if self.engine.can_see else f"ready ({kind})"
            try:
                ocr = ocr_engine.result()
                self.components["ocr"] = f"ready ({ocr.name})" if ocr else "disabled"
            except OcrUnavailableError as e:
                ocr = None
                self.components["ocr"] = f"unavailable: {e}"
                log.warning("OCR unavailable: %s", e)
            if ocr is not None:
                self.reader = Reader(ocr, self.ocr_lane, self.engine,
                                     self.model_lane if self.settings.ocr_cleanup else None)  # fmt: skip
            self.describer = VLMDescriber(self.reader) if self.engine.can_see else TextOnlyDescriber(self.reader)
            try:
                speech.result()
                self.components["speech"] = "ready (espeak-ng)"
            except SpeechUnavailableError as e:
                self.components["speech"] = f"unavailable: {e}"
                log.warning("speech unavailable: %s", e)
            self.ready = True
            self.metrics.model_loaded.set(1)
            log.info("ready: %s", self.components)
        except Exception as e:  # shown by /readyz; the process stays up so the reason can be read
            self.load_error = f"{type(e).__name__}: {e}"
            self.components["model"] = f"failed: {self.load_error}"
            log.exception("loading failed")

    def shutdown(self) -> None:
        for lane in self.lanes.values():
            lane.shutdown()

    # --- per request -------------------------------------------------------------------------------
    def busy(self, e: QueueFull) -> ApiError:
        """The 503 for a full lane (counted in the metrics), with when to retry."""
        self.metrics.rejected.labels(e.lane).inc()
        return ApiError(503, "queue_full", f"The server is busy ({e.lane} queue full); retry in {e.retry_after} s.",
                        {"Retry-After": str(e.retry_after)})  # fmt: skip

    def context(self, timeout_s: float | None, *, speaking: bool = False) -> RequestCtx:
        """The request's deadline (its `timeout_s`, capped by the server's); `speaking`: time kept to speak."""
        limit = self.settings.request_timeout_s
        ctx = RequestCtx(min(timeout_s, limit) if timeout_s else limit)
        if speaking:
            ctx.reserve(SPEECH_RESERVE_S)
        return ctx

    async def guard(self, request: Request, ctx: RequestCtx, work: Awaitable[T]) -> T:
        """Await `work`, turning lane errors into API errors; a client that disconnects cancels it."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.2)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    ctx.cancel.set()
                    task.cancel()
                    self.metrics.cancelled.inc()
                    raise ClientGone
        except QueueFull as e:
            ctx.cancel.set()
            raise self.busy(e) from None
        except SpeechUnavailableError as e:
            raise ApiError(503, "speech_unavailable", str(e)) from None
        except (TimeoutError, Cancelled):
            ctx.cancel.set()
            self.metrics.timed_out()
            raise ApiError(
                504, "timeout", f"The request took longer than {ctx.timeout_s:g} s and was stopped."
            ) from None
        finally:
            if not task.done():
                ctx.cancel.set()
                task.cancel()
