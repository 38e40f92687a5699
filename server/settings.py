"""Server settings: one pydantic-settings class, read from RPIQ_* environment variables or an env file.

Why one class: the CLI, the systemd unit's EnvironmentFile, the container recipes and the tests all
configure the same object, and `tests/server/test_deploy.py` checks that every variable named in
`deploy/` exists here, so the deployment files cannot drift from the code.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.inference import DTypeName
from models.int4 import KernelName

from .cpus import usable_cpus

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
    threads: int = Field(
        default_factory=lambda: usable_cpus(), ge=1,  # looked up per call: tests patch it
        description="torch intra-op threads; default: the CPUs this process may use (affinity, cgroup quota); "
        "on CPUs shared with other busy work 1 answers faster (benchmarks/busy_cpu.py)",
    )  # fmt: skip
    ocr_threads: int = Field(1, ge=1, description="onnxruntime threads of the OCR engine (beside torch's)")
    perception_threads: int = Field(
        1, ge=1, description="threads per perception model (RPIQ_PERCEPTION_THREADS, read by server.perception)"
    )
    trust_remote_code: bool = Field(
        False, description="run modeling code shipped in the model directory (auto_map, e.g. CogVLM2); it executes it"
    )

    # --- network ---
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="required as 'Authorization: Bearer KEY' when set")
    api_key_file: Path | None = Field(
        None, description="read the API key from this file (keeps it out of `ps` and the environment)"
    )
    allow_insecure_public: bool = Field(
        False, description="allow binding beyond loopback without an API key (a trusted LAN only)"
    )

    # --- load behaviour ---
    queue_size: int = Field(8, ge=0, le=1024, description="requests waiting for the model besides the running one")
    request_timeout_s: float = Field(60.0, gt=0, description="upper bound on one request, queueing included")
    max_new_tokens: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    max_decoded_images: int = Field(
        2, ge=1, le=64,
        description="photos decoded and worked on (OCR, perception) at once; further uploads wait in line "
        "(queue_size of them) as compressed bytes, beyond that 503: bounds the memory a burst of uploads takes",
    )  # fmt: skip
    max_rss_mb: int | None = Field(
        None, ge=64, description="process memory ceiling in MB: above it new photo requests get 503 + Retry-After; "
        "unset = no ceiling",
    )  # fmt: skip
    token_delay_s: float = Field(
        0.0, ge=0, description="sleep per generated token: simulates a slower device in tests and load drills"
    )

    # --- input limits ---
    max_upload_bytes: int = Field(12 * 2**20, ge=1024, description="largest image upload")
    max_pixels: int = Field(40_000_000, ge=1, description="largest width x height (decompression bombs)")
    max_image_side: int = Field(
        4096, ge=256, description="photos are downscaled to this longest side (JPEGs while decoding: Image.draft)"
    )
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
    ocr_cleanup: bool = Field(True, description="split glued words in OCR lines (inserts spaces only)")

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

    @field_validator("api_key", "api_key_file", "max_rss_mb", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        return None if v in ("", None) else v  # RPIQ_API_KEY= (empty) in an env file means "no key"

    @model_validator(mode="after")
    def _key_from_file(self) -> ServerSettings:
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ValueError("give the API key either directly or as a file (api_key_file), not both")
            try:
                key = self.api_key_file.expanduser().read_text().strip()
            except OSError as e:
                raise ValueError(f"cannot read the API key file {self.api_key_file}: {e.strerror or e}") from None
            if not key:
                raise ValueError(f"the API key file {self.api_key_file} is empty")
            self.api_key = SecretStr(key)
        return self

    def requires_api_key(self) -> bool:
        return not is_loopback(self.host) and not self.allow_insecure_public

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback without a key: camera frames of a blind user are private."""
        if self.requires_api_key() and self.api_key is None:
            raise ValueError(
                f"binding to {self.host!r} exposes the server beyond this machine: set an API key "
                "(--api-key-file, RPIQ_API_KEY_FILE or RPIQ_API_KEY), "
                "or pass --allow-insecure-public for a trusted network"
            )
