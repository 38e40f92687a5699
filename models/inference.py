"""Load any model rpiq knows (full precision or an int4 checkpoint) and generate text with it.

The one generation stack of rpiq: `rpiq generate`, `rpiq eval --kernel`, the benchmarks and the
server (`server.engine`) all load through `load_for_inference`, build prompts with `prompt_ids` /
`model_inputs`, and decode with `generate`, so a checkpoint runs through the same kernels and the
same sampling everywhere. Generation is plain transformers `generate` (KV cache, sampling, stop on
EOS); this module adds what the callers share: the chat-template prompt, stop strings, a text
callback for streaming, cooperative cancellation, and a `Generation` report (tokens, speed, why it
stopped).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, TextStreamer

from . import decode_loop
from .int4 import KernelName

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
Message = dict[str, Any]  # {"role": ..., "content": str | [{"type": "text" | "image", ...}]}
FinishReason = Literal["stop", "length", "cancelled"]
Decoder = Literal["lean", "transformers", "compiled"]


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings; temperature 0 means greedy (deterministic) decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    compile: bool = False  # decode through a static KV cache and a torch.compile'd step (`models.fast_decode`)
    lean: bool = True  # Llama-family decoders (and VLMs on them) decode through `models.decode_loop` (CUDA: graphs)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: FinishReason  # stop: end of answer (EOS or a stop string); length: hit max_new_tokens
    first_token_s: float | None = None  # measured when text was streamed (`on_text`)
    prompt_truncated: bool = False  # the prompt was cut to the model's prompt budget (`fit_prompt`)
    decoder: Decoder = "transformers"  # which loop made the tokens (`models.decode_loop` or transformers)

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def load_for_inference(
    model: str | Path | None,
    *,
    device: str = "cpu",
    kernel: KernelName = "auto",
    dtype: DTypeName | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path | str]:
    """(model, tokenizer, where): an int4 checkpoint on int4 kernels, anything else as it is.

    `model` None is the embedded default. `dtype` "auto" (or None) is bfloat16 for checkpoints (the
    int4 kernels' activation dtype) and float32 for full-precision models. Vision-language models
    load as their full image-text class either way; their processor comes from
    `models.vlm.load_processor`. `trust_remote_code` runs modeling code shipped with the model.
    """
    from .int4 import load_quantized
    from .loading import DTYPES, ModelLoadError, is_quantized_checkpoint, load_fp_model, resolve_model

    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else DTYPES[dtype]
    where = resolve_model(None if model is None else str(model))
    if is_quantized_checkpoint(where):
        m = load_quantized(where, device=device, kernel=kernel, dtype=dtype, trust_remote_code=trust_remote_code)
        try:
            tok = AutoTokenizer.from_pretrained(str(where), local_files_only=True, trust_remote_code=trust_remote_code)
        except OSError as e:
            raise ModelLoadError(f"{where}: the checkpoint has no usable tokenizer files ({e})") from e
        return m, tok, where
    name = next(k for k, v in DTYPES.items() if v == (dtype or torch.float32))
    m, tok, where = load_fp_model(str(where), name, trust_remote_code=trust_remote_code)
    return m.to(device), tok, where


# --- prompts -------------------------------------------------------------------------------------------
def has_chat_template(tok: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tok, "chat_template", None))


def chat_messages(prompt: str, system: str | None = None) -> list[Message]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def prompt_ids(
    tok: PreTrainedTokenizerBase, prompt: list[Message] | str, *, max_tokens: int | None = None
) -> torch.Tensor:
    """[1, n] ids for `prompt` (see `fit_prompt`, which also says whether it had to be cut)."""
    return fit_prompt(tok, prompt, max_tokens=max_tokens)[0]


def _render(tok: PreTrainedTokenizerBase, messages: list[Message]) -> torch.Tensor:
    if has_chat_template(tok):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _cut_middle(tok: PreTrainedTokenizerBase, text: str, excess: int) -> str:
    """`text` less about `excess` tokens from its middle: its start and its end (often the question) stay."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    keep = max(0, len(ids) - excess - 8)  # 8: room for the marker and re-tokenisation drift
    head, tail = keep // 2, keep - keep // 2
    return f"{tok.decode(ids[:head])} [...] {tok.decode(ids[len(ids) - tail :]) if tail else ''}".strip()


def fit_prompt(
    tok: PreTrainedTokenizerBase, prompt: list[Message] | str, *, max_tokens: int | None = None
) -> tuple[torch.Tensor, bool]:
    """([1, n] ids, whether anything was cut) for `prompt`: a conversation (through the chat template,
    or as a plain ``Role: text`` transcript for a base model without one), or a str: raw text to continue.

    Image parts are dropped (a text-only model; VLMs go through `model_inputs`). A conversation longer
    than `max_tokens` keeps its system prompt and its last message: the oldest other turns go first
    (a user turn with the assistant's reply to it), then the longest remaining message loses its
    middle. Raw text keeps its end.
    """
    from .vlm import flat_text

    if isinstance(prompt, str):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        cut = max_tokens is not None and ids.shape[1] > max_tokens
        return (ids[:, -max_tokens:], True) if cut else (ids, False)
    messages = [{"role": m["role"], "content": flat_text(m["content"])} for m in prompt]
    ids = _render(tok, messages)
    if max_tokens is None or ids.shape[1] <= max_tokens:
        return ids, False
    while ids.shape[1] > max_tokens:
        old = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
        if not old:
            break
        del messages[old[0]]
        if len(old) > 1 and messages[old[1] - 1]["role"] == "assistant" and old[1] - 1 < len(messages) - 1:
            del messages[old[1] - 1]  # the reply to the dropped turn: a conversation starts with the user
        ids = _render(tok, messages)
    for _ in range(4):
        if ids.shape[1] <= max_tokens:
            break
        others = [i for i, m in enumerate(messages) if m["role"] != "system"] or list(range(len(messages)))
        longest = max(others, key=lambda i: len(messages[i]["content"]))
        excess = ids.shape[1] - max_tokens
        messages[longest] = {**messages[longest], "content": _cut_middle(tok, messages[longest]["content"], excess)}
        ids = _render(tok, messages)
    return ids[:, -max_tokens:], True  # the slice only acts if a template's own text is over the limit


def model_inputs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt: list[Message] | str,
    *,
    processor: Any = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """`generate`'s inputs for `prompt`, on the model's device (see `fitted_inputs`)."""
    return fitted_inputs(model, tok, prompt, processor=processor, max_tokens=max_tokens)[0]


def fitted_inputs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt: list[Message] | str,
    *,
    processor: Any = None,
    max_tokens: int | None = None,
) -> tuple[dict[str, Any], bool]:
    """(`generate`'s inputs, whether the prompt was cut to `max_tokens`). With a VLM's `processor` the
    photos in the messages go in too (`models.vlm.chat_inputs`); such a prompt is never cut, which could
    split an image's tokens."""
    if processor is not None and not isinstance(prompt, str):
        from .vlm import chat_inputs

        return chat_inputs(model, processor, prompt), False
    ids, cut = fit_prompt(tok, prompt, max_tokens=max_tokens)
    ids = ids.to(model.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cut


def eos_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's end token and the generation config's (a VLM's end-of-turn token, e.g.
    SmolVLM's ``<end_of_utterance>``, ends the answer just the same)."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [tok.eos_token_id, *(extra if isinstance(extra, list) else [extra])]
    return list(dict.fromkeys(i for i in ids if i is not None))


# --- generation ----------------------------------------------------------------------------------------
class _Cancel(StoppingCriteria):
    """Checked after every token: `should_stop()` true ends generation (cancelled)."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop, self.fired = should_stop, False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.should_stop():
            self.fired = True
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class _Streamer(TextStreamer):
    """Hands each finished piece of text to `on_text`, noting when the first one came."""

    def __init__(self, tok: PreTrainedTokenizerBase, on_text: Callable[[str], None], t0: float) -> None:
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.on_text, self.t0, self.first_s = on_text, t0, None

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            if self.first_s is None:
                self.first_s = time.perf_counter() - self.t0
            self.on_text(text)


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    inputs: dict[str, Any],
    options: GenerationOptions | None = None,
    *,
    on_text: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Generation:
    """Decode an answer to `inputs` (from `model_inputs`). `on_text` receives the text as it comes;
    `should_stop` is asked after every token and ends generation early (finish reason "cancelled")."""
    from transformers import StoppingCriteriaList

    options = options or GenerationOptions()
    if options.seed is not None:
        torch.manual_seed(options.seed)
    t0 = time.perf_counter()
    streamer = _Streamer(tok, on_text, t0) if on_text is not None else None
    cancel = _Cancel(should_stop) if should_stop is not None else None
    ends = eos_ids(model, tok)
    n_prompt = int(inputs["input_ids"].shape[1])
    if options.lean and not options.compile and decode_loop.unavailable(model, inputs) is None:
        tokens, cancelled = decode_loop.decode(
            model, tok, inputs, options, ends, streamer=streamer, should_stop=should_stop
        )
        new = torch.tensor(tokens, dtype=torch.long)
        return _finish(tok, options, n_prompt, new, ends, time.perf_counter() - t0, cancelled, streamer, "lean")
    kw = options.generate_kwargs()
    if options.stop:
        kw.update(stop_strings=list(options.stop), tokenizer=tok)
    if options.compile:
        from .fast_decode import decode_kwargs

        kw.update(decode_kwargs(model, inputs, options.max_new_tokens))
    decoder: Decoder = "compiled" if "compile_config" in kw else "transformers"
    out = model.generate(
        **inputs,
        **kw,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=ends or None,
        stopping_criteria=StoppingCriteriaList([cancel]) if cancel else None,
        streamer=streamer,
    )
    cancelled = cancel is not None and cancel.fired
    seconds = time.perf_counter() - t0
    return _finish(tok, options, n_prompt, out[0, n_prompt:], ends, seconds, cancelled, streamer, decoder)


def _finish(
    tok: PreTrainedTokenizerBase,
    options: GenerationOptions,
    n_prompt: int,
    new: torch.Tensor,
    ends: list[int],
    seconds: float,
    cancelled: bool,
    streamer: _Streamer | None,
    decoder: Decoder,
) -> Generation:
    """The `Generation` report for the `new` token ids: text cut at the first stop string, and why it ended."""
    text = tok.decode(new, skip_special_tokens=True)
    cuts = [text.find(s) for s in options.stop if s and s in text]
    if cuts:
        text = text[: min(cuts)]
    n_new = int(new.numel())
    if cancelled:
        reason: FinishReason = "cancelled"
    elif n_new >= options.max_new_tokens and (n_new == 0 or int(new[-1]) not in ends):
        reason = "length"
    else:
        reason = "stop"
    first = streamer.first_s if streamer else None
    return Generation(text.strip(), n_prompt, n_new, seconds, reason, first, decoder=decoder)


def generate_text(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt: str,
    options: GenerationOptions | None = None,
    *,
    chat: bool = True,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Answer `prompt`: through the chat template when `chat` is set and the tokenizer has one,
    else as raw text to continue. `on_text` receives the text as it is generated."""
    source = chat_messages(prompt, system) if chat and has_chat_template(tok) else prompt
    return generate(model, tok, model_inputs(model, tok, source), options, on_text=on_text)
