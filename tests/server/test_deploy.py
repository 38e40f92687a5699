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
        (
            ["--kernel", "nope"],
            {},
            "kernel: Input should be 'auto', 'tinygemm-cuda', 'tinygemm-cpu', 'dequant' or 'gemlite'",
        ),
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


def test_api_key_from_a_file_stays_out_of_argv(monkeypatch, tmp_path):
    """`--api-key-file` (or RPIQ_API_KEY_FILE): the key is read from the file, never given on the command line."""
    import server.app

    key_file = tmp_path / "key"
    key_file.write_text("s3cret-from-file\n")
    started: list[ServerSettings] = []
    monkeypatch.setattr(server.app, "run", started.append)
    res = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--api-key-file", str(key_file)], env={"RPIQ_API_KEY": ""})
    assert res.exit_code == 0, res.output
    assert started[0].api_key.get_secret_value() == "s3cret-from-file"
    env = {"RPIQ_API_KEY_FILE": str(key_file), "RPIQ_API_KEY": ""}
    monkeypatch.setenv("RPIQ_API_KEY_FILE", str(key_file))
    assert ServerSettings().api_key.get_secret_value() == "s3cret-from-file"
    res = runner.invoke(app, ["serve", "--host", "0.0.0.0"], env=env)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(("content", "message"), [(None, "cannot read the API key file"), ("\n", "is empty")])
def test_a_missing_or_empty_key_file_stops_serve(monkeypatch, tmp_path, content, message):
    import server.app

    monkeypatch.setattr(server.app, "run", lambda settings: pytest.fail("the server must not start"))
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    res = runner.invoke(app, ["serve", "--api-key-file", str(key_file)], env={"RPIQ_API_KEY": ""})
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "expected"),
    [({0, 1, 2, 3}, None, 4), ({0, 1, 2, 3}, "max 100000", 4), ({0, 1, 2, 3}, "150000 100000", 2),
     ({0, 1}, "800000 100000", 2), ({5}, "50000 100000", 1), ({0, 1, 2}, "garbage", 3)],
)  # fmt: skip
def test_usable_cpus_honours_affinity_and_the_cgroup_quota(monkeypatch, tmp_path, affinity, cpu_max, expected):
    import os

    from server.cpus import usable_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity)
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max + "\n")
    assert usable_cpus(path) == expected


def test_threads_default_to_the_usable_cpus(monkeypatch):
    import server.settings

    monkeypatch.setattr(server.settings, "usable_cpus", lambda: 3)
    monkeypatch.delenv("RPIQ_THREADS", raising=False)
    s = ServerSettings()
    assert (s.threads, s.ocr_threads, s.perception_threads) == (3, 1, 1)


def test_docs_work_offline_and_redoc_is_not_offered():
    """An offline device: Swagger UI's JS and CSS come from this server (swagger-ui-bundle), not a CDN."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    c = TestClient(create_app(ServerSettings()))  # no lifespan: nothing loads
    page = c.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+\.(?:js|css))""", page.text)
    assert assets and all(a.startswith("/docs-assets/") for a in assets), assets
    for a in assets:
        assert c.get(a).status_code == 200, a
    assert "cdn" not in page.text.lower()
    assert c.get("/redoc").status_code == 404


def test_a_timeout_counts_as_cancelled_too():
    import asyncio

    from server.errors import ApiError
    from server.runtime import Runtime

    rt = Runtime(ServerSettings())

    class Request:
        async def is_disconnected(self) -> bool:
            return False

    async def late() -> None:
        raise TimeoutError

    with pytest.raises(ApiError) as e:
        asyncio.run(rt.guard(Request(), rt.context(1.0), late()))
    assert e.value.status == 504
    text = rt.metrics.render(rt.lanes).decode()
    assert "rpiq_timeouts_total 1.0" in text and "rpiq_cancelled_total 1.0" in text
    rt.shutdown()
