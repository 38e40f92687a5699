"""`generate`'s token loop on the lean step (`models.lean_decode`): sampling, stops, streaming, cancel.

transformers' `generate` spends about a millisecond a token of its own (input preparation, cache
and stopping bookkeeping) on top of the model's forward; with the lean step that is a large share
of a small model's token. This loop does only what `models.inference.generate` asks of a decode:
the model's own forward for the prompt, then one lean step a token, with transformers' own logits
processors for repetition penalty, temperature, top-k and top-p, so sampling means what it means
on the transformers path. On a CUDA GPU each step is a replayed CUDA graph (`models.graph_decode`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .graph_decode import token_steps
from .lean_decode import LeanDecoder, prefill, unsupported


def unavailable(model: Any, inputs: dict[str, Any]) -> str | None:
    """Why this request decodes through transformers instead (None: the lean loop takes it). Photos
    are fine: the model's own forward reads them with the prompt, and the steps after are text."""
    if inputs["input_ids"].shape[0] != 1:
        return "batched inputs decode through transformers"
    return unsupported(model)


def greedy_token(scores: torch.Tensor) -> int:
    """The first highest-scoring token of 1-D float32 `scores`, as ``int(scores.argmax())`` picks it. NumPy's
    argmax reads a vocabulary's 50k floats in ~3 µs where torch's CPU argmax takes ~30 (a token is ~6 ms)."""
    on_host = scores.dtype == torch.float32 and scores.device.type == "cpu"
    return int(scores.numpy().argmax()) if on_host else int(scores.argmax())


def processors(model: Any, options: Any) -> LogitsProcessorList:
    """The logits processors transformers' `generate` would apply for `options` (a `GenerationOptions`)."""
    procs = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.temperature > 0:
        procs.append(TemperatureLogitsWarper(options.temperature))
        top_k = options.top_k if options.top_k is not None else getattr(model.generation_config, "top_k", None)
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if options.top_p < 1.0:
            procs.append(TopPLogitsWarper(options.top_p))
    return procs


def decode(
    model: Any,
    tok: Any,
    inputs: dict[str, Any],
    options: Any,
    ends: list[int],
    *,
    streamer: Any = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[int], bool]:
    """(new token ids, whether `should_stop` ended it) for the prompt `inputs` (`input_ids` [1, n], and
    for a vision-language model its image tensors).

    Stops after an end token (kept, as transformers keeps it), at `options.max_new_tokens`, once the
    new text contains one of `options.stop`, or when `should_stop()` turns true after a token.
    """
    lean = LeanDecoder.for_model(model)
    input_ids = inputs["input_ids"]
    logits, prompt_cache = prefill(model, {"attention_mask": torch.ones_like(input_ids), **inputs})
    n = prompt_cache.get_seq_length()  # the positions the prompt took (image tokens included)
    with token_steps(lean, prompt_cache, n + options.max_new_tokens) as step:
        del prompt_cache
        procs = processors(model, options)
        ids = input_ids[0].clone()
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new: list[int] = []
        sample, cancelled = options.temperature > 0, False
        # A stop string that ends in the newest token lies within its last `tail` tokens (a token is at least
        # one character, or one of at most 4 bytes of one), so only those are decoded after each token: the
        # whole answer again would cost O(length) a token. The surplus keeps a decoder's treatment of the
        # window's first token (a dropped leading space, a partial character) clear of the stop.
        stops = [s for s in options.stop if s]
        tail = 4 * max((len(s) for s in stops), default=0) + 8
        while True:
            scores = procs(ids[None], logits[None])[0] if procs else logits
            token = int(torch.multinomial(scores.softmax(-1), 1)) if sample else greedy_token(scores)
            new.append(token)
            if procs:
                ids = torch.cat([ids, torch.tensor([token], device=ids.device)])
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in ends or len(new) >= options.max_new_tokens:
                break
            if stops and any(s in tok.decode(new[-tail:], skip_special_tokens=True) for s in stops):
                break
            if should_stop is not None and should_stop():
                cancelled = True
                break
            logits = step(token, n + len(new) - 1)
        if streamer is not None:
            streamer.end()
    return new, cancelled
