"""Helpers for the server tests: rendered text images with exact ground truth, WAV parsing, CER, a server process."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[2]
FONT_DIRS = [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu")]


def font(size: int = 40, bold: bool = False) -> ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for d in FONT_DIRS:
        if (d / name).is_file():
            return ImageFont.truetype(str(d / name), size)
    return ImageFont.load_default(size=size)  # Pillow's bundled font: still exact ground truth


def render_text(lines: list[str], size: int = 40, *, fg=(0, 0, 0), bg=(255, 255, 255), pad: int = 30) -> Image.Image:
    f = font(size)
    widths = [f.getbbox(line)[2] for line in lines]
    line_h = int(size * 1.5)
    img = Image.new("RGB", (max(widths) + 2 * pad, line_h * len(lines) + 2 * pad), bg)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * line_h), line, font=f, fill=fg)
    return img


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def parse_wav(data: bytes) -> tuple[int, int, float]:
    """(channels, sample rate, duration s) of a RIFF/WAVE file; raises if it is not one."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE", data[:16]
    with wave.open(io.BytesIO(data)) as w:
        return w.getnchannels(), w.getframerate(), w.getnframes() / w.getframerate()


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate: Levenshtein distance / reference length (whitespace runs normalised)."""
    ref, hyp = " ".join(reference.split()), " ".join(hypothesis.split())
    prev = list(range(len(hyp) + 1))
    for i, rc in enumerate(ref, 1):
        cur = [i]
        for j, hc in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rc != hc)))
        prev = cur
    return prev[-1] / max(1, len(ref))


def sse_events(response) -> list[tuple[str | None, dict]]:
    """(event name, JSON data) of every event in a streamed server-sent-events response, in order."""
    events: list[tuple[str | None, dict]] = []
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            events.append((event, json.loads(line[6:])))
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """`rpiq serve` in a subprocess on a loopback port, with its own empty cwd and TMPDIR (privacy checks)."""

    model: str | None
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir.parent / f"{self.workdir.name}.log"

    @property
    def tmpdir(self) -> Path:
        return self.workdir / "tmp"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=timeout)

    def start(self, ready_timeout: float = 180.0) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tmpdir.mkdir(exist_ok=True)
        env = {**os.environ, "TMPDIR": str(self.tmpdir), "PYTHONPATH": str(REPO), **self.env}
        if self.api_key:
            env["RPIQ_API_KEY"] = self.api_key
        cmd = [sys.executable, "-m", "rpiq.cli", "serve", "--port", str(self.port)]
        if self.model:
            cmd.insert(4, self.model)
        log = open(self.log_path, "wb")  # noqa: SIM115 (kept open for the process's lifetime)
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {ready_timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
