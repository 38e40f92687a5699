"""GPTQ checkpoints: bit-exact round trips, loadable models, exact metadata, atomic writes, clear errors.

Tiny Llama (tied embeddings) and OPT (biases) models are built from configs and quantized with the
real quantizer on random-input Hessians, so everything runs offline in a few seconds.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import gptq_format.writer as ckpt_mod
from gptq_format import CheckpointError, QuantizedCheckpoint, load_quantized_state, save_quantized
from models.dequantized import dequantized_model
from quantizer.config import GPTQConfig, GridConfig
from quantizer.layer import quantize_weight

from .checkpoint_cases import (  # noqa: F401 (fixtures `llama`, `quantized`)
    BASE,
    CASES,
    Q_PROJ,
    assert_same_weights,
    leftovers,
    llama_fixture,
    quantized_fixture,
    rewrite_tensors,
    with_zero_point_0,
)
from .quantized_models import logits, quantize_linears, substituted, tiny_llama, tiny_opt

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_exact(llama, quantized, tmp_path, case, fmt):
    qs = quantized(case)
    out = save_quantized(llama, qs, tmp_path / "ck", checkpoint_format=fmt)
    ck = load_quantized_state(out)
    assert isinstance(ck, QuantizedCheckpoint)
    assert_same_weights(ck.weights, qs)
    # Non-quantized tensors: everything else in the state_dict, in float16, tied lm_head written once.
    state = llama.state_dict()
    expected = {k for k in state if k.removesuffix(".weight") not in qs and k != "lm_head.weight"}
    assert set(ck.tensors) == expected
    for k in expected:
        assert ck.tensors[k].dtype == torch.float16
        assert torch.equal(ck.tensors[k], state[k].half())
    assert ck.quant["checkpoint_format"] == fmt


def test_packed_tensor_layout_on_disk(llama, quantized, tmp_path):
    qs = quantized("3bit")
    out = save_quantized(llama, qs, tmp_path / "ck", checkpoint_format="gptq_v2")
    raw = load_file(str(out / "model.safetensors"))
    for name in (Q_PROJ, "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        o, i = qs[name].shape
        assert raw[f"{name}.qweight"].dtype == torch.int32 and raw[f"{name}.qweight"].shape == (
            i * 3 // 32,
            o,
        )
        assert raw[f"{name}.qzeros"].dtype == torch.int32 and raw[f"{name}.qzeros"].shape == (
            i // 32,
            o * 3 // 32,
        )
        assert raw[f"{name}.scales"].dtype == torch.float16 and raw[f"{name}.scales"].shape == (i // 32, o)
        assert raw[f"{name}.g_idx"].dtype == torch.int32 and raw[f"{name}.g_idx"].shape == (i,)
        assert f"{name}.weight" not in raw
    assert "lm_head.weight" not in raw and "model.embed_tokens.weight" in raw


def test_v2_stores_zero_point_0_exactly(llama, quantized, tmp_path):
    qs = with_zero_point_0(quantized("g32"))
    ck = load_quantized_state(save_quantized(llama, qs, tmp_path / "ck", checkpoint_format="gptq_v2"))
    assert int(ck.weights[Q_PROJ].zeros[0, 0]) == 0
    assert_same_weights(ck.weights, qs)


def test_sharded_checkpoint_reads_back_identically(llama, quantized, tmp_path):
    qs = quantized("act_order")
    single = load_quantized_state(save_quantized(llama, qs, tmp_path / "one"))
    out = save_quantized(llama, qs, tmp_path / "many", max_shard_bytes=16_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    sharded = load_quantized_state(out)
    assert_same_weights(sharded.weights, single.weights)
    assert sorted(sharded.tensors) == sorted(single.tensors)
    assert all(torch.equal(sharded.tensors[k], single.tensors[k]) for k in single.tensors)
    on_disk = {k: s for s in shards for k in load_file(str(out / s))}
    assert on_disk == index["weight_map"]  # the index lists every tensor, in the shard that holds it


# --------------------------------------------------------------------------- loadable models


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantized_llama_matches_in_memory_model(llama, quantized, tmp_path, dtype):
    qs = quantized("act_order")
    out = save_quantized(llama, qs, tmp_path / "ck", dtype=dtype)
    model = dequantized_model(out)
    assert not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert torch.equal(logits(model), logits(substituted(llama, qs, dtype)))


def test_dequantized_opt_with_biases_matches_in_memory_model(tmp_path):
    opt = tiny_opt()
    qs = quantize_linears(opt, BASE)
    assert len(qs) == 12
    out = save_quantized(opt, qs, tmp_path / "ck", checkpoint_format="gptq", dtype=torch.float32)
    raw = load_file(str(out / "model.safetensors"))
    bias = "model.decoder.layers.0.fc1.bias"
    assert raw[bias].dtype == torch.float32 and torch.equal(raw[bias], opt.get_parameter(bias).detach())
    model = dequantized_model(out)
    assert torch.equal(logits(model), logits(substituted(opt, qs, torch.float32)))
    # and it really is the quantized model, not the original one
    assert not torch.allclose(logits(model), logits(opt), atol=1e-3)


def test_dequantized_model_reports_missing_tensor(llama, quantized, tmp_path):
    out = save_quantized(llama, quantized("g32"), tmp_path / "ck")
    rewrite_tensors(out, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing \['model\.norm\.weight'\]"):
        dequantized_model(out)


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("case", ["g32", "act_order"])
def test_config_files(llama, quantized, tmp_path, case):
    meta = {"method": "gptq", "calibration": "unit-test", "rounds": 0}
    out = save_quantized(llama, quantized(case), tmp_path / "ck", checkpoint_format="gptq_v2", rpiq_meta=meta)
    config = json.loads((out / "config.json").read_text())
    expected = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "desc_act": case == "act_order",
        "sym": False,
        "checkpoint_format": "gptq_v2",
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"rpiq:{ckpt_mod._rpiq_version()}"]},
        "rpiq": meta,
    }
    assert config["quantization_config"] == expected
    assert json.loads((out / "quantize_config.json").read_text()) == expected
    assert config["dtype"] == config["torch_dtype"] == "float16"
    assert config["model_type"] == "llama" and config["hidden_size"] == 64 and config["tie_word_embeddings"]
    assert (out / "generation_config.json").is_file()


def test_static_groups_recorded_and_desc_act_false(llama, tmp_path):
    cfg = BASE.model_copy(update={"gptq": GPTQConfig(act_order=True, static_groups=True, percdamp=0.05)})
    qs = {n: qw for n, qw in quantize_linears(tiny_llama(layers=1), cfg).items() if "self_attn" in n}
    out = save_quantized(tiny_llama(layers=1), qs, tmp_path / "ck", quant_config=cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["desc_act"], qc["static_groups"], qc["damp_percent"]) == (False, True, 0.05)
    assert qc["checkpoint_format"] == "gptq"


def test_tokenizer_is_copied(llama, quantized, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(256)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab=vocab, unk_token="<0>")),
        unk_token="<0>",
        bos_token="<1>",
        eos_token="<2>",
    )
    out = save_quantized(llama, quantized("g32"), tmp_path / "ck", tokenizer=tok)
    back = AutoTokenizer.from_pretrained(str(out))
    assert len(back) == 256 and back.convert_tokens_to_ids("<7>") == 7


# --------------------------------------------------------------------------- atomic writes


def _fail_on_second_shard(monkeypatch):
    calls = {"n": 0}
    real = ckpt_mod._write_shard

    def flaky(path, tensors):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        real(path, tensors)

    monkeypatch.setattr(ckpt_mod, "_write_shard", flaky)
    return calls


def test_failed_write_leaves_no_output_dir(llama, quantized, tmp_path, monkeypatch):
    calls = _fail_on_second_shard(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(llama, quantized("g32"), tmp_path / "ck", max_shard_bytes=16_000)
    assert calls["n"] == 2
    assert not (tmp_path / "ck").exists()
    assert leftovers(tmp_path) == []


def test_failed_write_leaves_previous_checkpoint_unchanged(llama, quantized, tmp_path, monkeypatch):
    out = save_quantized(llama, quantized("g32"), tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_on_second_shard(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(llama, quantized("act_order"), out, max_shard_bytes=16_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_whole_checkpoint(llama, quantized, tmp_path):
    out = save_quantized(llama, quantized("g32"), tmp_path / "ck", max_shard_bytes=16_000)
    assert (out / "model.safetensors.index.json").exists()
    save_quantized(llama, quantized("act_order"), out)
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]  # stale shards gone
    assert_same_weights(load_quantized_state(out).weights, quantized("act_order"))
    assert leftovers(tmp_path) == []


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(llama, quantized, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        save_quantized(llama, quantized("g32"), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- save-time validation


def test_v1_rejects_zero_point_0(llama, quantized, tmp_path):
    with pytest.raises(ValueError, match=r"q_proj.*GridConfig\(min_zero=1\).*gptq_v2"):
        save_quantized(llama, with_zero_point_0(quantized("g32")), tmp_path / "ck", checkpoint_format="gptq")
    assert not (tmp_path / "ck").exists()


def test_group_size_not_dividing_in_features_leaves_a_shorter_last_group(llama, quantized, tmp_path):
    """GPTQ loaders allocate ceil(in_features / group_size) groups; so do we."""
    qs = quantized("partial_group")
    assert qs[Q_PROJ].scales.shape[0] == 1  # 64 inputs, one (short) group of 128
    back = load_quantized_state(save_quantized(llama, qs, tmp_path / "ck", checkpoint_format="gptq_v2"))
    assert_same_weights(back.weights, qs)


def test_in_features_must_fill_3bit_blocks(tmp_path):
    model = tiny_llama(layers=1, hidden=48)
    cfg = BASE.model_copy(update={"grid": GridConfig(bits=3, group_size=-1, min_zero=1)})
    X = torch.randn(128, 48)
    qw, _ = quantize_weight(model.get_submodule(Q_PROJ).weight.detach(), 2.0 / 128 * X.t() @ X, cfg)
    with pytest.raises(ValueError, match=r"q_proj \(out_features=48, in_features=48\).*multiple of 32"):
        save_quantized(model, {Q_PROJ: qw}, tmp_path / "ck")


def test_save_rejects_mixed_grids_and_non_fp16_scales(llama, quantized, tmp_path):
    mixed = {**quantized("g32"), Q_PROJ: quantized("3bit")[Q_PROJ]}
    with pytest.raises(ValueError, match="must share bits"):
        save_quantized(llama, mixed, tmp_path / "ck")
    qw = quantized("g32")[Q_PROJ]
    bad = {Q_PROJ: replace(qw, scales=qw.scales + 1e-7)}
    with pytest.raises(ValueError, match="float16"):
        save_quantized(llama, bad, tmp_path / "ck")
    with pytest.raises(ValueError, match="no such module"):
        save_quantized(llama, {"model.layers.9.mlp": qw}, tmp_path / "ck")
    X = torch.randn(128, 64)
    head, _ = quantize_weight(llama.lm_head.weight.detach(), 2.0 / 128 * X.t() @ X, BASE)
    with pytest.raises(ValueError, match=r"lm_head: its weight is tied to \['model.embed_tokens.weight'\]"):
        save_quantized(llama, {"lm_head": head}, tmp_path / "ck")
