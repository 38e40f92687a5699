"""Qwen2.5-VL's vision tower: window- and full-attention blocks replayed with their own arguments,
quantized with `vision=True`, exported as GPTQ and reloaded on int4 kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gptq_format import save_quantized
from models.int4 import load_quantized
from models.int4.linear import QuantLinear
from quantizer.adapters import get_adapter
from quantizer.capture import capture_first_layer_inputs, run_layer
from quantizer.config import GPTQConfig, GridConfig, quant_config
from quantizer.pipeline import quantize_model
from quantizer.vlm_calibration import builtin_samples
from tests.tiny_vlms import qwen2_5_vl

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = quant_config("gptq", grid=GridConfig(bits=4, group_size=32), gptq=GPTQConfig(block_size=32))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return qwen2_5_vl()


@pytest.fixture(scope="module")
def batches(vlm):
    return vlm.inputs(builtin_samples(2, size=(64, 48)))


@pytest.fixture(scope="module")
def quantized(vlm, batches):
    """(full-precision copy, quantized model, quantization result): one GPTQ run of both towers."""
    fp = copy.deepcopy(vlm.model)
    model = copy.deepcopy(vlm.model)
    result = quantize_model(model, batches, CFG, progress=False, vision=True)
    return fp, model, result


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def _block_outputs(model: nn.Module, blocks: nn.ModuleList, batch: dict) -> list[torch.Tensor]:
    """What each vision block returns during the model's own forward."""
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _a, out: outs.append(out)) for b in blocks]
    try:
        _logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    assert len(outs) == len(blocks)
    return outs


def _tower_linears(model: nn.Module, adapter) -> set[str]:
    n = len(adapter.layers(model))
    return {f"{adapter.layers_path}.{i}.{name}" for i in range(n) for name in adapter.linear_names()}


def test_adapter_groups_match_the_vision_block_forward(vlm, batches):
    """The listed groups are the block's linears in call order, grouped by the input they share."""
    adapter = get_adapter(vlm.model).vision
    block = adapter.layers(vlm.model)[0]
    names = {m: n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda m, a: calls.append((names[m], a[0]))) for m in names]
    try:
        _logits(vlm.model, batches[0])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    owner: dict[int, int] = {}
    for name, x in calls:
        if id(x) in owner:
            groups[owner[id(x)]].append(name)
        else:
            owner[id(x)] = len(groups)
            groups.append([name])
    assert tuple(tuple(g) for g in groups) == adapter.linear_groups
    assert set(adapter.linear_names()) == set(names.values())  # every linear of the block is listed


def test_each_vision_block_replays_with_its_own_window_or_full_arguments(vlm, batches):
    model = vlm.model
    vision = model.config.vision_config
    blocks = get_adapter(model).vision.layers(model)
    full = set(vision.fullatt_block_indexes)
    assert full and set(range(len(blocks))) - full  # both kinds of block are present
    inputs = capture_first_layer_inputs(model, blocks, batches, CPU)
    assert inputs.per_batch is not None and len(inputs.hidden) == len(batches)
    for b, batch in enumerate(batches):
        seqlens = [inputs.call(b, i)[1]["cu_seqlens"] for i in range(len(blocks))]
        n = inputs.hidden[b].shape[0]
        for i, cu in enumerate(seqlens):
            if i in full:
                assert cu.tolist() == [0, n]  # one image: the whole image attends at once
            else:
                assert len(cu) > 2 and int(cu[-1]) == n  # several windows
        expected = _block_outputs(model, blocks, batch)
        h = inputs.hidden[b]
        with torch.no_grad():
            for i, block in enumerate(blocks):
                args, kwargs = inputs.call(b, i)
                h = run_layer(block, h, kwargs, args)
                torch.testing.assert_close(h, expected[i], rtol=1e-5, atol=1e-5)
            # Control: every block on block 0's (windowed) arguments goes wrong at the first full block,
            # so the tiny images are big enough for windowing to matter.
            h = inputs.hidden[b]
            for block in blocks:
                args, kwargs = inputs.call(b, 0)
                h = run_layer(block, h, kwargs, args)
        assert not torch.allclose(h, expected[-1], rtol=1e-3, atol=1e-3)


def test_quantize_with_vision_covers_both_towers_and_stays_close(quantized, batches):
    fp, model, result = quantized
    adapter = get_adapter(model)
    vision = _tower_linears(model, adapter.vision)
    assert len(vision) == 5 * model.config.vision_config.depth
    assert set(result.weights) == _tower_linears(model, adapter) | vision
    for rep in result.reports:
        assert 0 < rep.loss_gptq < rep.loss_rtn, rep.name
    fp_params = dict(fp.named_parameters())
    for name, p in model.named_parameters():
        moved = not torch.equal(p, fp_params[name])
        assert moved == (name.removesuffix(".weight") in result.weights), name  # merger, embeddings stay
    for batch in batches:
        ref, quant = _logits(fp, batch), _logits(model, batch)
        assert torch.isfinite(quant).all()
        assert 0 < torch.mean((quant - ref) ** 2) < 0.05 * torch.mean(ref**2)


def test_int4_export_reloads_the_vision_blocks(vlm, quantized, batches, tmp_path):
    _, model, result = quantized
    out = save_quantized(model, result.weights, tmp_path / "ckpt", tokenizer=vlm.processor, checkpoint_format="gptq_v2")
    loaded = load_quantized(out, kernel="auto")
    assert type(loaded) is type(model)
    assert sum(loaded.int4_kernels.values()) == len(result.weights)  # 15 vision + 14 language linears
    vision = get_adapter(model).vision
    for block in vision.layers(loaded):
        for name in vision.linear_names():
            assert isinstance(block.get_submodule(name), QuantLinear), name
    batch = batches[0]
    ref = _logits(model, batch)
    got = _logits(loaded, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()})
    assert got.shape == ref.shape
    # bf16 activations and kernel accumulation order only (as in test_vlm_inference).
    err = torch.mean((got - ref) ** 2)
    assert err < 1e-3 * torch.mean(ref**2), float(err)
