"""How many CPUs this process may really use, and the thread budgets derived from it.

Why: torch's default is one thread per core *of the machine*; in a container limited to two CPUs on a
16-core host, or on a board whose cores are shared with other processes, that oversubscribes the CPUs and
measured generation 5-11x slower. The count here honours the CPU affinity mask (taskset, cpusets) and a
cgroup v2 CPU quota (``cpu.max``, what ``docker --cpus`` sets), whichever is smaller.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> float | None:
    """CPUs allowed by the cgroup v2 quota (``"<quota> <period>"``), or None when unlimited or unknown."""
    try:
        quota, period = path.read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cpu_max)
    if limit is not None:
        n = min(n, math.ceil(limit))
    return max(1, n)


PERCEPTION_THREADS_ENV = "RPIQ_PERCEPTION_THREADS"  # read by server.perception.runtime.thread_budget


def apply_thread_budgets(torch_threads: int, perception_threads: int) -> None:
    """Set once at start-up: torch's intra-op pool to `torch_threads`, and the perception models' budget
    (unless the environment already chose one). OCR gets its own onnxruntime budget (`server.ocr`) and
    espeak-ng synthesises on one thread, so the helpers never oversubscribe the CPUs torch decodes on."""
    import torch

    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    os.environ.setdefault(PERCEPTION_THREADS_ENV, str(perception_threads))
