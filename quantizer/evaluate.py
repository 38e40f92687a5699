"""Perplexity by the GPTQ evaluation protocol.

Why this protocol: perplexities reported for GPTQ / AWQ / RPIQ are only comparable when measured
the same way: non-overlapping windows of ``seqlen`` tokens (see
:func:`quantizer.data.evaluation_windows`), each scored independently with no carried-over context,
next-token cross-entropy over the ``seqlen - 1`` predicted positions, and
``ppl = exp(total NLL / total predicted tokens)``. The reference code computes
``exp(sum(mean_loss_i * seqlen) / (n * seqlen))``; with equal-length windows this is the same number.

The loss is always computed in float32, because half-precision log-softmax over a 50k-260k vocab
loses exactly the small differences a quantization study is after.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, seqlen, vocab]`` from any HF-style causal LM (``model(ids).logits``)."""
    out = model(input_ids=input_ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"Model returned logits of shape {tuple(logits.shape)}; expected "
            f"[{input_ids.shape[0]}, {input_ids.shape[1]}, vocab]"
        )
    return logits


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> float:
    """Perplexity of ``model`` on token ``windows`` ``[n, seqlen]`` (GPTQ protocol).

    Args:
        model: a causal LM whose forward accepts ``input_ids`` and ``use_cache`` and returns an object
            with ``.logits`` (any ``AutoModelForCausalLM``). It must already live on ``device`` (or be
            dispatched with accelerate); it is switched to eval mode for the measurement and
            restored afterwards.
        windows: int token ids, one independent window per row (``seqlen >= 2``).
        batch_size: windows per forward pass; changes speed/memory only, not the result
            (up to float rounding).
        device: where the input ids are sent.
        progress: show a tqdm progress bar.

    Returns:
        ``exp(sum of token NLLs / number of predicted tokens)`` as a Python float.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be 2-D [n, seqlen], got shape {tuple(windows.shape)}")
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise ValueError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    n, seqlen = windows.shape
    if n < 1 or seqlen < 2:
        raise ValueError(f"need at least one window of at least 2 tokens, got shape {tuple(windows.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_nll = 0.0  # Python float (double) accumulator: no drift over hundreds of windows
    total_tokens = 0
    try:
        with torch.inference_mode():
            bar = tqdm(total=n, desc="perplexity", unit="win", disable=not progress)
            try:
                for start in range(0, n, batch_size):
                    batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
                    logits = _logits(model, batch)
                    shift_logits = logits[:, :-1, :].float()
                    targets = batch[:, 1:].to(shift_logits.device)
                    nll = F.cross_entropy(
                        shift_logits.reshape(-1, shift_logits.shape[-1]),
                        targets.reshape(-1),
                        reduction="sum",
                    )
                    total_nll += float(nll)
                    total_tokens += targets.numel()
                    bar.update(batch.shape[0])
                    del logits, shift_logits, nll
            finally:
                bar.close()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)
