"""Serving benchmark: latency p50/p95 and throughput of /v1/vqa, /v1/scene, /v1/read and /v1/speak at
several numbers of concurrent clients against a real `rpiq serve` process, full precision vs int4, plus
the time to first audio of a streamed, spoken answer (on a sign, and "What is in front of me?" on a
photo without text) and the perception stage (ms per photo and per stage, from /v1/scene).

    python benchmarks/serve.py                                   # embedded model, fp vs int4 (RTN, made once)
    python benchmarks/serve.py --concurrency 1,4,16 --requests 16 --variants fp,int4
    python benchmarks/serve.py --model DIR --int4 CKPT
    python benchmarks/serve.py --variants fp --concurrency 1 --requests 1 --audio-runs 1   # a quick check

Each variant runs in its own server process (queue 16, so 16 clients are never refused; a 503 or any
non-200 counts as an error). JSON goes to benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
SIGN = ["Fresh Milk", "Best before 12 May"]
PARAGRAPH = ["Take two tablets every morning with water.", "Do not exceed the stated dose.",
             "Keep out of the reach of children."]  # fmt: skip
SPEECH = "The next bus to the central station leaves in four minutes from stop B."
PHOTO = REPO / "quantizer" / "calib_images" / "chelsea.jpg"  # a cat, no text: perception answers
IN_FRONT = "What is in front of me?"


def render(lines: list[str], size: int = 36) -> bytes:
    try:
        font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", size)
    except OSError:
        font = ImageFont.load_default(size=size)
    w = max(font.getbbox(t)[2] for t in lines) + 60
    img = Image.new("RGB", (w, int(size * 1.5) * len(lines) + 60), "white")
    d = ImageDraw.Draw(img)
    for i, t in enumerate(lines):
        d.text((30, 30 + i * int(size * 1.5)), t, font=font, fill="black")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str | None, queue: int, log: Path, threads: int | None = None) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "rpiq.cli", "serve", "--port", str(self.port), "--queue-size", str(queue),
               "--timeout", "300", *(["--threads", str(threads)] if threads else [])]  # fmt: skip
        if model:
            cmd.insert(4, model)
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)  # noqa: SIM115
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server not ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def load(url: str, endpoint: str, concurrency: int, total: int, payloads: dict) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    todo = list(range(total))

    async def worker(client: httpx.AsyncClient) -> None:
        while todo:
            todo.pop()
            t = time.perf_counter()
            try:
                r = await client.post(endpoint, **payloads[endpoint])
                ok = r.status_code == 200
                key = str(r.status_code)
            except httpx.HTTPError as e:
                ok, key = False, type(e).__name__
            if ok:
                latencies.append(time.perf_counter() - t)
            else:
                errors[key] = errors.get(key, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "endpoint": endpoint, "concurrency": concurrency, "requests": total, "ok": len(latencies),
        "errors": errors, "p50_s": pct(latencies, 0.5), "p95_s": pct(latencies, 0.95),
        "throughput_rps": len(latencies) / wall, "wall_s": wall,
    }  # fmt: skip


async def perception(url: str, image: bytes, runs: int) -> dict:
    """Perception per photo, from /v1/scene's own timings: total and median per stage, in milliseconds."""
    totals, stages, summary = [], {}, None
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for _ in range(runs):
            r = await client.post("/v1/scene", files={"image": ("p.jpg", image, "image/jpeg")})
            r.raise_for_status()
            body = r.json()
            totals.append(sum(body["perception_ms"].values()))
            for stage, ms in body["perception_ms"].items():
                stages.setdefault(stage, []).append(ms)
            summary = body["summary"]
    return {"runs": runs, "perception_ms_median": statistics.median(totals), "perception_ms_max": max(totals),
            "stage_ms_median": {k: statistics.median(v) for k, v in stages.items()}, "summary": summary}  # fmt: skip


async def first_audio(url: str, image: bytes, question: str, runs: int, mime: str = "image/png") -> dict:
    server_side, client_side, answers = [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for _ in range(runs):
            t = time.perf_counter()
            got = None
            form = {"question": question, "stream": "true", "speak": "true", "max_tokens": "32"}
            async with client.stream("POST", "/v1/vqa", files={"image": ("p", image, mime)}, data=form) as r:
                event = None
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        if event == "audio" and got is None:
                            got = time.perf_counter() - t
                        elif event == "done":
                            done = json.loads(line[6:])
                            server_side.append(done["timings"].get("time_to_first_audio_s", float("nan")))
                            answers.append(done["answer"])
            client_side.append(got if got is not None else float("nan"))
    return {
        "question": question, "runs": runs, "answer": answers[-1] if answers else None,
        "client_first_audio_median_s": statistics.median(client_side), "client_first_audio_max_s": max(client_side),
        "server_first_audio_median_s": statistics.median(server_side),
    }  # fmt: skip


def make_int4(model: str | None) -> str:
    """An int4 checkpoint of the model: RTN 4-bit g128 (quick to make; the serving speed is the same as RPIQ's)."""
    out = Path.home() / ".cache" / "rpiq" / "bench" / "default-rtn-w4g128"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "rpiq.cli", "quantize", *([model] if model else []), "--method", "rtn",
               "--bits", "4", "--group-size", "128", "--nsamples", "2", "--seqlen", "64", "--out", str(out),
               "--no-progress"]  # fmt: skip
        print("making an int4 checkpoint:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="full-precision model dir (default: embedded)")
    ap.add_argument("--int4", default="auto", help="int4 checkpoint dir, or 'auto' (RTN of --model, made once)")
    ap.add_argument("--variants", default="fp,int4")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16, help="requests per endpoint and concurrency level")
    ap.add_argument("--endpoints", default="/v1/vqa,/v1/scene,/v1/read,/v1/speak")
    ap.add_argument("--audio-runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve.json"))
    args = ap.parse_args()

    sign, page, photo = render(SIGN, 40), render(PARAGRAPH, 34), PHOTO.read_bytes()
    payloads = {
        "/v1/vqa": {"json": {"image": base64.b64encode(sign).decode(), "question": "Is it still good to drink?",
                             "max_tokens": 32}},
        "/v1/scene": {"files": {"image": ("c.jpg", photo, "image/jpeg")}},
        "/v1/read": {"files": {"image": ("p.png", page, "image/png")}},
        "/v1/speak": {"json": {"text": SPEECH}},
    }  # fmt: skip
    levels = [int(c) for c in args.concurrency.split(",")]
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "load_avg_at_start": os.getloadavg()}, "args": vars(args), "variants": {}}  # fmt: skip
    for variant in args.variants.split(","):
        model = args.model if variant == "fp" else (make_int4(args.model) if args.int4 == "auto" else args.int4)
        log = Path(args.out).with_suffix(f".{variant}.log.tmp")  # ignored by git (*.tmp)
        server = Server(model, queue=max(levels), log=log, threads=args.threads)
        try:
            t = time.perf_counter()
            ready = server.wait_ready()
            rows = []
            # one warm-up request per endpoint (first OCR / generation pay one-time costs)
            asyncio.run(load(server.url, "/v1/vqa", 1, 1, payloads))
            asyncio.run(load(server.url, "/v1/read", 1, 1, payloads))
            asyncio.run(load(server.url, "/v1/scene", 1, 1, payloads))  # loads the perception models
            for endpoint in args.endpoints.split(","):
                for c in levels:
                    row = asyncio.run(load(server.url, endpoint, c, max(args.requests, c), payloads))
                    rows.append(row)
                    print(f"[{variant}] {endpoint:10} c={c:<3} ok={row['ok']}/{row['requests']} "
                          f"p50={row['p50_s']:.2f}s p95={row['p95_s']:.2f}s {row['throughput_rps']:.2f} req/s "
                          f"errors={row['errors']}", flush=True)  # fmt: skip
            audio = asyncio.run(first_audio(server.url, sign, "What does the label say?", args.audio_runs))
            audio_lm = asyncio.run(first_audio(server.url, sign, "Is it still good to drink?", args.audio_runs))
            audio_seen = asyncio.run(first_audio(server.url, photo, IN_FRONT, args.audio_runs, "image/jpeg"))
            sight = asyncio.run(perception(server.url, photo, args.audio_runs))
            print(f"[{variant}] perception {sight['perception_ms_median']:.0f} ms per photo "
                  f"{sight['stage_ms_median']}", flush=True)  # fmt: skip
            results["variants"][variant] = {"model": model, "ready": ready, "startup_s": time.perf_counter() - t,
                                            "load": rows, "first_audio": [audio, audio_lm, audio_seen],
                                            "perception": sight}  # fmt: skip
        finally:
            server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    print("\n| variant | endpoint | clients | ok/requests | p50 s | p95 s | req/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for v, data in results["variants"].items():
        for r in data["load"]:
            print(f"| {v} | {r['endpoint']} | {r['concurrency']} | {r['ok']}/{r['requests']} | {r['p50_s']:.2f} | "
                  f"{r['p95_s']:.2f} | {r['throughput_rps']:.2f} |")  # fmt: skip
    print("\n| variant | question | first audio (client, median / max) s | server median s |")
    print("|---|---|---:|---:|")
    for v, data in results["variants"].items():
        for a in data["first_audio"]:
            med, mx = a["client_first_audio_median_s"], a["client_first_audio_max_s"]
            print(f"| {v} | {a['question']} | {med:.2f} / {mx:.2f} | {a['server_first_audio_median_s']:.2f} |")
    print("\n| variant | perception ms per photo (median / max) | detect ms | classify ms | colour ms | codes ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for v, data in results["variants"].items():
        p = data["perception"]
        st = p["stage_ms_median"]
        print(
            f"| {v} | {p['perception_ms_median']:.0f} / {p['perception_ms_max']:.0f} | "
            + " | ".join(f"{st.get(k, float('nan')):.0f}" for k in ("detect", "classify", "colour", "codes"))
            + " |"
        )


if __name__ == "__main__":
    main()
