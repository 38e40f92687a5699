"""'What does the sign say?' on /v1/vqa, idle and with CPU hogs beside the server (target: under 10 s).

Starts `rpiq serve` (the embedded model) on a loopback port, renders a street sign, asks once on an
idle machine and twice while busy-loop processes run beside it (bounded to 60 s); prints a table
and saves JSON to benchmarks/results/sign_under_load.json.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
OUT = Path(__file__).resolve().parent / "results" / "sign_under_load.json"


def _hog(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def _sign() -> bytes:
    img = Image.new("RGB", (900, 600), (90, 120, 90))
    draw = ImageDraw.Draw(img)
    draw.rectangle((200, 150, 700, 420), fill=(250, 250, 250))
    font = ImageFont.truetype(FONT, 56)
    draw.text((230, 180), "NO PARKING", fill=(200, 0, 0), font=font)
    draw.text((230, 290), "AT ANY TIME", fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def _wait_ready(url: str, tries: int = 600) -> None:
    for _ in range(tries):
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("server did not become ready")


def _ask(url: str, photo: bytes) -> dict:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/vqa", files={"image": ("sign.jpg", photo, "image/jpeg")},
                   data={"question": "What does the sign say?"}, timeout=120)  # fmt: skip
    return {"seconds": round(time.perf_counter() - t0, 3), "status": r.status_code, "answer": r.json().get("answer")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8711)
    ap.add_argument("--hogs", type=int, default=2, help="busy-loop processes beside the server")
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "rpiq.cli", "serve", "--port", str(args.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    rows = []
    try:
        _wait_ready(url)
        photo = _sign()
        rows.append({"hogs": 0, **_ask(url, photo)})
        hogs = [mp.Process(target=_hog, args=(time.time() + 60,)) for _ in range(args.hogs)]
        for p in hogs:
            p.start()
        time.sleep(2)
        rows += [{"hogs": args.hogs, **_ask(url, photo)} for _ in range(2)]
        for p in hogs:
            p.join()
    finally:
        server.terminate()
        server.wait()
    print(f"{'hogs':>4} {'seconds':>8} {'status':>6}  answer")
    for r in rows:
        print(f"{r['hogs']:>4} {r['seconds']:>8.2f} {r['status']:>6}  {r['answer']}")
    meta = {"machine": f"{platform.machine()}, {mp.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
