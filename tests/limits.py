"""Time limits in tests that a busy machine cannot break.

A test never budgets wall-clock time for speed (that is a benchmark's job); the limits here only
stop a hung subprocess or server from holding CI forever. They are generous and scale with
``RPIQ_TEST_TIME_SCALE`` (default 5): on a machine at load 8 a 2-core job can take several times
its quiet-machine time.
"""

from __future__ import annotations

import os

TIME_SCALE = float(os.environ.get("RPIQ_TEST_TIME_SCALE", "5"))


def generous(seconds: float) -> float:
    """`seconds` (what the step takes on a quiet machine, with margin) scaled for a loaded one."""
    return seconds * TIME_SCALE
