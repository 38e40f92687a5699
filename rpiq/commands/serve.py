"""`rpiq serve`: the assistive HTTP server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import _fail, console


def serve(
    checkpoint: Annotated[
        str | None, typer.Argument(help="model or int4 checkpoint directory; omit for the embedded default")
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind; beyond loopback an API key is required")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="require 'Authorization: Bearer KEY' (env RPIQ_API_KEY); shows in ps: prefer --api-key-file",
            envvar="RPIQ_API_KEY",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="read the API key from this file (env RPIQ_API_KEY_FILE)")
    ] = None,
    allow_insecure_public: Annotated[
        bool, typer.Option(help="bind beyond loopback without an API key (trusted networks only)")
    ] = False,
    queue_size: Annotated[int | None, typer.Option(help="requests that may wait for the model (503 beyond)")] = None,
    timeout: Annotated[float | None, typer.Option(help="per-request timeout in seconds")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
    kernel: Annotated[
        str | None, typer.Option(help="int4 kernel for checkpoints: auto, tinygemm-cpu, tinygemm-cuda, dequant")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16, float16")] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch threads; default: the CPUs this process may use (affinity, cgroup quota)")
    ] = None,
    ocr: Annotated[str | None, typer.Option(help="OCR engine: rapidocr, tesseract or none")] = None,
    voice: Annotated[str | None, typer.Option(help="default espeak-ng voice or language")] = None,
    env_file: Annotated[
        Path | None, typer.Option(help="read RPIQ_* settings from this file (see deploy/rpiq.env.example)")
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="run modeling code shipped with the checkpoint (auto_map, e.g. CogVLM2)")
    ] = False,
) -> None:
    """Start the assistive HTTP server (VQA, reading, speech, OpenAI-compatible chat) on CHECKPOINT.

    A vision-language checkpoint (int4 or full precision) answers /v1/vqa by looking at the photo."""
    from pydantic import ValidationError

    from models.loading import ModelLoadError, resolve_model
    from server.app import run
    from server.settings import ServerSettings

    given = {
        "model": checkpoint, "host": host, "port": port, "api_key": api_key, "api_key_file": api_key_file,
        "allow_insecure_public": allow_insecure_public or None, "queue_size": queue_size,
        "request_timeout_s": timeout, "device": device, "kernel": kernel, "dtype": dtype, "threads": threads,
        "ocr_engine": ocr, "voice": voice, "trust_remote_code": trust_remote_code or None,
    }  # fmt: skip
    defaults = {"host": "127.0.0.1", "port": 8000}  # CLI defaults must not override an env file's values
    overrides = {k: v for k, v in given.items() if v is not None and defaults.get(k, object()) != v}
    try:
        if env_file is not None and not env_file.is_file():
            raise ValueError(f"--env-file {env_file} does not exist")
        settings = ServerSettings(_env_file=env_file, **overrides)  # checks --kernel, --dtype, ... (Literal types)
        settings.check_exposure()
        if settings.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda was given but no CUDA GPU is available")
        if settings.model is not None:
            resolve_model(settings.model)  # fail now with a clear message, not later in /readyz
    except ValidationError as e:
        _fail("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()))
    except (ValueError, ModelLoadError) as e:
        _fail(str(e))
    console.print(f"rpiq serve: http://{settings.host}:{settings.port}  (docs at /docs, readiness at /readyz)")
    run(settings)
