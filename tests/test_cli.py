"""The `rpiq` command line, end to end on a small local model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from gptq_format import load_quantized_state
from rpiq.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, default_model_dir):
    """A 2-layer Llama with the embedded model's real tokenizer, saved like any local model."""
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=96,  # with --group-size 64: groups of 64 + 32, a short last group as on real models
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("small") / "small-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _json_tail(output: str) -> dict:
    return json.loads(output[output.index("{") :])


def test_quantize_then_eval_a_checkpoint(small_model_dir, tmp_path):
    out = tmp_path / "q"
    # A recipe turns stage 2's ridge off, so its layer loss never ends above GPTQ's (asserted below).
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"refine": {"percdamp": 0.0}}))
    args = [
        "quantize", str(small_model_dir), "--out", str(out), "--recipe", str(recipe), "--method", "rpiq",
        "--bits", "4", "--group-size", "64", "--nsamples", "4", "--seqlen", "64", "--eval", "heldout",
        "--eval-seqlen", "64", "--eval-windows", "2", "--no-progress",
    ]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    report = _json_tail(res.output)
    assert report["ppl_fp"] > 1 and report["ppl_quantized"] > 1
    assert report["size_checkpoint_bytes"] < report["size_fp16_bytes"]
    ckpt = load_quantized_state(out)
    assert ckpt.quant["bits"] == 4 and ckpt.quant["group_size"] == 64
    assert ckpt.weights["model.layers.0.mlp.down_proj"].scales.shape == (3, 96)  # 160 inputs: 64 + 64 + 32
    assert ckpt.quant["checkpoint_format"] == "gptq_v2"
    assert len(ckpt.weights) == 14  # 7 linears x 2 layers
    assert not (tmp_path / "q.rpiq-state").exists()  # resume state removed after success
    layers = json.loads((out / "rpiq_layers.json").read_text())
    assert all(r["loss_final"] <= r["loss_gptq"] * (1 + 1e-6) for r in layers)

    # `rpiq eval` on the checkpoint measures the same model the quantizer left in memory.
    res = runner.invoke(app, ["eval", str(out), "--ppl", "heldout", "--seqlen", "64", "--max-windows", "2"])
    assert res.exit_code == 0, res.output
    assert _json_tail(res.output)["ppl"] == pytest.approx(report["ppl_quantized"], rel=1e-3)

    # ... and on the int4 kernels it is served with: bf16 activations, nearly the same perplexity.
    res = runner.invoke(app, ["eval", str(out), "--seqlen", "64", "--max-windows", "2", "--kernel", "auto"])
    assert res.exit_code == 0, res.output
    int4 = _json_tail(res.output)
    assert int4["kernels"] == {"tinygemm-cpu": 14}
    assert int4["ppl"] == pytest.approx(report["ppl_quantized"], rel=2e-2)

    res = runner.invoke(app, ["generate", "Hello", "-m", str(out), "--max-new-tokens", "5", "--no-stream"])
    assert res.exit_code == 0, res.output
    assert "5 tokens in" in res.output and "hit --max-new-tokens" in res.output
    assert "'tinygemm-cpu': 14" in res.output


def test_quantize_lm_head_then_run_it_on_int4(small_model_dir, tmp_path):
    out = tmp_path / "q"
    args = [
        "quantize", str(small_model_dir), "--out", str(out), "--method", "gptq", "--group-size", "32",
        "--nsamples", "2", "--seqlen", "32", "--quantize-lm-head", "--no-progress",
    ]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    ckpt = load_quantized_state(out)
    assert "lm_head" in ckpt.weights and ckpt.quant["lm_head"] is True
    assert "model.embed_tokens.weight" in ckpt.tensors and "lm_head.weight" not in ckpt.tensors
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    res = runner.invoke(app, ["eval", str(out), "--seqlen", "32", "--max-windows", "2", "--kernel", "auto"])
    assert res.exit_code == 0, res.output
    assert _json_tail(res.output)["kernels"] == {"tinygemm-cpu": 15}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "hi", "-m", "/no/such/dir"], "no such model directory"),
        (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "hi", "--device", "tpu"], "use cpu or cuda"),
        (["eval", "--kernel", "fast"], "--kernel 'fast' is not one of"),
    ],
)
def test_bad_inference_options(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "5"], "bits=5 is not supported"),
        (["--group-size", "0"], "group_size=0 is invalid"),
        (["--calib-data", "/no/such/file.txt"], "neither a built-in name"),
        (["--seqlen", "1000000"], "tokens"),
        (["--save-dtype", "int8"], "--save-dtype"),
        (["--offload-hessians"], "offload_hessians applies to single-instance"),
        (["--hessian-budget-mib", "64"], "hessian_budget_mib applies to single-instance"),
        (["--calib", "single-instance", "--hessian-budget-mib", "0"], "greater than 0"),
    ],
)
def test_bad_options_give_a_clear_message_not_a_traceback(small_model_dir, tmp_path, args, message):
    res = runner.invoke(app, ["quantize", str(small_model_dir), "--out", str(tmp_path / "x"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


def test_missing_model_directory(tmp_path):
    res = runner.invoke(app, ["quantize", str(tmp_path), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "no config.json" in res.output


def test_bench_lists_runs_and_refuses_benchmarks():
    res = runner.invoke(app, ["bench"])
    assert res.exit_code == 0
    names = {line.split()[0] for line in res.output.splitlines() if line.strip()}
    assert {"report", "decode", "layer_loss"} <= names and "memory" not in names  # memory.py is a helper
    res = runner.invoke(app, ["bench", "nope"])
    assert res.exit_code == 2
    assert "unknown benchmark 'nope'" in res.output and "report" in res.output


def test_bench_passes_options_through_and_keeps_the_exit_code(capfd):
    res = runner.invoke(app, ["bench", "report", "--no-such-option"])
    assert res.exit_code == 2  # argparse's usage error, from the child
    assert "unrecognized arguments: --no-such-option" in capfd.readouterr().err


def test_serve_refuses_to_expose_without_an_api_key(tmp_path):
    res = runner.invoke(app, ["serve", "--host", "0.0.0.0"], env={"RPIQ_API_KEY": ""})
    assert res.exit_code == 2
    assert "API key" in res.output
    res = runner.invoke(app, ["serve", str(tmp_path), "--port", "1"])
    assert res.exit_code == 2
    assert "no config.json" in res.output


def test_help_lists_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for command in ("quantize", "eval", "generate", "serve", "bench"):
        assert command in res.output


def test_model_that_is_neither_a_directory_nor_cached(tmp_path):
    res = runner.invoke(app, ["quantize", "no-such-org/no-such-model", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "never downloads from a model hub" in res.output
    assert "Traceback" not in res.output
