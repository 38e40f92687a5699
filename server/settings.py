"""Server settings: one pydantic-settings class, read from RPIQ_* environment variables or an env file.

Why one class: the CLI, the systemd unit's EnvironmentFile, the container recipes and the tests all
configure the same object, and `tests/server/test_deploy.py` checks that every variable named in
`deploy/` exists here, so the deployment files cannot drift from the code.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.inference import DTypeName
from models.int4 import KernelName

LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    """True when binding `host` only exposes the server to this machine (no API key needed)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname that may resolve to anything: treat as exposed


class ServerSettings(BaseSettings):
    """Everything `rpiq serve` can be told; env names are ``RPIQ_`` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="RPIQ_", env_file=None, extra="ignore")

    # --- model ---
    model: str | None = Field(None, description="model or int4 checkpoint directory; unset = embedded default")
    model_name: str | None = Field(None, description="name reported by /v1/models; default: the directory name")
    device: str = Field("cpu", description="cpu or cuda[:N]")
    kernel: KernelName = Field("auto", description="int4 kernel for quantized checkpoints (models.int4)")
    dtype: DTypeName = Field("auto", description="activation dtype; auto: bfloat16 for int4, float32 otherwise")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; unset = torch's default")
    trust_remote_code: bool = Field(
        False, description="run modeling code shipped in the model directory (auto_map, e.g. CogVLM2); it executes it"
    )

    # --- network ---
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="required as 'Authorization: Bearer KEY' when set")
    allow_insecure_public: bool = Field(
        False, description="allow binding beyond loopback without an API key (a trusted LAN only)"
    )

    # --- load behaviour ---
    queue_size: int = Field(8, ge=0, le=1024, description="requests waiting for the model besides the running one")
    request_timeout_s: float = Field(60.0, gt=0, description="upper bound on one request, queueing included")
    max_new_tokens: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    token_delay_s: float = Field(
        0.0, ge=0, description="sleep per generated token: simulates a slower device in tests and load drills"
    )

    # --- input limits ---
    max_upload_bytes: int = Field(12 * 2**20, ge=1024, description="largest image upload")
    max_pixels: int = Field(40_000_000, ge=1, description="largest width x height (decompression bombs)")
    image_formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"],
        description="accepted Pillow format names (MPO: what many phones' JPEGs are)",
    )
    max_text_chars: int = Field(4000, ge=1, description="longest text /v1/speak accepts")
    max_prompt_tokens: int = Field(2048, ge=64, description="prompt tokens kept (OCR text is cut to fit)")

    # --- answers ---
    language: str = Field("en", description="default answer language (BCP 47 code)")
    answer_length: Literal["short", "medium", "long"] = "short"
    grounding_filter: bool = Field(
        True, description="text-only models: drop answer sentences whose names/numbers are not in the OCR text"
    )

    # --- OCR ---
    ocr_engine: Literal["rapidocr", "tesseract", "none"] = "rapidocr"
    ocr_cleanup: bool = Field(True, description="let the LM pick between space repairs of OCR lines")

    # --- speech ---
    voice: str = Field("en", description="espeak-ng voice id or language, e.g. en, en-us, fr, gmw/en-US")
    speech_rate: int = Field(175, ge=80, le=450, description="words per minute")
    speech_volume: float = Field(1.0, ge=0.0, le=1.0)

    # --- privacy ---
    log_content: bool = Field(
        False, description="log questions and answers (never images); off by default: frames and answers are private"
    )

    @field_validator("model", mode="before")
    @classmethod
    def _empty_is_default(cls, v: object) -> object:
        return None if v in ("", None) else str(Path(str(v)).expanduser())

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        return None if v in ("", None) else v  # RPIQ_API_KEY= (empty) in an env file means "no key"

    def requires_api_key(self) -> bool:
        return not is_loopback(self.host) and not self.allow_insecure_public

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback without a key: camera frames of a blind user are private."""
        if self.requires_api_key() and self.api_key is None:
            raise ValueError(
                f"binding to {self.host!r} exposes the server beyond this machine: set an API key "
                "(--api-key or RPIQ_API_KEY), or pass --allow-insecure-public for a trusted network"
            )
