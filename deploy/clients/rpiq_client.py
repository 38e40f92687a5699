#!/usr/bin/env python3
"""A minimal rpiq client (standard library only): send a photo, print the answer, save and play the speech.

    python rpiq_client.py label.jpg --read                       # read the text in the photo
    python rpiq_client.py label.jpg --ask "What is the expiry date?"
    python rpiq_client.py label.jpg                              # describe the photo
    RPIQ_URL=http://phone-host:8000 RPIQ_API_KEY=... python rpiq_client.py label.jpg --read --play

The answer is printed on stdout as plain text (one line per line of text), so a screen reader reads it
when the terminal has focus. The WAV is written to --wav (default: a temporary file, deleted after playing).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

DESCRIBE_QUESTION = "Describe this photo."
PLAYERS = (["paplay"], ["aplay", "-q"], ["ffplay", "-nodisp", "-autoexit", "-loglevel", "quiet"])


def request(url: str, api_key: str | None, endpoint: str, payload: dict, timeout: float) -> dict:
    """POST JSON to the server and return the decoded JSON answer; raises SystemExit with the server's message."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url.rstrip("/") + endpoint, json.dumps(payload).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise SystemExit(f"Error {e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise SystemExit(f"Error: cannot reach {url} ({e.reason})") from None


def play(wav: Path) -> bool:
    """Play the WAV with the first player found (paplay, aplay, ffplay); False when none is installed."""
    for cmd in PLAYERS:
        if shutil.which(cmd[0]):
            return subprocess.run([*cmd, str(wav)], check=False).returncode == 0
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", type=Path, help="photo file (JPEG, PNG, ...)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--read", action="store_true", help="read the text in the photo (/v1/read)")
    mode.add_argument("--ask", metavar="QUESTION", help="ask a question about the photo (/v1/vqa)")
    p.add_argument("--url", default=os.environ.get("RPIQ_URL", "http://127.0.0.1:8000"), help="server (RPIQ_URL)")
    p.add_argument("--api-key", default=os.environ.get("RPIQ_API_KEY"), help="API key (RPIQ_API_KEY)")
    p.add_argument("--wav", type=Path, help="save the speech here")
    p.add_argument("--play", action="store_true", help="play the speech (paplay, aplay or ffplay)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    args = p.parse_args(argv)

    payload: dict = {"image": base64.b64encode(args.image.read_bytes()).decode("ascii"), "speak": True}
    if args.read:
        body = request(args.url, args.api_key, "/v1/read", payload, args.timeout)
        text = body.get("text") or "I found no readable text in this photo."
    else:
        payload["question"] = args.ask or DESCRIBE_QUESTION
        body = request(args.url, args.api_key, "/v1/vqa", payload, args.timeout)
        text = body.get("answer", "")
    print(text, flush=True)

    audio = body.get("audio")
    if audio and (args.wav or args.play):
        wav = args.wav or Path(tempfile.mkstemp(suffix=".wav")[1])
        wav.write_bytes(base64.b64decode(audio["base64"]))
        if args.wav:
            print(f"Speech saved to {wav} ({audio['duration_s']:.1f} s).", file=sys.stderr)
        if args.play and not play(wav):
            print("No audio player found (paplay, aplay or ffplay).", file=sys.stderr)
        if not args.wav:
            wav.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
