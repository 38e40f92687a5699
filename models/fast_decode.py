"""Opt-in fast decoding: a static KV cache and a decode step compiled by `torch.compile` (inductor).

A decode step of a small model on a CPU is thousands of tiny torch ops, and their Python/framework
overhead, not the arithmetic, is most of a token's time. Compiled, the step is one graph of fused
C++ kernels. This module only adds what compilation needs to `models.inference.generate`, which
keeps doing the rest (prompt, sampling, streaming, stop strings, cancellation, the report):

* a transformers `StaticCache` whose length is the prompt plus `max_new_tokens`, rounded up to a
  power of two (at least `MIN_CACHE`), so a server compiles one graph per length bucket, not per
  request;
* the model's own compiled call (`PreTrainedModel.get_compiled_call`, kept on the model: a model
  compiles once per process and bucket), used by `generate` for the decode steps; prefill stays eager;
* a warm-up generation of two tokens the first time a bucket is used, so that a compilation error
  shows before any text is streamed: it is logged once and that model decodes eagerly from then on,
  as it does where no C/C++ compiler exists.

Dynamo traces the int4 layers (`aten._weight_int4pack_mm_for_cpu`), the int8 embedding and tied
head, and transformers' Llama-style decoders without graph breaks (`fullgraph=True`); inductor needs
one workaround, for the int8 head's matmul (`_inductor_workarounds`). Greedy tokens equal the eager
path's for float and int4 models; with the int8 embedding and tied head (``emb8``) the compiled
logits differ from eager ones by a bf16 ulp or two, which can flip a near-tied argmax.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch

log = logging.getLogger(__name__)

MIN_CACHE = 256  # tokens: the smallest static cache (its attention reads all of it every step)
_TEXT_INPUTS = {"input_ids", "attention_mask"}
_EXTRA_OPTIONS: dict[str, Any] = {}  # inductor options over those of `compile_config` (experiments)


class _State:
    """What one model knows about its compiled decode: why it cannot (None: it can), warmed lengths."""

    def __init__(self) -> None:
        self.failed: str | None = None
        self.lengths: set[int] = set()
        self.config: Any = None


def _state(model: Any) -> _State:
    state = model.__dict__.get("_rpiq_fast_decode")
    if state is None:
        state = model.__dict__["_rpiq_fast_decode"] = _State()
    return state


def compiler_missing() -> str | None:
    """Why inductor cannot build CPU kernels here (None: a C++ compiler is on the PATH)."""
    if any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return None
    return "no C++ compiler on the PATH (g++, c++, clang++ or $CXX)"


def unsupported(model: Any, inputs: dict[str, Any] | None = None) -> str | None:
    """Why `model` cannot decode through the compiled step (None: it can)."""
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"{type(model).__name__} does not support a compiled static-cache decode"
    if inputs is not None and not set(inputs) <= _TEXT_INPUTS:
        return "inputs other than text (images) decode eagerly"
    if inputs is not None and inputs["input_ids"].shape[0] != 1:
        return "batched inputs decode eagerly"
    return compiler_missing()


def cache_length(model: Any, total: int) -> int:
    """The static cache length for `total` tokens: the next power of two >= max(total, MIN_CACHE),
    no more than the model's context where that still holds `total`."""
    n = max(MIN_CACHE, 1 << max(0, total - 1).bit_length())
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    return min(n, limit) if limit and limit >= total else n


def compile_config() -> Any:
    """transformers' `CompileConfig` for the CPU: inductor, static shapes, one graph, no CUDA graphs
    (`mode` None: torch.compile takes options or a mode, not both)."""
    from transformers.generation.configuration_utils import CompileConfig

    # emulate_precision_casts: fused kernels round bf16 intermediates where eager does, so greedy
    # tokens stay those of the eager path (without it, int4 models in bf16 drift after a few tokens).
    # cpp_wrapper: the graph's kernel calls from C++, not a Python wrapper: ~2x the decode speed of
    # the Python wrapper on SmolLM2-135M (about twice the compile time, once per cache length).
    options = {"emulate_precision_casts": True, "cpp_wrapper": True, **_EXTRA_OPTIONS}
    cfg = CompileConfig(fullgraph=True, dynamic=False, backend="inductor", mode=None, options=options)
    cfg._compile_all_devices = True  # transformers otherwise compiles on accelerators only
    return cfg


def static_cache(model: Any, length: int) -> Any:
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def _inductor_workarounds() -> None:
    """inductor (torch 2.13) lowers ``aten._weight_int8pack_mm`` (the int8 tied head) into a template
    that asserts when its scale operand is a fused pointwise node (``LoweringException: AssertionError:
    Pointwise``); run that one op as the plain aten kernel inside the compiled graph instead."""
    global _PATCHED
    if not _PATCHED:
        from torch._inductor.lowering import make_fallback

        make_fallback(torch.ops.aten._weight_int8pack_mm, warn=False)
        _PATCHED = True


_PATCHED = False


def compiled_forward(model: Any) -> Any:
    """The model's compiled call (built once per model; it compiles on first use, per cache length)."""
    state = _state(model)
    if state.config is None:
        _inductor_workarounds()
        state.config = compile_config()
    return model.get_compiled_call(state.config)


def _warm_up(model: Any, inputs: dict[str, Any], length: int) -> None:
    """Compile the decode step for a `length` cache: two tokens through `generate`, as a request runs."""
    ids = inputs["input_ids"][:, :1]
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=2,
        min_new_tokens=2,
        do_sample=False,
        pad_token_id=0,
        cache=static_cache(model, length),
        compile_config=_state(model).config,
    )


def decode_kwargs(model: Any, inputs: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """Extra `model.generate` arguments that decode through the compiled step, or {} (eager decode,
    with a warning the first time) where that cannot work on this model, input or machine."""
    state = _state(model)
    if state.failed is None:
        reason = unsupported(model)
        if reason is not None:
            state.failed = reason
            log.warning("compiled decode unavailable, decoding eagerly: %s", reason)
    if state.failed is not None:
        return {}
    reason = unsupported(model, inputs)
    if reason is not None:
        log.info("compiled decode skipped for this request: %s", reason)
        return {}
    length = cache_length(model, int(inputs["input_ids"].shape[1]) + max_new_tokens)
    compiled_forward(model)
    if length not in state.lengths:
        try:
            _warm_up(model, inputs, length)
        except Exception as e:  # any compiler or dynamo failure means: decode eagerly
            state.failed = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log.warning("torch.compile of the decode step failed, decoding eagerly: %s", state.failed)
            return {}
        state.lengths.add(length)
    return {"cache": static_cache(model, length), "compile_config": state.config}
