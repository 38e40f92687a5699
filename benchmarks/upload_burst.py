"""Memory under a burst of big uploads: RSS of a real `rpiq serve` before, at its peak during, and after
N concurrent /v1/read requests of one 6000x6000 PNG (a ~100 kB file that decodes to 108 MB of RGB).

Why: such a burst took a server from 1.6 to 4.6 GB and it kept 3.8 GB afterwards. Photos are now
decoded only once the image gate admits them (RPIQ_MAX_DECODED_IMAGES at a time), and the server
gives memory back when a burst is over. Each gate size runs in its own server process, two bursts
each (the second shows whether memory keeps growing); RSS is sampled every 10 ms from /proc.

    python benchmarks/upload_burst.py                      # 10 uploads, gate of 2 and of 10
    python benchmarks/upload_burst.py --slots 2 --uploads 16 --model DIR

JSON goes to benchmarks/results/upload_burst.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw
from serve import Server, render  # benchmarks/ is the script's directory, already on sys.path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from server.memory import rss_bytes  # noqa: E402

MB = 1 << 20


def big_png(side: int) -> bytes:
    """A white side x side photo with a dark block and one word: small on the wire, huge decoded."""
    img = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((side // 4, side // 3, side // 2, side // 2), fill=(30, 30, 30))
    draw.text((side // 10, side // 10), "EXIT", fill="black", font_size=side // 30)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class Sampler:
    """The peak of a process's RSS, sampled every `every` s on a thread until stopped."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid) or 0)
            time.sleep(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def settled(url: str, pid: int, timeout: float = 60.0) -> int:
    """RSS once every lane is idle and RSS stopped falling (the server gives memory back after a burst)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = httpx.get(url + "/readyz", timeout=10).json()["queue"]
        if all(q["depth"] == 0 for q in queue.values()):
            break
        time.sleep(0.2)
    last = rss_bytes(pid) or 0
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = rss_bytes(pid) or 0
        if abs(now - last) < 2 * MB:
            return now
        last = now
    return last


async def burst(url: str, image: bytes, n: int) -> tuple[list[int], float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as ac:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(ac.post("/v1/read", files={"image": ("big.png", image, "image/png")})
                                    for _ in range(n)))  # fmt: skip
        return [r.status_code for r in rs], time.perf_counter() - t0


def run(model: str | None, slots: int, uploads: int, image: bytes, bursts: int, logdir: Path) -> list[dict]:
    os.environ["RPIQ_MAX_DECODED_IMAGES"] = str(slots)  # Server passes the environment on
    server = Server(model, queue=max(8, uploads), log=logdir / f"upload_burst_{slots}.log")
    rows = []
    try:
        server.wait_ready()
        pid = server.proc.pid
        httpx.post(server.url + "/v1/read", files={"image": ("sign.png", render(["Exit"]), "image/png")}, timeout=300)
        before = settled(server.url, pid)
        for i in range(1, bursts + 1):
            with Sampler(pid) as sampler:
                codes, wall = asyncio.run(burst(server.url, image, uploads))
                after = settled(server.url, pid)
            rows.append({"slots": slots, "burst": i, "uploads": uploads, "statuses": {str(c): codes.count(c)
                         for c in sorted(set(codes))}, "before_mb": before / MB, "peak_mb": sampler.peak / MB,
                         "after_mb": after / MB, "wall_s": wall})  # fmt: skip
            before = after
    finally:
        server.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded one)")
    ap.add_argument("--slots", default="2,10", help="RPIQ_MAX_DECODED_IMAGES values, comma-separated")
    ap.add_argument("--uploads", type=int, default=10, help="concurrent uploads per burst")
    ap.add_argument("--side", type=int, default=6000, help="the PNG's width and height")
    ap.add_argument("--bursts", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "upload_burst.json")
    args = ap.parse_args()
    image = big_png(args.side)
    rows = []
    logs = Path(tempfile.mkdtemp(prefix="rpiq-upload-burst-"))
    for slots in (int(s) for s in args.slots.split(",")):
        rows += run(args.model, slots, args.uploads, image, args.bursts, logs)
    print(f"\n{args.uploads} concurrent /v1/read of a {args.side}x{args.side} PNG ({len(image) // 1024} kB)")
    print(f"{'slots':>5} {'burst':>5} {'statuses':<16} {'before MB':>9} {'peak MB':>8} {'after MB':>8} {'wall s':>7}")
    for r in rows:
        codes = " ".join(f"{k}x{v}" for k, v in r["statuses"].items())
        print(f"{r['slots']:>5} {r['burst']:>5} {codes:<16} {r['before_mb']:>9.0f} {r['peak_mb']:>8.0f} "
              f"{r['after_mb']:>8.0f} {r['wall_s']:>7.1f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "png_bytes": len(image), "side": args.side, "model": args.model or "embedded default"}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
