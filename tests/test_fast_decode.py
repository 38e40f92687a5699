"""Opt-in compiled decode (`models.fast_decode`): the same tokens, text, stops and cancellation as the
eager path, and a clean eager fallback where compilation cannot work."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import fast_decode
from models.inference import GenerationOptions, generate
from models.int4 import quantize_linears_in_place
from quantizer.config import GridConfig, quant_config

from .quantized_models import quantize_linears
from .tiny_models import CONFIGS
from .tiny_vlms import byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119]])


def _llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    cfg = CONFIGS["llama"]()
    cfg.vocab_size = 260  # the byte tokenizer's 256 bytes and its specials
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # widened weights: varied greedy tokens rather than one repeated
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer([])


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    fp = _llama()
    int4 = _llama(dtype=torch.bfloat16)
    weights = quantize_linears(fp, quant_config("gptq", grid=GridConfig(bits=4, group_size=32)))
    assert sum(quantize_linears_in_place(int4, weights, kernel="tinygemm-cpu").values()) == len(weights)
    return {"float": fp, "int4": int4}


def _inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": PROMPT, "attention_mask": torch.ones_like(PROMPT)}


def _ids(model, **kw) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(**_inputs(), max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)


def _run(model, tok, options: GenerationOptions, **kw):
    pieces: list[str] = []
    result = generate(model, tok, _inputs(), options, on_text=pieces.append, **kw)
    return result, "".join(pieces)


def _summary(result) -> tuple:
    return result.text, result.completion_tokens, result.finish_reason


@pytest.mark.slow  # one inductor compile per model: about half a minute each on a busy 2-core CPU
@pytest.mark.parametrize("kind", ["float", "int4"])
def test_compiled_decode_gives_the_eager_tokens_text_and_stops(models, tok, kind):
    model = models[kind]
    extra = fast_decode.decode_kwargs(model, _inputs(), 20)
    assert set(extra) == {"cache", "compile_config"}, fast_decode._state(model).failed
    eager = _ids(model)
    assert len(set(eager[0, PROMPT.shape[1] :].tolist())) > 3  # a real sequence, not one token repeated
    assert torch.equal(_ids(model, **extra), eager)

    for options in (GenerationOptions(max_new_tokens=20), GenerationOptions(max_new_tokens=20, stop=("e",))):
        want, want_streamed = _run(model, tok, GenerationOptions(**{**options.__dict__, "lean": False}))
        got, got_streamed = _run(model, tok, GenerationOptions(**{**options.__dict__, "compile": True}))
        assert _summary(got) == _summary(want)
        assert got_streamed == want_streamed

    calls = iter(range(100))
    got, _ = _run(model, tok, GenerationOptions(max_new_tokens=20, compile=True), should_stop=lambda: next(calls) >= 4)
    assert got.finish_reason == "cancelled" and got.completion_tokens == 5
    assert fast_decode._state(model).lengths == {fast_decode.MIN_CACHE}  # one compiled length for all of these


def test_no_compiler_falls_back_to_eager_with_a_warning(monkeypatch, tok, caplog):
    model = _llama(seed=1)
    monkeypatch.setattr(fast_decode.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="models.fast_decode"):
        assert fast_decode.decode_kwargs(model, _inputs(), 20) == {}
    assert "no C++ compiler" in caplog.text
    want, _ = _run(model, tok, GenerationOptions(max_new_tokens=12, lean=False))
    got, _ = _run(model, tok, GenerationOptions(max_new_tokens=12, compile=True))
    assert _summary(got) == _summary(want)
    assert not hasattr(model, "_compiled_call")


def test_failed_compilation_falls_back_to_eager_once(monkeypatch, tok, caplog):
    model = _llama(seed=2)
    attempts = []

    def broken(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("inductor: C++ compile error\nlong log")

    monkeypatch.setattr(fast_decode, "_warm_up", broken)
    with caplog.at_level(logging.WARNING, logger="models.fast_decode"):
        want, _ = _run(model, tok, GenerationOptions(max_new_tokens=12, lean=False))
        got, _ = _run(model, tok, GenerationOptions(max_new_tokens=12, compile=True))
        again, _ = _run(model, tok, GenerationOptions(max_new_tokens=12, compile=True))
    assert _summary(got) == _summary(again) == _summary(want)
    assert len(attempts) == 1 and caplog.text.count("C++ compile error") == 1
    assert fast_decode._state(model).failed == "RuntimeError: inductor: C++ compile error"


def test_images_and_batches_decode_eagerly():
    model = _llama(seed=3)
    assert fast_decode.unsupported(model, {**_inputs(), "pixel_values": torch.zeros(1)}) is not None
    assert fast_decode.unsupported(model, {"input_ids": PROMPT.repeat(2, 1)}) is not None


def test_cache_length_buckets():
    model = _llama(seed=3)  # max_position_embeddings 2048
    assert fast_decode.cache_length(model, 10) == fast_decode.MIN_CACHE
    assert fast_decode.cache_length(model, 257) == 512
    assert fast_decode.cache_length(model, 2048) == 2048
    assert fast_decode.cache_length(model, 3000) == 4096  # past the context: still holds every token
    assert not GenerationOptions().compile  # opt-in only
