"""Single-instance Hessians under a memory budget: streamed in passes, kept on disk, read back."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch

import quantizer.single_instance as single_instance
from quantizer.adapters import get_adapter
from quantizer.capture import GroupHessians
from quantizer.config import CalibrationConfig, GPTQConfig, GridConfig, quant_config
from quantizer.hessian_store import HessianStore, hessian_bytes, plan_passes
from quantizer.pipeline import ModelQuantization, quantize_model
from tests.interrupt import quantize_until_first_layer
from tests.tiny_models import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = quant_config("rpiq", grid=GridConfig(bits=3, group_size=32), gptq=GPTQConfig(block_size=16))


def _single_instance(**calibration):
    return CFG.model_copy(update={"calibration": CalibrationConfig(mode="single-instance", **calibration)})


def _calib() -> torch.Tensor:
    return torch.randint(0, VOCAB - 2, (8, 64), generator=torch.Generator().manual_seed(0))


def _layer_mib(model) -> float:
    adapter = get_adapter(model)
    return hessian_bytes(adapter.layers(model)[0], adapter.linear_groups) / 2**20


def _record_passes(monkeypatch) -> list[list[int]]:
    passes: list[list[int]] = []
    real = single_instance.stream_hessians

    def recording(model, adapter, calib, layer_indices, *args, **kwargs):
        passes.append(list(layer_indices))
        return real(model, adapter, calib, layer_indices, *args, **kwargs)

    monkeypatch.setattr(single_instance, "stream_hessians", recording)
    return passes


def _assert_identical(want: ModelQuantization, got: ModelQuantization) -> None:
    assert sorted(got.weights) == sorted(want.weights)
    for name, qw in want.weights.items():
        assert torch.equal(got.weights[name].codes, qw.codes), name
        assert torch.equal(got.weights[name].scales, qw.scales), name
    assert got.total_loss == want.total_loss


def test_plan_passes_fills_each_pass_up_to_the_budget():
    assert plan_passes({0: 4, 1: 4, 2: 4, 3: 4, 4: 4}, 8) == [[0, 1], [2, 3], [4]]
    assert plan_passes({2: 3, 5: 9, 7: 3}, 8) == [[2], [5], [7]]  # too big alone: a pass of its own
    assert plan_passes({}, 8) == []


def test_a_budget_streams_layer_by_layer_and_gives_the_in_memory_result(monkeypatch, tmp_path):
    """Two passes of one layer each; the Hessians go to disk and come back bit for bit, so the
    codes are exactly those of the one-pass, all-in-memory run. No scratch directory is left."""
    model = tiny_model("llama", seed=4)
    calib = _calib()
    want = quantize_model(copy.deepcopy(model), calib, _single_instance(), progress=False)
    passes = _record_passes(monkeypatch)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    budget = 1.5 * _layer_mib(model)
    got = quantize_model(model, calib, _single_instance(hessian_budget_mib=budget), progress=False)
    assert passes == [[0], [1]]
    _assert_identical(want, got)
    assert list(tmp_path.iterdir()) == []


def test_a_budget_that_holds_every_layer_streams_once(monkeypatch):
    model = tiny_model("llama", seed=4)
    passes = _record_passes(monkeypatch)
    budget = 2.5 * _layer_mib(model)
    quantize_model(model, _calib(), _single_instance(hessian_budget_mib=budget), progress=False)
    assert passes == [[0, 1]]


def test_a_layer_over_the_budget_warns_and_still_gets_quantized(monkeypatch):
    model = tiny_model("llama", seed=4)
    passes = _record_passes(monkeypatch)
    cfg = _single_instance(hessian_budget_mib=0.5 * _layer_mib(model))
    with pytest.warns(UserWarning, match="over the .* MiB budget"):
        result = quantize_model(model, _calib(), cfg, progress=False)
    assert passes == [[0], [1]]
    assert len(result.weights) == 14


def test_interrupted_budgeted_run_resumes_without_streaming_again(monkeypatch, tmp_path):
    """Under the resume state the stored Hessians survive an interruption: the rerun quantizes
    the remaining layer from them, with no pass over the calibration data, and matches."""
    model = tiny_model("llama", seed=4)
    calib = _calib()
    cfg = _single_instance(hessian_budget_mib=1.5 * _layer_mib(model))
    want = quantize_model(copy.deepcopy(model), calib, cfg, progress=False)

    state = tmp_path / "state"
    quantize_until_first_layer(copy.deepcopy(model), calib, cfg, state_dir=state, progress=False)
    stored = sorted(p.name for p in (state / "hessians").iterdir())
    assert stored == ["hessians_0000.safetensors", "hessians_0001.safetensors"]
    passes = _record_passes(monkeypatch)
    got = quantize_model(copy.deepcopy(model), calib, cfg, state_dir=state, progress=False)
    assert passes == []
    _assert_identical(want, got)
    assert list((state / "hessians").iterdir()) == []  # each layer's file goes once it is quantized


def test_store_round_trip_keeps_shared_hessians_and_token_counts(tmp_path):
    model = tiny_model("llama", seed=4)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    groups = [GroupHessians({n: layer.get_submodule(n) for n in g}) for g in adapter.linear_groups]
    for group in groups:
        width = next(iter(group.modules.values())).in_features
        x = torch.randn(10, width)
        group.accumulate({n: x for n in group.modules})  # one shared input per group
    store = HessianStore(tmp_path)
    store.save(3, groups)
    back = [GroupHessians(g.modules) for g in groups]
    store.load(3, back)
    for a, b in zip(groups, back, strict=True):
        assert b.share == a.share
        for name in a.modules:
            assert torch.equal(b.hessian(name), a.hessian(name))
            assert b.tokens(name) == a.tokens(name) == 10


def test_a_damaged_store_file_is_named_in_the_error(tmp_path):
    store = HessianStore(tmp_path)
    (tmp_path / "hessians_0002.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"hessians_0002\.safetensors.*unreadable"):
        store.load(2, [])


def test_a_budget_is_only_for_single_instance():
    with pytest.raises(ValueError, match="hessian_budget_mib applies to single-instance"):
        CalibrationConfig(mode="sequential", hessian_budget_mib=64)
    with pytest.raises(ValueError, match="greater than 0"):
        CalibrationConfig(mode="single-instance", hessian_budget_mib=0)
