"""Decoder layers visiting the accelerator one at a time (`quantizer.offload.layers_visit`).

A CPU-only machine has no second device, but the mechanism is device-agnostic: "meta" tensors
stand in for the accelerator (they carry shapes, no data), so the test sees exactly which layer's
weights are where during each forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantizer.capture import StopForward
from quantizer.offload import layers_visit

META = torch.device("meta")


def _layers() -> nn.ModuleList:
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)])
    layers[1].register_buffer("scale", torch.ones(4))
    return layers


def test_only_the_running_layer_is_on_the_device_and_host_weights_are_kept():
    layers = _layers()
    host = {n: t.data_ptr() for n, t in layers.state_dict(keep_vars=True).items()}
    seen = []

    def check(index):
        def hook(module, args, output):
            where = [{t.device.type for t in layer.state_dict().values()} for layer in layers]
            seen.append((index, where))

        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_hook(check(i))  # registered first: runs before the layer leaves
    with layers_visit(layers, META):
        x = torch.zeros(2, 4, device=META)
        for layer in layers:
            x = layer(x)
    assert seen == [
        (0, [{"meta"}, {"cpu"}, {"cpu"}]),
        (1, [{"cpu"}, {"meta"}, {"cpu"}]),
        (2, [{"cpu"}, {"cpu"}, {"meta"}]),
    ]
    # Back on the host, the very same storage: nothing was copied back.
    assert {n: t.data_ptr() for n, t in layers.state_dict(keep_vars=True).items()} == host
    out = layers[0](torch.ones(1, 4))  # the hooks are gone: an ordinary CPU forward again
    assert out.device.type == "cpu"


def test_a_forward_stopped_early_still_sends_the_layer_home():
    """Calibration hooks stop forwards inside a layer (StopForward); the layer leaves anyway."""
    layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))])

    def stop(module, args):
        raise StopForward

    layers[0][1].register_forward_pre_hook(stop)
    with layers_visit(layers, META):
        with pytest.raises(StopForward):
            layers[0](torch.zeros(2, 4, device=META))
        assert {t.device.type for t in layers.state_dict().values()} == {"cpu"}


def test_single_instance_with_offload_gives_the_same_codes_on_a_cpu():
    """The whole offload path (layers visiting, Hessians on the host) inside the real pipeline:
    on a CPU nothing moves, so the codes must be exactly those of the plain run."""
    from quantizer.config import CalibrationConfig, GPTQConfig, GridConfig, quant_config
    from quantizer.pipeline import quantize_model
    from tests.tiny_models import VOCAB, tiny_model

    cfg = quant_config("rpiq", grid=GridConfig(bits=3, group_size=32), gptq=GPTQConfig(block_size=16))
    calib = torch.randint(0, VOCAB - 2, (6, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for offload in (False, True):
        cal = CalibrationConfig(mode="single-instance", offload_hessians=offload)
        run_cfg = cfg.model_copy(update={"calibration": cal})
        runs[offload] = quantize_model(tiny_model("llama", seed=4), calib, run_cfg, progress=False)
    for name, qw in runs[False].weights.items():
        assert torch.equal(runs[True].weights[name].codes, qw.codes), name
    assert runs[True].total_loss == runs[False].total_loss
