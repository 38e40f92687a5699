"""deploy/ cannot be run here (Docker, Jetson, systemd): these tests keep it consistent with the code."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models.embedded import ENV_GGUF, ENV_HOME, ENV_WHEEL
from rpiq.cli import app
from server.settings import ServerSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OTHER_RPIQ_VARS = {ENV_HOME, ENV_WHEEL, ENV_GGUF}  # read by models/embedded.py, not by the server settings
SETTINGS_VARS = {f"RPIQ_{name.upper()}" for name in ServerSettings.model_fields}
runner = CliRunner()


def _serve_options() -> set[str]:
    res = runner.invoke(app, ["serve", "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return set(re.findall(r"(--[a-z][a-z-]+)", res.output))


def _check_serve_argv(argv: list[str]) -> None:
    assert Path(argv[0]).name == "rpiq" and argv[1] == "serve", argv
    options = _serve_options()
    for arg in argv[2:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options, f"{arg} is not an option of `rpiq serve`"
    res = runner.invoke(app, [*argv[1:], "--help"])
    assert res.exit_code == 0, res.output


def _rpiq_names(text: str) -> set[str]:
    return set(re.findall(r"\b(RPIQ_[A-Z0-9_]+)\b", text))


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.jetson"])
def test_dockerfile_cmd_env_and_packages(name):
    text = (DEPLOY / name).read_text()
    cmd = [ln for ln in text.splitlines() if ln.startswith("CMD ")]
    assert len(cmd) == 1
    _check_serve_argv(json.loads(cmd[0][4:]))
    names = _rpiq_names(text)
    assert names and names <= SETTINGS_VARS | OTHER_RPIQ_VARS, names - SETTINGS_VARS - OTHER_RPIQ_VARS
    assert "espeak-ng" in text and "python3.11" in text.replace("python:3.11", "python3.11")
    for path in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (DEPLOY.parent / path).exists(), path
    assert '"torch==2.13.0"' in text  # the same torch release as pyproject.toml's pin


def test_env_example_names_are_settings_and_load(tmp_path):
    path = DEPLOY / "rpiq.env.example"
    names = {
        ln.split("=")[0].lstrip("# ").strip() for ln in path.read_text().splitlines() if re.match(r"#? ?RPIQ_", ln)
    }
    assert names <= SETTINGS_VARS, names - SETTINGS_VARS
    assert {"RPIQ_MODEL", "RPIQ_HOST", "RPIQ_PORT", "RPIQ_API_KEY", "RPIQ_QUEUE_SIZE"} <= names
    s = ServerSettings(_env_file=path)
    assert s.model is None and s.api_key is None and s.host == "127.0.0.1" and s.queue_size == 8
    s.check_exposure()  # the example as shipped is safe to start


def test_systemd_unit():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(DEPLOY / "rpiq.service")
    service = parser["Service"]
    _check_serve_argv(shlex.split(service["ExecStart"]))
    assert service["EnvironmentFile"] == "/etc/rpiq/rpiq.env"
    assert service["PrivateTmp"] == "yes"
    assert _rpiq_names((DEPLOY / "rpiq.service").read_text()) <= SETTINGS_VARS | OTHER_RPIQ_VARS
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_guide_mentions_every_file():
    guide = (DEPLOY / "README.md").read_text()
    for f in DEPLOY.iterdir():
        if f.name != "README.md":
            assert f.name in guide, f.name


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--kernel", "nope"], {}, "kernel: Input should be 'auto', 'tinygemm-cuda', 'tinygemm-cpu' or 'dequant'"),
        (["--dtype", "int3"], {}, "dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
        ([], {"RPIQ_KERNEL": "fast"}, "kernel: Input should be"),
    ],
)
def test_serve_rejects_a_bad_kernel_or_dtype_at_start(monkeypatch, args, env, message):
    """A typo in --kernel/--dtype (or the env file) stops `rpiq serve` at once, not as a 503 from the loader."""
    import server.app

    monkeypatch.setattr(server.app, "run", lambda settings: pytest.fail("the server must not start"))
    res = runner.invoke(app, ["serve", *args], env=env)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
