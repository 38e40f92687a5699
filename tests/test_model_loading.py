"""Weights that do not fit their config are errors, not a transformers warning followed by a quantized
model with random tensors: `load_fp_model` raises `ModelLoadError` naming the keys, `rpiq quantize` exits 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from models.loading import ModelLoadError, load_fp_model
from rpiq.cli import app

runner = CliRunner()
DROPPED = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, default_model_dir):
    """A tiny Qwen2 with tied embeddings (lm_head.weight is not in the file: that is fine)."""
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    path = tmp_path_factory.mktemp("qwen") / "tiny-qwen2"
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _variant(src, dst, *, model_type: str | None = None, drop: str | None = None, add: str | None = None):
    shutil.copytree(src, dst)
    if model_type is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["model_type"] = model_type
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop is not None or add is not None:
        state = load_file(dst / "model.safetensors")
        if drop is not None:
            del state[drop]
        if add is not None:
            state[add] = torch.zeros(3)
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_good_model_with_tied_weights_loads(qwen_dir):
    m, _tok, _where = load_fp_model(str(qwen_dir))
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_model_type_of_another_architecture_is_refused(qwen_dir, tmp_path):
    d = _variant(qwen_dir, tmp_path / "bert", model_type="bert")
    with pytest.raises(ModelLoadError, match=r"model_type 'bert'.*Qwen2ForCausalLM.*'qwen2'"):
        load_fp_model(str(d))


def test_a_missing_tensor_is_named(qwen_dir, tmp_path):
    d = _variant(qwen_dir, tmp_path / "missing", drop=DROPPED)
    with pytest.raises(ModelLoadError, match="missing") as e:
        load_fp_model(str(d))
    assert DROPPED in str(e.value)


def test_an_unexpected_tensor_is_named(qwen_dir, tmp_path):
    d = _variant(qwen_dir, tmp_path / "extra", add="model.layers.7.surprise.weight")
    with pytest.raises(ModelLoadError, match="unexpected") as e:
        load_fp_model(str(d))
    assert "model.layers.7.surprise.weight" in str(e.value)


@pytest.mark.parametrize("change", [{"model_type": "bert"}, {"drop": DROPPED}])
def test_quantize_exits_2_with_the_reason(qwen_dir, tmp_path, change):
    d = _variant(qwen_dir, tmp_path / "bad", **change)
    res = runner.invoke(app, ["quantize", str(d), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert ("model_type 'bert'" in text) if "model_type" in change else ("missing" in text)
    assert not (tmp_path / "out").exists()
