"""Int4 inference: exact layouts, every kernel against the dequantizing reference, loading, generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptq_format import CheckpointError, QuantizedWeight, save_quantized
from models.dequantized import dequantized_model
from models.int4 import (
    KERNELS,
    DequantLinear,
    KernelUnavailableError,
    QuantLinear,
    kernel_for,
    load_quantized,
    model_weight_bytes,
    quantize_linears_in_place,
)
from models.int4.layout import LayoutError, dequantize_layout, tinygemm_layout
from quantizer.config import GPTQConfig, GridConfig, quant_config
from quantizer.layer import quantize_weight

from .layers import realistic_layer
from .quantized_models import logits, quantize_linears, tiny_llama, tiny_opt

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def quantized_layer(out: int, inp: int, *, bits: int = 4, group: int = 128, act_order: bool = False, sym=False):
    layer = realistic_layer(out, inp, tokens=256, seed=out + inp)
    cfg = quant_config(
        "gptq",
        grid=GridConfig(bits=bits, group_size=group, sym=sym),
        gptq=GPTQConfig(act_order=act_order),
    )
    qw, _ = quantize_weight(layer.W, layer.H, cfg)
    return qw


# Odd shapes on purpose: rows not a multiple of 16 (padding), a last group shorter than the rest,
# per-channel grids, act-order permutations, symmetric grids.
LAYER_CASES = {
    "g32": dict(out=48, inp=96, group=32),
    "g64_act_order": dict(out=64, inp=192, group=64, act_order=True),
    "g128_partial_last_group": dict(out=40, inp=200, group=128),
    "g128_act_order_partial": dict(out=72, inp=200, group=128, act_order=True),
    "per_channel": dict(out=32, inp=100, group=-1),
    "g512_as_256": dict(out=16, inp=1024, group=512),
    "sym": dict(out=32, inp=128, group=32, sym=True),
}


@pytest.fixture(scope="module", params=list(LAYER_CASES))
def case(request) -> tuple[str, QuantizedWeight]:
    return request.param, quantized_layer(**LAYER_CASES[request.param])


def reference(qw: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    return x.float() @ qw.dequantize().t()


# --------------------------------------------------------------------------- layout


def test_tinygemm_layout_is_exact(case):
    _, qw = case
    layout = tinygemm_layout(qw)
    assert layout.out_padded % 16 == 0 and layout.in_padded % layout.group == 0
    torch.testing.assert_close(dequantize_layout(layout), qw.dequantize(), rtol=1e-6, atol=1e-7)


def test_act_order_layout_permutes_columns(case):
    name, qw = case
    layout = tinygemm_layout(qw)
    assert (layout.perm is not None) == ("act_order" in name)


def test_layout_refuses_what_it_cannot_represent_exactly():
    with pytest.raises(LayoutError, match="4-bit only"):
        tinygemm_layout(quantized_layer(32, 64, bits=3, group=32))
    with pytest.raises(LayoutError, match="not a multiple of 32"):
        tinygemm_layout(quantized_layer(32, 64, group=16))


# --------------------------------------------------------------------------- kernels vs reference


def _check_kernel(kernel: str, qw: QuantizedWeight, device: torch.device) -> None:
    torch.manual_seed(0)
    bias = torch.randn(qw.shape[0])
    layer = KERNELS[kernel].from_weight(qw, bias, device, torch.float32)
    for batch in ((1, qw.shape[1]), (3, 5, qw.shape[1])):  # GEMV and a batched prefill
        x = torch.randn(*batch)
        want = reference(qw, x.reshape(-1, qw.shape[1])).reshape(*batch[:-1], -1) + bias
        got = layer(x.to(device)).cpu()
        assert got.shape == want.shape and got.dtype == torch.float32
        # bf16 activations and bf16 scales/zeros: ~3 significant digits.
        err = (got - want).norm() / want.norm()
        assert err < 1e-2, (kernel, float(err))


def test_dequant_reference_matches_dequantized_weights(case):
    _check_kernel("dequant", case[1], CPU)
    layer = DequantLinear.from_weight(case[1], None, CPU, torch.float32)
    assert torch.equal(layer.dequantized_weight(), case[1].dequantize())


def test_tinygemm_cpu_matches_reference(case):
    _check_kernel("tinygemm-cpu", case[1], CPU)


@pytest.mark.cuda
def test_tinygemm_cuda_matches_reference(case):
    _check_kernel("tinygemm-cuda", case[1], CUDA)


@pytest.mark.cuda
def test_dequant_on_cuda_matches_reference(case):
    _check_kernel("dequant", case[1], CUDA)


def test_tinygemm_cpu_stores_about_half_a_byte_per_weight():
    qw = quantized_layer(256, 512, group=128)
    layer = KERNELS["tinygemm-cpu"].from_weight(qw, None, CPU, torch.float32)
    codes_bytes = 256 * 512 // 2
    assert codes_bytes <= layer.weight_bytes() <= 1.1 * codes_bytes  # + bf16 scale and zero per group
    assert layer.weight_bytes() < 0.3 * 256 * 512 * 2  # well under 30 % of the fp16 weight


# --------------------------------------------------------------------------- kernel selection


def test_auto_picks_tinygemm_on_cpu_and_falls_back_to_the_reference():
    assert kernel_for("auto", quantized_layer(32, 128), CPU).kernel == "tinygemm-cpu"
    assert kernel_for("auto", quantized_layer(32, 128, bits=3, group=32), CPU).kernel == "dequant"
    assert kernel_for("auto", quantized_layer(32, 128, group=16), CPU).kernel == "dequant"


def test_auto_times_the_fast_kernels_where_several_fit_and_caches_the_choice(monkeypatch):
    """Where several fast kernels can take a layer (CUDA: GemLite and tinygemm), `auto` keeps the one measured
    fastest on that shape. On this CPU: two CPU kernels made candidates, timings from a fake clock."""
    from models.int4 import autotune
    from models.int4.linear import _AUTO_ORDER, TinygemmCPULinear

    class SlowTinygemm(TinygemmCPULinear):
        kernel = "slow-tinygemm"

    monkeypatch.setitem(KERNELS, "slow-tinygemm", SlowTinygemm)
    monkeypatch.setitem(_AUTO_ORDER, "cpu", ("slow-tinygemm", "tinygemm-cpu"))
    timed: list[str] = []

    def fake_seconds(layer, x):
        timed.append(type(layer).kernel)
        assert x.shape == (1, layer.in_features) and x.dtype == torch.bfloat16
        return {"slow-tinygemm": 2.0, "tinygemm-cpu": 1.0}[type(layer).kernel]

    monkeypatch.setattr(autotune, "seconds_per_call", fake_seconds)
    autotune.clear_cache()
    assert kernel_for("auto", quantized_layer(32, 128), CPU) is TinygemmCPULinear
    assert kernel_for("auto", quantized_layer(32, 128), CPU) is TinygemmCPULinear  # same shape: cached
    assert timed == ["slow-tinygemm", "tinygemm-cpu"]
    assert kernel_for("auto", quantized_layer(64, 128), CPU) is TinygemmCPULinear  # a new shape is timed
    assert len(timed) == 4
    # the dequantizing reference is never timed against fast kernels, and a 3-bit layer (no fast kernel) takes it
    assert kernel_for("auto", quantized_layer(32, 128, bits=3, group=32), CPU).kernel == "dequant"
    assert len(timed) == 4
    autotune.clear_cache()


def test_explicit_kernel_that_cannot_run_says_why():
    qw3 = quantized_layer(32, 128, bits=3, group=32)
    with pytest.raises(KernelUnavailableError, match="4-bit only"):
        kernel_for("tinygemm-cpu", qw3, CPU)
    with pytest.raises(KernelUnavailableError, match="runs on cuda, not cpu"):
        kernel_for("tinygemm-cuda", quantized_layer(32, 128), CPU)
    with pytest.raises(KernelUnavailableError, match="unknown kernel 'marlin'"):
        kernel_for("marlin", qw3, CPU)
    with pytest.raises(KernelUnavailableError, match="device 'mps'"):
        kernel_for("auto", qw3, "mps")


# --------------------------------------------------------------------------- whole models

CFG = quant_config("gptq", grid=GridConfig(bits=4, group_size=32))


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory) -> tuple[torch.nn.Module, dict[str, QuantizedWeight], Path]:
    model = tiny_llama()
    weights = quantize_linears(model, CFG)
    out = tmp_path_factory.mktemp("int4") / "llama"
    save_quantized(model, weights, out, quant_config=CFG, dtype=torch.float32, checkpoint_format="gptq_v2")
    return model, weights, out


def _in_memory_int4(model: torch.nn.Module, weights, kernel: str = "auto") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # Built in bf16 rather than cast to it, as a loader does: `.to(bf16)` would also round the
    # rotary inv_freq buffer, which transformers keeps in fp32.
    m = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
    m.load_state_dict(model.state_dict())
    used = quantize_linears_in_place(m, weights, kernel=kernel)
    assert sum(used.values()) == len(weights)
    return m.eval()


@pytest.mark.parametrize("kernel", ["tinygemm-cpu", "dequant"])
def test_loaded_checkpoint_gives_the_in_memory_int4_logits(llama_ckpt, kernel):
    model, weights, path = llama_ckpt
    loaded = load_quantized(path, kernel=kernel)
    assert loaded.int4_kernels == {kernel: len(weights)}
    assert all(isinstance(loaded.get_submodule(n), QuantLinear) for n in weights)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # ties restored
    torch.testing.assert_close(logits(loaded), logits(_in_memory_int4(model, weights, kernel)), rtol=0, atol=0)


def test_int4_logits_match_the_dequantized_checkpoint(llama_ckpt):
    _, _, path = llama_ckpt
    want = logits(dequantized_model(path))
    got = logits(load_quantized(path))
    err = (got - want).norm() / want.norm()
    assert err < 2e-2, float(err)  # bf16 activations through two decoder layers


@pytest.mark.cuda
def test_checkpoint_loads_on_cuda_with_an_int4_kernel_and_generates(llama_ckpt):
    _, weights, path = llama_ckpt
    loaded = load_quantized(path, device="cuda")
    # `auto` takes gemlite where it is installed (the `gpu` extra), tinygemm-cuda otherwise: never dequant.
    assert sum(loaded.int4_kernels.values()) == len(weights)
    assert set(loaded.int4_kernels) <= {"gemlite", "tinygemm-cuda"}, loaded.int4_kernels
    want = logits(dequantized_model(path))
    got = logits(loaded)
    err = (got - want).norm() / want.norm()
    assert err < 2e-2, float(err)
    ids = torch.tensor([[1, 5, 9, 2]], device="cuda")
    first = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert first.shape[1] > ids.shape[1] and torch.equal(first, loaded.generate(ids, max_new_tokens=6, do_sample=False))


def test_opt_biases_survive_int4_loading(tmp_path):
    model = tiny_opt()
    weights = quantize_linears(model, CFG)
    save_quantized(model, weights, tmp_path / "opt", quant_config=CFG, dtype=torch.float32, checkpoint_format="gptq_v2")
    loaded = load_quantized(tmp_path / "opt", dtype=torch.float32)
    q_proj = "model.decoder.layers.0.self_attn.q_proj"
    bias = loaded.get_submodule(q_proj).bias
    assert bias is not None and torch.equal(bias, model.get_submodule(q_proj).bias)
    want = logits(dequantized_model(tmp_path / "opt"))
    err = (logits(loaded) - want).norm() / want.norm()
    assert err < 2e-2, float(err)


def test_int4_model_keeps_no_full_precision_copy(llama_ckpt):
    model, weights, path = llama_ckpt
    loaded = load_quantized(path)
    names = {n for n, _ in loaded.named_parameters()}
    assert not any(f"{w}.weight" in names for w in weights)
    quantized_params = sum(model.get_submodule(n).weight.numel() for n in weights)
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())  # the tied embedding counted once
    int4_bytes = model_weight_bytes(loaded)
    # Embeddings and norms stay bf16; a quantized weight costs 0.5 byte + 4 bytes of bf16 scale
    # and zero per group of 32 (0.625 byte) instead of 2.
    assert int4_bytes < fp16_bytes - 1.3 * quantized_params, (int4_bytes, fp16_bytes)


def test_generate_with_int4_model_is_greedy_deterministic_and_stops_on_eos(llama_ckpt):
    model, weights, path = llama_ckpt
    loaded = load_quantized(path)
    ids = torch.tensor([[1, 5, 9, 42]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = loaded.generate(ids, **kw)
    assert out.shape == (1, 10)
    same = _in_memory_int4(model, weights).generate(ids, **kw)
    assert torch.equal(out, same)
    # EOS = the first generated token: generation stops right after it.
    stopped = loaded.generate(ids, eos_token_id=int(out[0, 4]), **kw)
    assert stopped.shape == (1, 5)
    sampled = loaded.generate(ids, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=0.8, pad_token_id=0)
    assert sampled.shape[1] <= 10 and torch.equal(sampled[:, :4], ids)


# --------------------------------------------------------------------------- bad checkpoints


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_quantized(tmp_path / "nope")


def broken_copy(llama_ckpt, tmp_path: Path, config: dict | None = None) -> Path:
    """A copy of the checkpoint to damage, with `config` merged into its config.json."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_ckpt[2], bad)
    if config:
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, **config}))
    return bad


def test_truncated_checkpoint_names_the_file(llama_ckpt, tmp_path):
    bad = broken_copy(llama_ckpt, tmp_path)
    f = bad / "model.safetensors"
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"bad/model\.safetensors: corrupt or truncated"):
        load_quantized(bad)


def test_config_that_does_not_match_the_tensors(llama_ckpt, tmp_path):
    bad = broken_copy(llama_ckpt, tmp_path, {"intermediate_size": 96})
    with pytest.raises(
        CheckpointError, match=r"module 'model\.layers\.0\.mlp\.\w+_proj' is \[\d+, \d+\] in the checkpoint"
    ):
        load_quantized(bad)


def test_missing_plain_tensor_is_named(llama_ckpt, tmp_path):
    f = broken_copy(llama_ckpt, tmp_path) / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.norm.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: \['model\.norm\.weight'\]"):
        load_quantized(f.parent)


def test_quantized_module_missing_from_the_model_is_named(llama_ckpt, tmp_path):
    bad = broken_copy(llama_ckpt, tmp_path, {"num_hidden_layers": 1})
    with pytest.raises(CheckpointError, match=r"quantized module 'model\.layers\.1\.[\w.]+' does not exist"):
        load_quantized(bad)
