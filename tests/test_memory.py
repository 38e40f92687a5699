"""`release_freed_memory` really hands freed heap pages back (glibc Linux)."""

from __future__ import annotations

import sys

import pytest
import torch

from models.memory import _malloc_trim, release_freed_memory


def _anon_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("RssAnon"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="needs glibc")
def test_freed_heap_pages_go_back_to_the_os():
    # 250 MiB in 64 KiB tensors (below glibc's mmap threshold, so from the heap); the last one
    # stays alive and pins the top of the heap, so freeing the rest alone returns nothing.
    tensors = [torch.ones(16 * 1024) for _ in range(4000)]
    last = tensors[-1]
    del tensors
    before = _anon_mb()
    release_freed_memory()
    assert _anon_mb() < before - 150
    assert float(last[0]) == 1.0
