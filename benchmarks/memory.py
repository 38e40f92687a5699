"""Peak resident memory of the current process, for the benchmarks' child processes.

Not `resource.getrusage(...).ru_maxrss`: Linux keeps that value across fork and exec, so a child
started by multiprocessing's "spawn" inherits its parent's peak (a benchmark driver holding a
512 MiB bandwidth probe made every child look 900 MB big). `VmHWM` in /proc/self/status is the
high-water mark of this process's own address space, which exec starts afresh.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak RSS in MiB (VmHWM) of this process, or of process `pid` (a server the benchmark started);
    ru_maxrss for this process where /proc is not available."""
    status = Path(f"/proc/{pid or 'self'}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    if pid is not None:
        raise OSError(f"no /proc/{pid}/status: cannot read another process's peak memory here")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(fn: Callable[[Any], Any], arg: Any) -> Any:
    """`fn(arg)` in a fresh "spawn" child process, so its peak memory (VmHWM) is its own.

    `fn` must be importable by the child (a module-level function); its exceptions re-raise here.
    """
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, (arg,))
