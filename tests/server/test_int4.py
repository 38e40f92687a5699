"""`rpiq serve` on an int4 checkpoint written by `rpiq quantize` (models.int4 kernels)."""

from __future__ import annotations

import httpx
from typer.testing import CliRunner

from rpiq.cli import app

from .helpers import ServerProcess


def test_serve_an_int4_checkpoint(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "tiny-w4"
    res = CliRunner().invoke(app, [
        "quantize", str(tiny_model_dir), "--out", str(ckpt), "--method", "rtn", "--bits", "4", "--group-size", "32",
        "--nsamples", "2", "--seqlen", "32", "--no-progress",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    server = ServerProcess(str(ckpt), tmp_path / "srv", env={"RPIQ_OCR_ENGINE": "none", "RPIQ_THREADS": "1"}).start()
    try:
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["components"]["model"] == "ready (int4)"
        assert ready["components"]["ocr"] == "disabled"
        with server.client() as c:
            card = c.get("/v1/models").json()["data"][0]
            assert card["id"] == "tiny-w4" and card["quantized"] is True
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
            assert r.status_code == 200 and 1 <= r.json()["usage"]["completion_tokens"] <= 5
            # the product's decode loop: the lean step on the int4 layers, not transformers' forward
            assert 'rpiq_decodes_total{decoder="lean"} 1.0' in c.get("/metrics").text
            r = c.post("/v1/read", json={"image": "iVBORw0KGgo="})
            assert r.status_code == 503 and r.json()["error"]["code"] == "ocr_unavailable"
    finally:
        server.stop()
