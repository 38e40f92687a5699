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
(which would leak an admission slot); the job itself notices the event and ends early. A job given
a `deadline` that has passed by its turn is skipped too: its answer would arrive too late to be used.

`Gate` is the same admission rule for async work on the event loop that needs a scarce resource
rather than a thread: decoded photos, whose memory is what a burst of uploads exhausts.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
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

    def submit_sync(
        self, fn: Callable[..., T], *args: Any, cancel: threading.Event | None = None, deadline: float | None = None
    ) -> Future[T]:
        """Queue `fn(*args)`; skipped (`Cancelled`) if `cancel` is set or `deadline` (monotonic) passed by its turn."""
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFull(self.name, self.retry_after())
            self._pending += 1

        def job() -> T:
            t0 = time.perf_counter()
            try:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"{self.name} job cancelled before it started")
                if deadline is not None and time.monotonic() >= deadline:
                    raise Cancelled(f"{self.name} job reached its deadline before it started")
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
        self,
        fn: Callable[..., T],
        *args: Any,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> T:
        """Run `fn(*args)` in the lane and await it; on timeout or task cancellation, set `cancel`."""
        cfut = self.submit_sync(fn, *args, cancel=cancel, deadline=deadline)
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


class Gate:
    """At most `slots` holders at once and `waiting` more in line (FIFO); beyond that `QueueFull` at
    once, so a burst is refused with 503 + Retry-After instead of piling up. Event-loop only.

    `on_idle` runs (as a task) whenever the last holder leaves: the end of a burst."""

    def __init__(
        self, name: str, slots: int, waiting: int, on_idle: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.name = name
        self.slots = slots
        self.capacity = slots + waiting
        self._sem = asyncio.Semaphore(slots)
        self._admitted = 0
        self._hold_seconds = 1.0  # moving average, for Retry-After
        self._on_idle = on_idle
        self._tasks: set[asyncio.Task] = set()

    @property
    def depth(self) -> int:
        """Holders plus waiters."""
        return self._admitted

    def retry_after(self) -> int:
        return max(1, math.ceil(self._admitted / self.slots * self._hold_seconds))

    @asynccontextmanager
    async def hold(self, timeout: float | None) -> AsyncIterator[None]:
        """A slot for the block; waits at most `timeout` s for one (TimeoutError), refuses when the line is full."""
        if self._admitted >= self.capacity:
            raise QueueFull(self.name, self.retry_after())
        self._admitted += 1
        try:
            async with asyncio.timeout(timeout):
                await self._sem.acquire()
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._sem.release()
                self._hold_seconds = 0.8 * self._hold_seconds + 0.2 * (time.perf_counter() - t0)
        finally:
            self._admitted -= 1
            if self._admitted == 0 and self._on_idle is not None:
                task = asyncio.ensure_future(self._on_idle())
                self._tasks.add(task)  # a reference, so the task is not collected mid-run
                task.add_done_callback(self._tasks.discard)

    def shutdown(self) -> None:
        """Nothing to stop (no thread); here so a gate can stand beside the lanes."""
