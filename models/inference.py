"""Load any model rpiq knows (full precision or an int4 checkpoint) and generate text with it.

One entry point for the CLI, the benchmarks and the server, so that all of them run a
checkpoint through the same kernels. Generation is plain transformers `generate` (KV cache,
sampling, stop on EOS); this module only turns a prompt into ids through the model's chat
template and reports what was generated, how many tokens, and how fast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings; temperature 0 means greedy (deterministic) decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

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
    new_tokens: int
    seconds: float
    finished: bool  # stopped on EOS rather than on max_new_tokens

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def load_for_inference(
    model: str | Path | None,
    *,
    device: str = "cpu",
    kernel: str = "auto",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path | str]:
    """(model, tokenizer, where): an int4 checkpoint on int4 kernels, anything else as it is.

    `model` None is the embedded default. `dtype` defaults to bfloat16 for checkpoints (the
    int4 kernels' activation dtype) and float32 for full-precision models. Vision-language models
    load as their full image-text class either way; their processor comes from
    `models.vlm.load_processor`. `trust_remote_code` runs modeling code shipped with the model.
    """
    from models.loading import DTYPES, ModelLoadError, is_quantized_checkpoint, load_fp_model, resolve_model

    from .int4 import load_quantized

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


def prompt_ids(
    tok: PreTrainedTokenizerBase, prompt: str, *, chat: bool = True, system: str | None = None
) -> torch.Tensor:
    """[1, n] ids: through the chat template when the tokenizer has one and `chat` is set."""
    if chat and getattr(tok, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return ids["input_ids"]
    return tok(prompt, return_tensors="pt").input_ids


@torch.inference_mode()
def generate_text(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt: str,
    options: GenerationOptions | None = None,
    *,
    chat: bool = True,
    system: str | None = None,
    streamer: Any = None,
) -> Generation:
    """Answer `prompt`; `streamer` (e.g. a TextIteratorStreamer) receives tokens as they come."""
    options = options or GenerationOptions()
    ids = prompt_ids(tok, prompt, chat=chat, system=system).to(model.device)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        pad_token_id=pad,
        streamer=streamer,
        **options.generate_kwargs(),
    )
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1] :]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    finished = bool(new.numel()) and int(new[-1]) in eos_ids
    return Generation(
        text=tok.decode(new, skip_special_tokens=True).strip(),
        prompt_tokens=ids.shape[1],
        new_tokens=int(new.numel()),
        seconds=seconds,
        finished=finished,
    )
