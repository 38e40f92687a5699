"""The lean decode step (`models.lean_decode`, `models.decode_loop`): the transformers path's tokens and
logits, its stops, streaming, sampling and cancellation, fused int4 projections that cost no memory,
and a clean refusal (decoding through transformers) for what it does not implement."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from models import decode_loop, lean_decode
from models.inference import GenerationOptions, generate
from models.int4 import model_weight_bytes, quantize_linears_in_place
from quantizer.config import GridConfig, quant_config

from .quantized_models import quantize_linears
from .tiny_models import CONFIGS, tiny_model
from .tiny_vlms import byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114]])


def _widened(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    with torch.no_grad():  # wide weights: varied greedy tokens rather than one repeated
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    return model.eval()


def _float(arch: str, seed: int = 0) -> torch.nn.Module:
    cfg = CONFIGS[arch]()
    cfg.vocab_size = 260  # the byte tokenizer's 256 bytes and its specials
    torch.manual_seed(seed)
    # Gemma scales its embeddings by sqrt(hidden) and norms by 1 + w: narrow weights keep it varied
    return _widened(AutoModelForCausalLM.from_config(cfg), 0.02 if arch == "gemma3" else 0.3)


def _int4(fp: torch.nn.Module, group_size: int = 32) -> torch.nn.Module:
    int4 = _widened(AutoModelForCausalLM.from_config(fp.config))
    int4.load_state_dict(fp.state_dict())
    int4 = int4.to(torch.bfloat16)
    weights = quantize_linears(fp, quant_config("rtn", grid=GridConfig(bits=4, group_size=group_size)))
    assert sum(quantize_linears_in_place(int4, weights, kernel="tinygemm-cpu").values()) == len(weights)
    return int4


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer([])


def _inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": PROMPT, "attention_mask": torch.ones_like(PROMPT)}


def _run(model, tok, **kw):
    pieces: list[str] = []
    should_stop = kw.pop("should_stop", None)
    result = generate(model, tok, _inputs(), GenerationOptions(**kw), on_text=pieces.append, should_stop=should_stop)
    return result, "".join(pieces)


def _teacher_forced(model, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(transformers' logits, the lean step's logits) for every position after the prompt, same tokens."""
    ids = torch.cat([PROMPT[0], torch.tensor(tokens)])[None]
    with torch.inference_mode():
        want = model(input_ids=ids).logits[0, PROMPT.shape[1] - 1 : -1].float()
        logits, prompt_cache = lean_decode.prefill(model, _inputs())
        lean = lean_decode.LeanDecoder.for_model(model)
        cache = lean.start(prompt_cache, ids.shape[1])
        got = [logits]
        for i, t in enumerate(tokens[:-1]):
            got.append(lean.step(cache, t, PROMPT.shape[1] + i))
    return want, torch.stack(got)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "mistral-window"])
def test_float_models_give_the_transformers_tokens_and_logits(arch, tok):
    """gemma3: sandwich norms, scaled embeddings, an 8-token sliding window with its own rotary
    table; mistral-window: a 6-token window on every layer. The 10-token prompt and 16 new tokens
    slide past both windows."""
    model = _float(arch.split("-")[0])
    if arch == "mistral-window":
        model = _float("mistral")
        model.config.sliding_window = 6
    assert decode_loop.unavailable(model, _inputs()) is None
    want, want_text = _run(model, tok, max_new_tokens=16, lean=False)
    got, got_text = _run(model, tok, max_new_tokens=16)
    assert (got.text, got.completion_tokens, got.finish_reason) == (want.text, 16, "length")
    assert got_text == want_text
    with torch.inference_mode():
        ids = model.generate(**_inputs(), max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    tokens = ids[0, PROMPT.shape[1] :].tolist()
    assert len(set(tokens)) > 3  # a real sequence, not one token repeated
    hf, lean = _teacher_forced(model, tokens)
    torch.testing.assert_close(lean, hf, atol=2e-4, rtol=1e-4)


# 128: q/k/v and gate/up fuse; 80: padded input columns (80 is no multiple of 32), and q/k/v of 80 and 40
# rows stay three matmuls (the CPU packer interleaves blocks of 64 rows; see `_packs_by_rows`)
@pytest.mark.parametrize("hidden, group", [(128, 32), (80, 64)])
def test_int4_logits_match_transformers_within_bf16_rounding(hidden, group):
    cfg = LlamaConfig(
        vocab_size=260, hidden_size=hidden, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _int4(_widened(AutoModelForCausalLM.from_config(cfg)), group)
    before = model_weight_bytes(model)
    hf, lean = _teacher_forced(model, [80, 81, 82, 83, 84, 85, 86, 87])
    # bf16 activations: both paths round differently; the error is a few bf16 ulps of the logits
    assert (lean - hf).abs().max() <= 0.03 * hf.abs().max(), (lean - hf).abs().max()
    assert (lean.argmax(-1) == hf.argmax(-1)).float().mean() >= 0.75
    # q/k/v (and gate/up) are one matmul whose codes are the layers' own: no second copy of the weights
    parts = lean_decode.LeanDecoder.for_model(model).layers[0]
    qkv, gate_up = parts.projections["qkv"], parts.projections["gate_up"]
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    assert isinstance(gate_up, lean_decode._Fused)
    assert gate_up.pad == (48 if hidden == 80 else 0)  # 80 columns padded to 128
    assert mlp.up_proj.packed.untyped_storage().data_ptr() == gate_up.packed.untyped_storage().data_ptr()
    if hidden == 128:
        assert isinstance(qkv, lean_decode._Fused)
        assert attn.q_proj.packed.data_ptr() == qkv.packed.data_ptr()
        assert attn.v_proj.packed.untyped_storage().data_ptr() == qkv.packed.untyped_storage().data_ptr()
    else:
        assert isinstance(qkv, lean_decode._Separate)
    assert model_weight_bytes(model) == before


def test_int4_generation_through_the_layers_modules_is_unchanged_after_fusing(tok):
    """Fusing re-points the layers' buffers; transformers' own forward must still compute the same."""
    model = _int4(_float("llama", seed=1))
    with torch.inference_mode():
        before = model(input_ids=PROMPT).logits
        lean_decode.LeanDecoder.for_model(model)
        after = model(input_ids=PROMPT).logits
    assert torch.equal(before, after)


def test_stops_cancellation_and_sampling_mean_what_they_mean_on_transformers(tok):
    model = _float("llama", seed=2)
    plain, _ = _run(model, tok, max_new_tokens=24, lean=False)
    stop = plain.text[5:7]
    want, _ = _run(model, tok, max_new_tokens=24, stop=(stop,), lean=False)
    got, _ = _run(model, tok, max_new_tokens=24, stop=(stop,))
    assert (got.text, got.finish_reason) == (want.text, "stop") and stop not in got.text
    assert got.completion_tokens < 24
    # a stop far into a long answer: only the last tokens are decoded after each token, and still found
    plain, _ = _run(model, tok, max_new_tokens=64, lean=False)
    late = plain.text[-4:-1]
    want, _ = _run(model, tok, max_new_tokens=64, stop=(late,), lean=False)
    got, _ = _run(model, tok, max_new_tokens=64, stop=(late,))
    assert (got.text, got.finish_reason) == (want.text, "stop")
    assert got.completion_tokens > 4 * len(late) + 8  # the stop ended beyond the first decoded tail

    calls = iter(range(100))
    got, _ = _run(model, tok, max_new_tokens=20, should_stop=lambda: next(calls) >= 4)
    assert got.finish_reason == "cancelled" and got.completion_tokens == 5

    for kw in ({"repetition_penalty": 1.5}, {"repetition_penalty": 0.7}):
        want, _ = _run(model, tok, max_new_tokens=16, lean=False, **kw)
        got, _ = _run(model, tok, max_new_tokens=16, **kw)
        assert got.text == want.text
    # sampling: a seed repeats itself, and top_k=1 / a tiny top_p leave only the greedy token
    a, _ = _run(model, tok, max_new_tokens=16, temperature=1.5, seed=7)
    b, _ = _run(model, tok, max_new_tokens=16, temperature=1.5, seed=7)
    c, _ = _run(model, tok, max_new_tokens=16, temperature=1.5, seed=8)
    assert a.text == b.text != c.text
    greedy, _ = _run(model, tok, max_new_tokens=16)
    assert _run(model, tok, max_new_tokens=16, temperature=1.5, top_k=1, seed=3)[0].text == greedy.text
    assert _run(model, tok, max_new_tokens=16, temperature=1.5, top_p=1e-6, seed=3)[0].text == greedy.text


def test_what_the_lean_step_does_not_implement_decodes_through_transformers(tok):
    assert "opt" in lean_decode.unsupported(tiny_model("opt"))
    llama = _float("llama")
    assert "batched" in decode_loop.unavailable(llama, {"input_ids": PROMPT.repeat(2, 1)})
    windowed = _float("qwen2")
    windowed.config.sliding_window, windowed.config.use_sliding_window = 4, True
    assert "sliding" in lean_decode.unsupported(windowed)
    capped = _float("llama")
    capped.config.final_logit_softcapping = 30.0
    assert "soft-capping" in lean_decode.unsupported(capped)
    # and such a model still answers, through transformers
    result, _ = _run(capped, tok, max_new_tokens=4)
    assert result.completion_tokens == 4


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_vision_language_models_decode_the_answer_to_a_photo_as_transformers_does(family):
    """The photo goes through the model's own forward with the prompt; the steps after are the lean ones."""
    from PIL import Image

    from models.vlm import chat_inputs

    from . import tiny_vlms

    vlm = getattr(tiny_vlms, family)()
    model, processor = vlm.model, vlm.processor
    assert lean_decode.unsupported(model) is None
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    inputs = chat_inputs(model, processor, messages)
    assert decode_loop.unavailable(model, inputs) is None
    tok = processor.tokenizer
    want = generate(model, tok, inputs, GenerationOptions(max_new_tokens=12, lean=False))
    got = generate(model, tok, inputs, GenerationOptions(max_new_tokens=12))
    assert (got.decoder, want.decoder) == ("lean", "transformers")
    assert (got.text, got.completion_tokens) == (want.text, want.completion_tokens)
    assert want.completion_tokens == 12 and len(set(want.text)) > 2  # a real answer, not an early end


def test_qwen2_vl_m_rope_decodes_through_transformers():
    from . import tiny_vlms

    assert "qwen2_vl_text" in lean_decode.unsupported(tiny_vlms.qwen2_vl().model)


def test_greedy_token_picks_the_first_maximum_like_torch():
    from models.decode_loop import greedy_token

    torch.manual_seed(0)
    for _ in range(20):
        scores = torch.randn(1000).round(decimals=1)  # many ties
        assert greedy_token(scores) == int(scores.argmax())
    assert greedy_token(torch.tensor([0.0, 3.0, 3.0, 1.0])) == 1
    assert greedy_token(torch.tensor([1.0, 3.0], dtype=torch.bfloat16)) == 1
