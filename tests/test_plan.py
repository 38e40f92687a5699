"""`rpiq plan`: component costs from configs, checked against a real checkpoint's bytes."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from gptq_format import save_quantized
from models.cogvlm2 import CogVLM2Config
from quantizer.config import GridConfig, quant_config
from quantizer.pipeline import quantize_model
from quantizer.vlm_calibration import builtin_samples
from rpiq.cli import app
from rpiq.plan import EXPERTS, LANGUAGE, VISION_LINEARS, load_config, meta_model, plan_model, quantized_linear_bytes
from tests.tiny_vlms import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cogvlm2_plan():
    config, name = load_config("cogvlm2")
    return plan_model(meta_model(config), name)


def test_cogvlm2_parameter_counts_follow_from_the_config(cogvlm2_plan):
    c = CogVLM2Config()
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    qkv = h + 2 * (h // c.num_attention_heads) * c.num_multi_query_heads  # GQA
    per_expert = h * qkv + h * h + 3 * h * i
    comps = cogvlm2_plan.components
    assert comps[LANGUAGE].params == layers * per_expert
    assert comps[EXPERTS].params == layers * (per_expert + qkv)  # the visual QKV has a bias
    v = c.vision_config
    vh, vi = v["hidden_size"], v["intermediate_size"]
    assert comps[VISION_LINEARS].params == v["num_hidden_layers"] * (4 * vh * vh + 4 * vh + 2 * vh * vi + vi + vh)
    assert 19.4e9 < cogvlm2_plan.total_params() < 19.6e9  # "19B"


def test_cogvlm2_reduction_against_the_papers_claim(cogvlm2_plan):
    assert cogvlm2_plan.reduction() == pytest.approx(0.530, abs=0.002)  # language tower incl. experts
    assert cogvlm2_plan.reduction(vision=True) == pytest.approx(0.692, abs=0.002)  # inside 60-75 %


def test_plan_bytes_equal_a_written_checkpoint(tmp_path):
    """The cost model is the GPTQ format itself: same bytes as the tensors save_quantized writes."""
    vlm = FAMILIES["llava"]()
    cfg = quant_config("rtn", grid=GridConfig(bits=4, group_size=32))
    result = quantize_model(vlm.model, vlm.inputs(builtin_samples(1, size=(64, 48))), cfg, progress=False)
    out = save_quantized(vlm.model, result.weights, tmp_path / "ckpt", checkpoint_format="gptq_v2")
    written = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            t = f.get_tensor(key)
            written += t.numel() * t.element_size()
    plan = plan_model(vlm.model, "tiny llava", bits=4, group_size=32)
    assert plan.quantized_bytes() == written
    assert plan.fp16_bytes() == 2 * sum(p.numel() for p in vlm.model.parameters())


def test_quantized_linear_bytes():
    # 4096 x 4096, g128: codes 8 MiB, 32 groups x 4096 rows of fp16 scales and 4-bit zeros, g_idx
    assert quantized_linear_bytes(4096, 4096, 4, 128, bias=False) == 4096 * 4096 // 2 + 32 * 4096 * 2.5 + 4096 * 4
    assert quantized_linear_bytes(64, 32, 4, -1, bias=True) == 32 * 64 // 2 + 64 // 2 + 64 * 2 + 32 * 4 + 64 * 2


def test_cli_plan_prints_the_table_and_the_verdict():
    result = CliRunner().invoke(app, ["plan", "cogvlm2"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "visual experts" in text
    assert "reduction 53.0 % (below the paper's 60-75 %)" in text
    assert "reduction 69.2 % (within the paper's 60-75 %)" in text
    bad = CliRunner().invoke(app, ["plan", "/nonexistent"])
    assert bad.exit_code == 2


def test_plan_reads_a_config_directory(tmp_path):
    CogVLM2Config(num_hidden_layers=2).save_pretrained(tmp_path)
    config, _ = load_config(str(tmp_path))
    plan = plan_model(meta_model(config), "two layers")
    assert plan.components[LANGUAGE].params * 16 == pytest.approx(
        plan_model(meta_model(CogVLM2Config()), "full").components[LANGUAGE].params, rel=0
    )
    assert torch.tensor(plan.reduction()).item() > 0


def test_calibration_memory_compares_the_modes_from_shapes():
    """LLaMA-7B's numbers: a 16-bit stream of 128 x 2048 tokens is 2 GiB; the Hessian bound is
    six 4096-wide matrices and one 11008-wide per layer, 32 layers (the planner's upper bound)."""
    from transformers import LlamaConfig

    from rpiq.plan import calibration_memory

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    mem = calibration_memory(meta_model(config), nsamples=128, seqlen=2048)
    assert mem.tokens == 128 * 2048
    assert mem.stream_bytes == 128 * 2048 * 4096 * 2 == 2 * 2**30
    per_layer = (6 * 4096**2 + 11008**2) * 4
    assert mem.largest_layer_bytes == per_layer
    assert mem.hessian_bytes == 32 * per_layer  # about 26 GiB: more than ten streams


def test_cli_plan_prints_the_calibration_memory_of_both_modes():
    result = CliRunner().invoke(app, ["plan", "cogvlm2", "--nsamples", "64", "--seqlen", "1024"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "calibration on 64 x 1024 tokens" in text
    assert "sequential keeps 0.50 GiB of hidden states per stream" in text  # 65536 x 4096 x 2 B
    assert "single-instance keeps up to 65.00 GiB of float32 Hessians" in text
