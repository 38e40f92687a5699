"""CogVLM2 as it ships: remote code (``auto_map``) in the model directory, `--trust-remote-code` through
quantize, load and serve, the code copied into the checkpoint, and KV-cached generation.

The remote code here is `models.cogvlm2`'s own source written into the model directory under another
``model_type`` (``cogvlm2_remote``), so that nothing registered in this process can stand in for it:
the model only builds when transformers runs the directory's ``modeling_cogvlm.py``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import models.cogvlm2
from gptq_format import CheckpointError
from models.int4 import load_quantized
from models.vlm import chat_inputs
from rpiq.cli import app
from tests.tiny_vlms import FAMILIES
from tests.vlm_checkpoints import AUTO_MAP, REMOTE_TYPE, write_remote_cogvlm2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("remote") / "tiny-cogvlm2"
    write_remote_cogvlm2(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(remote_dir) -> Path:
    out = remote_dir.parent / "tiny-cogvlm2-w4"
    args = ["quantize", str(remote_dir), "--out", str(out), "--method", "gptq", "--calib-data", "images"]
    res = CliRunner().invoke(
        app, [*args, "--nsamples", "2", "--group-size", "32", "--trust-remote-code", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    return out


def _photo_inputs(model, tokenizer) -> dict:
    image = Image.new("RGB", (64, 48), (30, 160, 60))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    return chat_inputs(model, tokenizer, messages)


def _greedy(model, inputs: dict, use_cache: bool) -> list[int]:
    """Ten greedy tokens (the end token suppressed, so both runs are full length)."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=use_cache,
            return_dict_in_generate=True,
        )  # fmt: skip
    prompt = inputs["input_ids"].shape[1]
    if use_cache:  # the cache really held the prompt (image positions included) and all but the last token
        assert out.cache is not None and out.cache.get_seq_length() == prompt + 9
    else:
        assert out.cache is None
    return out.sequences[0, prompt:].tolist()


def test_quantize_refuses_remote_code_without_the_flag(remote_dir, tmp_path):
    res = CliRunner().invoke(app, ["quantize", str(remote_dir), "--out", str(tmp_path / "q"), "--no-progress"])
    assert res.exit_code == 2
    assert "trust_remote_code" in res.output


def test_checkpoint_carries_the_remote_code_and_loads_standalone(checkpoint):
    assert (checkpoint / "modeling_cogvlm.py").is_file()
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == REMOTE_TYPE
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        load_quantized(checkpoint)
    model = load_quantized(checkpoint, trust_remote_code=True)
    assert type(model).__name__ == "CogVLMForCausalLM"
    assert type(model) is not models.cogvlm2.CogVLMForCausalLM  # the checkpoint's own code built it
    assert sum(model.int4_kernels.values()) == 2 * 10  # 2 layers x (2 experts x (qkv, dense, gate, up, down))


def test_cached_and_uncached_greedy_generation_agree(checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    fp = FAMILIES["cogvlm2"]().model
    int4 = load_quantized(checkpoint, trust_remote_code=True)
    for model in (fp, int4):
        inputs = _photo_inputs(model, tok)
        assert inputs["images"][0][0].dtype == next(model.parameters()).dtype
        cached = _greedy(model, inputs, use_cache=True)
        assert len(cached) == 10
        assert cached == _greedy(model, inputs, use_cache=False)


def test_engine_serves_the_remote_code_checkpoint(checkpoint):
    from models.inference import GenerationOptions
    from server.engine import Engine

    engine = Engine(str(checkpoint), trust_remote_code=True)
    engine.load()
    assert engine.can_see and engine.quantized
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]},
    ]
    result = engine.generate(messages, GenerationOptions(max_new_tokens=5), threading.Event())
    assert 1 <= result.completion_tokens <= 5
    assert result.prompt_tokens > models.cogvlm2.vision_token_count(engine.model.config)  # the image's positions


def test_serve_passes_trust_remote_code_to_the_settings(checkpoint, monkeypatch):
    import server.app

    seen = {}
    monkeypatch.setattr(server.app, "run", lambda settings: seen.setdefault("settings", settings))
    res = CliRunner().invoke(app, ["serve", str(checkpoint), "--trust-remote-code"])
    assert res.exit_code == 0, res.output
    assert seen["settings"].trust_remote_code is True and seen["settings"].model == str(checkpoint)


def test_rotary_frequencies_survive_from_pretrained(remote_dir):
    """They are a non-persistent buffer: `from_pretrained` must recompute them, not leave empty memory."""
    import torch.utils.deterministic

    from models.loading import load_fp_model

    before = torch.utils.deterministic.fill_uninitialized_memory, torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # torch.empty is NaN: garbage shows
    try:
        model, _, _ = load_fp_model(str(remote_dir), trust_remote_code=True)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = before[0]
        torch.use_deterministic_algorithms(before[1])
    attn = model.model.layers[0].self_attn
    torch.testing.assert_close(attn.inv_freq, models.cogvlm2.rope_inv_freq(attn.head_dim))
