"""Perplexity (GPTQ protocol): exactness on a tiny local model, uniform-logit sanity, real model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from quantizer.evaluate import perplexity

VOCAB = 128


def _tiny_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Random-weight LlamaForCausalLM built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def _windows(n: int = 5, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


def _reference_ppl(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean NLL) computed independently: per-window logits, float64 log-softmax, gather."""
    nlls = []
    with torch.no_grad():
        for row in windows:
            logits = model(row[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            nlls.append(-logp.gather(1, row[1:, None]).squeeze(1))
    return math.exp(torch.cat(nlls).mean().item())


class UniformLM(nn.Module):
    """Returns all-zero logits: every token has probability 1/vocab, so ppl must equal vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.calls: list[dict[str, object]] = []

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> SimpleNamespace:
        self.calls.append(kwargs)
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_matches_hand_computed_perplexity() -> None:
    model = _tiny_llama()
    w = _windows()
    got = perplexity(model, w)
    want = _reference_ppl(model, w)
    assert got == pytest.approx(want, rel=1e-5)
    assert 1.0 < got < 10 * VOCAB  # a random model is near-uniform


@pytest.mark.parametrize("batch_size", [2, 3, 16])
def test_batch_size_does_not_change_result(batch_size: int) -> None:
    model = _tiny_llama()
    w = _windows(n=7)
    assert perplexity(model, w, batch_size=batch_size) == pytest.approx(perplexity(model, w), rel=1e-5)


def test_uniform_logits_give_vocab_size() -> None:
    model = UniformLM(VOCAB)
    ppl = perplexity(model, _windows(n=3, seqlen=16), batch_size=2, device=torch.device("cpu"))
    assert ppl == pytest.approx(VOCAB, rel=1e-6)
    assert all(call.get("use_cache") is False for call in model.calls)


def test_half_precision_model_scored_in_float32() -> None:
    model = _tiny_llama(torch.bfloat16)
    w = _windows(n=2)
    got = perplexity(model, w)
    assert math.isfinite(got)
    assert got == pytest.approx(_reference_ppl(model, w), rel=1e-5)


def test_restores_training_mode_and_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny_llama().train()
    perplexity(model, _windows(n=2), progress=True)
    assert model.training
    assert "perplexity" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("windows", "kwargs", "match"),
    [
        (torch.zeros(8, dtype=torch.long), {}, "2-D"),
        (torch.zeros(2, 8), {}, "integer"),
        (torch.zeros(2, 1, dtype=torch.long), {}, "at least 2 tokens"),
        (torch.zeros(0, 8, dtype=torch.long), {}, "at least one window"),
        (torch.zeros(2, 8, dtype=torch.long), {"batch_size": 0}, "batch_size"),
    ],
)
def test_rejects_bad_input(windows: torch.Tensor, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        perplexity(UniformLM(VOCAB), windows, **kwargs)


@pytest.mark.slow
def test_real_model_heldout_perplexity(default_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantizer.data import evaluation_windows, load_text

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    windows = evaluation_windows(tok, load_text("heldout"), seqlen=256, max_windows=4)
    assert windows.shape == (4, 256)

    ppl = perplexity(model, windows, batch_size=2)
    # Measured 37.4 (SmolLM2-135M-Instruct, first 4 x 256 tokens of Northanger Abbey, fp32 CPU).
    assert 25.0 < ppl < 50.0, ppl

    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    broken = perplexity(model, windows, batch_size=2)
    assert broken > 2 * ppl, (ppl, broken)
