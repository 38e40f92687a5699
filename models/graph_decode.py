"""The lean decode step captured once as a CUDA graph and replayed for every token.

A small model's token on a GPU is launch-bound: ~30 kernels a layer, each a few microseconds of
work behind ~5-10 µs of Python and launch, so the GPU idles most of the step. A CUDA graph records
the step's kernels once and replays them with one launch. What it needs is a step whose kernels,
shapes and buffers are the same every token: `LeanDecoder.step_static` (token and position as device
tensors, a full-capacity cache, masked attention). `StaticSlot` holds what a captured graph refers
to (the cache, the input and output buffers); `token_steps` hands a generation a slot from a pool
keyed by capacity bucket, so the capture cost (a few warm-up steps and one recording) is paid once
per bucket and concurrent generations each get their own slot.

On a CPU `token_steps` is the plain lean step (no graphs; its attention reads only the filled part
of the cache). A `StaticSlot` also runs eagerly on a CPU, which is how the tests check it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .lean_decode import LeanCache, LeanDecoder

log = logging.getLogger(__name__)

_CAPTURE_LOCK = threading.Lock()  # one capture at a time (`StaticSlot._capture`)

MIN_CAPACITY = 256
"""Smallest capacity bucket: prompts and answers of an assistant are short, and every bucket is one
more graph (and one more cache) kept per concurrent generation."""

SPARE_SLOTS = 2
"""Idle slots kept per bucket once their generations end; more are built when more run at once."""

WARMUP_STEPS = 3
"""Eager steps on a side stream before recording (PyTorch's rule for capture: lazy initialisation, such
as cuBLAS workspaces and Triton autotuning, must not happen inside the recording)."""


def bucket(capacity: int) -> int:
    """The capacity bucket (a power of two, at least `MIN_CAPACITY`) that holds `capacity` positions."""
    return max(MIN_CAPACITY, 1 << max(0, capacity - 1).bit_length())


class StaticSlot:
    """One generation's fixed buffers for `LeanDecoder.step_static`, and on CUDA its captured graph.

    The graph refers to these exact tensors: `load` copies a prompt's keys/values into the cache in
    place, and each `step` writes the token and position into the input buffers, replays, and returns
    the logits buffer (valid until the next step)."""

    def __init__(self, lean: LeanDecoder, capacity: int, *, graph: bool | None = None) -> None:
        self.lean = lean
        self.cache: LeanCache = lean.empty_cache(capacity, zeroed=True)
        device = lean.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph if graph is not None else device.type == "cuda":
            try:
                self._capture()
            except Exception as e:  # an op the graph cannot hold, or a driver refusing: still decode, eagerly
                self.graph = self.logits = None
                log.warning(
                    "CUDA graph capture failed (%s: %s); this slot decodes without a graph", type(e).__name__, e
                )

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def load(self, prompt_cache: Any) -> StaticSlot:
        """Take a new prompt's keys/values (a transformers cache); what an earlier generation left after
        them is masked until overwritten."""
        self.lean.load(self.cache, prompt_cache)
        return self

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits [vocab] float32 for the token after `token` at position `pos` (`LeanDecoder.step`)."""
        if not 0 <= pos < self.capacity:
            raise ValueError(f"position {pos} is outside this slot's capacity of {self.capacity}")
        self.token.fill_(token)
        self.pos.fill_(pos)
        if self.graph is None:
            return self.lean.step_static(self.cache, self.token, self.pos)
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        """Record `step_static` over this slot's buffers. The warm-up steps write position 0 of a zero
        cache; `load` overwrites it before the first real step reads it. One capture at a time, checked
        for unsafe calls in this thread only: the server's other lanes keep decoding (and allocating)
        meanwhile, which the default process-wide check would turn into a failed capture."""
        with _CAPTURE_LOCK:
            side = torch.cuda.Stream(device=self.lean.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.lean.step_static(self.cache, self.token, self.pos)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits = self.lean.step_static(self.cache, self.token, self.pos)
            self.graph = graph


class SlotPool:
    """Idle `StaticSlot`s of one `LeanDecoder`, by capacity bucket; thread-safe (the server's lanes
    generate side by side)."""

    def __init__(self, lean: LeanDecoder) -> None:
        self.lean = lean
        self._idle: dict[int, list[StaticSlot]] = {}
        self._lock = threading.Lock()

    def take(self, capacity: int) -> StaticSlot:
        size = bucket(capacity)
        with self._lock:
            idle = self._idle.get(size)
            if idle:
                return idle.pop()
        return StaticSlot(self.lean, size)  # built outside the lock: capture takes a while

    def give_back(self, slot: StaticSlot) -> None:
        with self._lock:
            idle = self._idle.setdefault(slot.capacity, [])
            if len(idle) < SPARE_SLOTS:
                idle.append(slot)

    def idle(self) -> dict[int, int]:
        """Idle slots per capacity bucket."""
        with self._lock:
            return {size: len(slots) for size, slots in self._idle.items()}


_POOL_LOCK = threading.Lock()


def pool_for(lean: LeanDecoder) -> SlotPool:
    """The one slot pool of `lean` (made by the first caller)."""
    with _POOL_LOCK:
        pool = lean.__dict__.get("_rpiq_slot_pool")
        if pool is None:
            pool = lean.__dict__["_rpiq_slot_pool"] = SlotPool(lean)
    return pool


@contextmanager
def token_steps(lean: LeanDecoder, prompt_cache: Any, capacity: int) -> Iterator[Callable[[int, int], torch.Tensor]]:
    """``step(token, pos) -> logits`` for one generation of up to `capacity` positions after the prompt in
    `prompt_cache`: on CUDA a replayed graph from the pool (returned to it afterwards), on a CPU the
    lean step over a cache of exactly `capacity`."""
    if lean.device.type != "cuda":
        cache = lean.start(prompt_cache, capacity)
        del prompt_cache  # the caller drops its reference too: the prompt's keys are copied
        yield functools.partial(lean.step, cache)
        return
    pool = pool_for(lean)
    slot = pool.take(capacity).load(prompt_cache)
    del prompt_cache
    try:
        yield slot.step
    finally:
        pool.give_back(slot)
