"""Bounded single-thread work lanes: the model, the OCR engine and the speech engine each get one.

Why: there is one model instance (memory), pyttsx3's engine is not thread-safe, and on a small
board two OCR runs at once only slow each other down. A lane is one worker thread plus an
admission count. When `capacity` jobs (the running one plus `queue_size` waiting) are in the lane,
`submit` refuses at once with `QueueFull`, which the API turns into 503 + Retry-After, so an
overloaded device answers "busy, retry in N s" instead of hanging. Work never runs on the event
loop, so /healthz keeps answering during generation.

Cancellation is cooperative: each job carries a `threading.Event`; a job still waiting is skipped
when its turn comes, a running generation checks the event between tokens. The awaited future is
shielded, so a timed-out or disconnected request never cancels the concurrent future under the lane
(which would leak an admission slot); the job itself notices the event and ends early.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    def __init__(self, lane: str, retry_after: int) -> None:
        super().__init__(f"the {lane} queue is full")
        self.lane = lane
        self.retry_after = retry_after


class Cancelled(Exception):
    """The job was cancelled (timeout or client gone) before or while it ran."""


class Lane:
    def __init__(self, name: str, queue_size: int, initializer: Callable[[], None] | None = None) -> None:
        self.name = name
        self.capacity = queue_size + 1
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rpiq-{name}", initializer=initializer)
        self._lock = threading.Lock()
        self._pending = 0
        self._job_seconds = 1.0  # moving average, for Retry-After
        self.completed = 0

    @property
    def depth(self) -> int:
        """Jobs admitted and not finished (waiting + running)."""
        return self._pending

    def retry_after(self) -> int:
        return max(1, math.ceil(self._pending * self._job_seconds))

    def submit_sync(self, fn: Callable[..., T], *args: Any, cancel: threading.Event | None = None) -> Future[T]:
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFull(self.name, self.retry_after())
            self._pending += 1

        def job() -> T:
            t0 = time.perf_counter()
            try:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"{self.name} job cancelled before it started")
                return fn(*args)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self._pending -= 1
                    self.completed += 1
                    self._job_seconds = 0.8 * self._job_seconds + 0.2 * dt

        try:
            fut = self._executor.submit(job)
        except RuntimeError:  # executor shut down
            with self._lock:
                self._pending -= 1
            raise
        return fut

    async def run(
        self, fn: Callable[..., T], *args: Any, cancel: threading.Event | None = None, timeout: float | None = None
    ) -> T:
        """Run `fn(*args)` in the lane and await it; on timeout or task cancellation, set `cancel`."""
        cfut = self.submit_sync(fn, *args, cancel=cancel)
        afut = asyncio.wrap_future(cfut)
        afut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception not retrieved"
        try:
            return await asyncio.wait_for(asyncio.shield(afut), timeout=timeout)
        except (TimeoutError, asyncio.CancelledError):
            if cancel is not None:
                cancel.set()
            raise

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=False)
