"""The checkpoint tests' shared cases: quantizer configs, a tiny Llama quantized once per case, helpers.

Used by `test_checkpoint.py` (round trips, metadata, atomic writes) and `test_checkpoint_loading.py`
(load-time errors, third-party loaders).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from gptq_format import QuantizedWeight
from quantizer.config import GPTQConfig, GridConfig, QuantConfig, quant_config

from .quantized_models import quantize_linears, tiny_llama

BASE = quant_config("gptq", grid=GridConfig(bits=4, group_size=32, min_zero=1))
CASES: dict[str, QuantConfig] = {
    "g32": BASE,
    "act_order": BASE.model_copy(update={"gptq": GPTQConfig(act_order=True)}),
    "3bit": BASE.model_copy(update={"grid": GridConfig(bits=3, group_size=32, min_zero=1)}),
    "8bit_channel": BASE.model_copy(update={"grid": GridConfig(bits=8, group_size=-1, min_zero=1)}),
    "sym": BASE.model_copy(update={"grid": GridConfig(bits=4, group_size=32, sym=True)}),
    # 128 > the 64 inputs of the attention projections: one short group, the shape a model with
    # 576 inputs (the embedded one) has in its last group at g128. GPTQModel accepts only group
    # sizes in {16, 32, ..., 1024}, so 128 it is.
    "partial_group": BASE.model_copy(update={"grid": GridConfig(bits=4, group_size=128, min_zero=1)}),
}
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module", name="llama")
def llama_fixture() -> LlamaForCausalLM:
    return tiny_llama()


_cache: dict[str, dict[str, QuantizedWeight]] = {}


@pytest.fixture(scope="module", name="quantized")
def quantized_fixture(llama):
    """Quantized Llama weights per case, computed once for the whole module."""

    def get(case: str) -> dict[str, QuantizedWeight]:
        if case not in _cache:
            _cache[case] = quantize_linears(llama, CASES[case])
        return _cache[case]

    return get


def with_zero_point_0(qs: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """A copy where one zero point is 0, which only gptq_v2 can store."""
    qw = qs[Q_PROJ]
    zeros = qw.zeros.clone()
    zeros[0, 0] = 0
    return {**qs, Q_PROJ: replace(qw, zeros=zeros)}


def assert_same_weights(got: dict[str, QuantizedWeight], want: dict[str, QuantizedWeight]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.codes.dtype == torch.uint8 and torch.equal(g.codes, w.codes), name
        assert g.zeros.dtype == torch.int32 and torch.equal(g.zeros, w.zeros.to(torch.int32)), name
        assert g.g_idx.dtype == torch.int32 and torch.equal(g.g_idx, w.g_idx.to(torch.int32)), name
        assert g.scales.dtype == torch.float32 and torch.equal(g.scales, w.scales), name
        assert (g.bits, g.group_size, g.sym) == (w.bits, w.group_size, w.sym), name
        assert torch.equal(g.dequantize(), w.dequantize()), name


def rewrite_tensors(path: Path, edit) -> None:
    """Load model.safetensors, let `edit` change the dict, write it back (to fake a broken checkpoint)."""
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)
