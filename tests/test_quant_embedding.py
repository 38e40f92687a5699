"""Int8 token embeddings (and the LM head tied to them): format, checkpoint round trip, int8 loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from gptq_format import CheckpointError, load_quantized_state, open_checkpoint, save_quantized
from gptq_format.embedding import Int8Rows, quantize_embeddings, quantize_rows
from models.dequantized import dequantized_model
from models.int4 import QuantEmbedding, QuantTiedHead, load_quantized, model_weight_bytes
from models.int4 import embedding as int8_embedding
from quantizer.config import GridConfig, quant_config
from tests.checkpoint_cases import rewrite_tensors
from tests.quantized_models import logits, quantize_linears, tiny_llama
from tests.tiny_models import tiny_model

CFG = quant_config("gptq", grid=GridConfig(bits=4, group_size=32))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


# --------------------------------------------------------------------------- the row format


def test_rows_are_symmetric_int8_with_fp16_scales_within_half_a_step():
    w = torch.randn(300, 96) * torch.rand(300, 1)
    w[7] = 0.0  # an all-zero row must not divide by zero
    rows = quantize_rows(w)
    assert rows.qweight.dtype == torch.int8 and int(rows.qweight.abs().max()) == 127
    assert torch.equal(rows.scales.half().float(), rows.scales) and bool((rows.scales > 0).all())
    assert not rows.qweight[7].any()
    err = (rows.dequantize() - w).abs()
    assert bool((err <= rows.scales[:, None] / 2 * (1 + 1e-3)).all())


def test_quantizing_the_dequantized_table_again_is_the_identity():
    rows = quantize_rows(torch.randn(64, 32))
    again = quantize_rows(rows.dequantize())
    assert torch.equal(again.qweight, rows.qweight) and torch.equal(again.scales, rows.scales)


def test_unsupported_bits_and_tables_are_refused():
    with pytest.raises(ValueError, match="bits=4"):
        quantize_rows(torch.randn(4, 4), bits=4)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="embeddings"):
        GridConfig(embeddings="int3")


# --------------------------------------------------------------------------- checkpoints


def _save(model, out: Path, int8: bool) -> dict[str, Int8Rows]:
    embeddings = quantize_embeddings(model) if int8 else {}
    weights = quantize_linears(model, CFG)
    save_quantized(
        model, weights, out, quant_config=CFG, dtype=torch.float32, checkpoint_format="gptq_v2", embeddings=embeddings
    )
    return embeddings


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[torch.nn.Module, dict[str, Int8Rows], Path, Path]:
    """A tiny tied Llama saved twice from the same weights: fp embeddings, and int8 embeddings."""
    root = tmp_path_factory.mktemp("int8emb")
    fp_model = tiny_llama()
    _save(fp_model, root / "fp", int8=False)
    int8_model = tiny_llama()
    rows = _save(int8_model, root / "int8", int8=True)
    return fp_model, rows, root / "fp", root / "int8"


def test_int8_embeddings_round_trip_bit_exactly(ckpts):
    _, rows, _, path = ckpts
    stream = open_checkpoint(path)
    assert stream.embedding_names == ["model.embed_tokens"]
    assert stream.tied_heads == {"lm_head": "model.embed_tokens"}
    assert stream.quant["rpiq"]["embeddings"]["bits"] == 8
    back = load_quantized_state(path)
    got = back.embeddings["model.embed_tokens"]
    want = rows["model.embed_tokens"]
    assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)
    # The dequantized view that plain-model loaders use is the in-memory table, exactly.
    assert torch.equal(back.tensors["model.embed_tokens.weight"], want.dequantize())


def test_checkpoint_stores_the_table_once_and_only_as_int8(ckpts):
    _, _, _, path = ckpts
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.qweight_int8").dtype == torch.int8
        assert f.get_tensor("model.embed_tokens.scales_int8").dtype == torch.float16
    assert "model.embed_tokens.weight" not in keys and "lm_head.weight" not in keys


def test_missing_int8_tensor_is_named(ckpts, tmp_path):
    import shutil

    _, _, _, path = ckpts
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    rewrite_tensors(broken, lambda t: t.pop("model.embed_tokens.scales_int8"))
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.scales_int8"):
        load_quantized(broken)


# --------------------------------------------------------------------------- int8 at run time


def test_gather_matches_the_dequantized_table():
    rows = quantize_rows(torch.randn(100, 48))
    ids = torch.tensor([[0, 5, 99], [7, 7, 42]])
    ref = F.embedding(ids, rows.dequantize())
    emb32 = QuantEmbedding(rows, torch.device("cpu"), torch.float32, like=torch.nn.Embedding(100, 48))
    assert torch.equal(emb32(ids), ref)
    emb16 = QuantEmbedding(rows, torch.device("cpu"), torch.bfloat16, like=torch.nn.Embedding(100, 48))
    torch.testing.assert_close(emb16(ids), ref.bfloat16(), rtol=0, atol=0)  # one rounding of the exact row


@pytest.mark.parametrize(
    ("batch", "dtype"), [(1, torch.bfloat16), (3, torch.float16), (20, torch.bfloat16), (2, torch.float32)]
)
def test_tied_head_matmul_matches_the_dequantized_table(batch, dtype, monkeypatch):
    monkeypatch.setattr(int8_embedding, "CHUNK_ROWS", 48)  # several chunks, the last one short
    rows = quantize_rows(torch.randn(200, 64))
    x = torch.randn(batch, 64)
    want = x @ rows.dequantize().t()
    got = int8_embedding.int8_rows_matmul(x.to(dtype), rows.qweight, rows.scales)
    assert got.dtype == dtype and got.shape == want.shape
    assert _rel(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_int8_model_logits_are_close_to_the_fp_embedding_model(ckpts):
    _, _, fp_path, int8_path = ckpts
    loaded = load_quantized(int8_path, dtype=torch.float32)
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding) and isinstance(loaded.lm_head, QuantTiedHead)
    assert loaded.lm_head.embedding is loaded.model.embed_tokens
    got = logits(loaded)
    # The same int4 linears with the float embedding: only the int8 rounding of the table differs.
    assert _rel(got, logits(load_quantized(fp_path, dtype=torch.float32))) < 2e-2
    assert _rel(got, logits(dequantized_model(int8_path))) < 1e-2  # the plain-model reading agrees


def test_tied_gemma_scaled_embeddings_load_as_int8(tmp_path):
    model = tiny_model("gemma3")
    assert model.config.tie_word_embeddings
    _save(model, tmp_path / "gemma", int8=True)
    loaded = load_quantized(tmp_path / "gemma", dtype=torch.float32)
    assert isinstance(loaded.lm_head, QuantTiedHead) and loaded.model.embed_tokens.embed_scale == pytest.approx(8.0)
    assert _rel(logits(loaded), logits(dequantized_model(tmp_path / "gemma"))) < 1e-2


def test_loading_never_builds_a_full_precision_table(ckpts, monkeypatch):
    _, rows, fp_path, int8_path = ckpts

    def refuse(self, dtype=torch.float32):
        raise AssertionError("the int8 table was dequantized while loading")

    monkeypatch.setattr(Int8Rows, "dequantize", refuse)
    loaded = load_quantized(int8_path)
    vocab, hidden = rows["model.embed_tokens"].shape
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert not [t for t in tensors if t.is_floating_point() and t.numel() >= vocab * hidden]
    emb = loaded.model.embed_tokens
    assert {b.dtype for b in emb.buffers()} == {torch.int8, torch.float32}
    assert not list(loaded.lm_head.parameters()) and not list(loaded.lm_head.buffers())
    # One int8 table (+ scales) instead of a bf16 one: the saving is ~1 byte per entry.
    saved = model_weight_bytes(load_quantized(fp_path)) - model_weight_bytes(loaded)
    assert saved == vocab * hidden * 2 - emb.weight_bytes()


def test_quantize_model_carries_the_option_to_the_checkpoint(tmp_path):
    from quantizer.pipeline import quantize_model

    model = tiny_llama()
    cfg = quant_config("rtn", grid=GridConfig(bits=4, group_size=32, embeddings="int8"))
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    res = quantize_model(model, calib, cfg, progress=False)
    rows = res.embeddings["model.embed_tokens"]
    assert torch.equal(model.model.embed_tokens.weight, rows.dequantize())  # the model computes what is saved
    save_quantized(model, res.weights, tmp_path / "q", quant_config=cfg, embeddings=res.embeddings)
    assert open_checkpoint(tmp_path / "q").embedding_names == ["model.embed_tokens"]


def test_cli_flag_lands_in_the_grid_config():
    from typer.testing import CliRunner

    from rpiq.commands.quantize import build_config

    cfg = build_config(None, "gptq", grid={"embeddings": "int8", "bits": None})
    assert cfg.grid.embeddings == "int8" and build_config(None, "rpiq").grid.embeddings == "none"
    from rpiq.cli import app

    help_text = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "300"}).output
    assert "--quantize-embeddings" in help_text
