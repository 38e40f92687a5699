"""What the third-party GPTQ workers (`reference_gptq.py`: llm-compressor, `gptqmodel_worker.py`: GPTQModel)
share: the same calibration/evaluation flags and the same version record, so their rows line up with ours."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Iterable


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """Model, grid, calibration and evaluation flags, with our quantizer's defaults."""
    ap.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    ap.add_argument("--group-size", type=int, default=128, help="-1 = per output channel")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", default="heldout")
    ap.add_argument("--eval2", default=None, help="a second evaluation text: built-in name or file")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)


def versions(packages: Iterable[str]) -> dict[str, str]:
    """Python's and each package's installed version ("not installed" when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
