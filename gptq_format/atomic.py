"""Publishing a directory atomically: write it aside, fsync it, swap it in with two renames.

A failure leaves the old directory (or nothing), never a mix that a reader would half-read; only
a hard crash between the two renames leaves the old one under ``.NAME.old-PID`` and nothing at
the destination, and a hard crash while writing leaves a hidden ``.NAME.tmp-PID`` behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory so the rename below publishes data, not empty inodes."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` in a hidden sibling directory, then swap it in place of `out_dir`."""
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        _swap_in(tmp, out_dir, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _swap_in(tmp: Path, out_dir: Path, old: Path) -> None:
    moved_aside = out_dir.exists()
    if moved_aside:
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if moved_aside:
            os.replace(old, out_dir)
        raise
    _fsync_dir(out_dir.parent)


# =========================================================================== loading
