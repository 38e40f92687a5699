"""Process memory: the resident size now, a ceiling above which new photos are refused, and giving
freed memory back to the system after a burst.

Why: a photo costs far more decoded than uploaded (a 120 kB PNG of 6000x6000 pixels is 108 MB of
RGB, plus the downscaled copy, OCR and perception working copies). Ten at once took a server from
1.6 to 4.6 GB, and it stayed at 3.8 GB though nothing referenced the pixels any more: glibc keeps
freed large blocks in its per-thread arenas (its mmap threshold grows after the first large free),
so a long-running process on a 4 GB board slowly runs out. `gc.collect()` then glibc's
`malloc_trim(0)` hands those pages back; the image gate (`lanes.Gate`) calls `settle` whenever the
last photo of a burst is done.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time

from models.memory import release_freed_memory

MB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
TRIM_EVERY_S = 1.0  # at most one give-back a second when a full ceiling keeps asking for one


def rss_bytes(pid: int | None = None) -> int | None:
    """Resident set size now (not the peak) of this process or of `pid`; None where /proc is missing."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


def give_back() -> None:
    """Collect garbage, then return the C heap's free pages to the system (blocking: run it off the loop)."""
    gc.collect()
    release_freed_memory()


class MemoryGuard:
    """The `max_rss_mb` ceiling checked before a photo is admitted, and giving memory back after bursts."""

    def __init__(self, max_rss_mb: int | None, slack_mb: int = 64) -> None:
        self.limit = max_rss_mb * MB if max_rss_mb else None
        self.slack = slack_mb * MB
        self.floor: int | None = None  # RSS right after the last give-back: what "back to baseline" means
        self._last = 0.0
        self._running = False

    async def give_back(self) -> int | None:
        """`give_back()` on a worker thread, one at a time; the RSS afterwards (the new floor)."""
        if not self._running:
            self._running = True
            try:
                await asyncio.to_thread(give_back)
            finally:
                self._running = False
            self._last = time.monotonic()
            self.floor = rss_bytes()
        return rss_bytes()

    async def settle(self) -> None:
        """A burst is over: give memory back when RSS stands more than `slack` above its floor (so a
        steady trickle of requests does not pay a full garbage collection each)."""
        rss = rss_bytes()
        if rss is not None and (self.floor is None or rss > self.floor + self.slack):
            await self.give_back()

    async def over_ceiling(self) -> int | None:
        """The RSS when it is above the ceiling even after trying to give memory back, else None."""
        if self.limit is None:
            return None
        rss = rss_bytes()
        if rss is not None and rss > self.limit and time.monotonic() - self._last >= TRIM_EVERY_S:
            rss = await self.give_back()
        return rss if rss is not None and rss > self.limit else None
