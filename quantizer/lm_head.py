"""Quantizing the output projection (LM head), after the decoder layers."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gptq_format import QuantizedWeight

from .capture import StopForward, forward_batch
from .config import QuantConfig
from .hessian import HessianAccumulator
from .layer import quantize_weight
from .result import LayerReport
from .tower import Calibration, batches, set_weight


def quantize_lm_head(
    model: nn.Module, calib: Calibration, cfg: QuantConfig, device: torch.device
) -> tuple[str, QuantizedWeight, LayerReport]:
    """Quantize the output projection on the inputs the (already quantized) model gives it.

    For a small model with a large vocabulary the LM head is the largest single weight and the
    biggest read per decoded token. Its Hessian comes from one more pass of the calibration
    windows through the whole model (on `device`, so the model must fit there once), stopped
    at the head. A head tied to the input embeddings is untied first: the embeddings stay in
    full precision and the config records ``tie_word_embeddings=False``, so loaders keep both.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the model's output embeddings are a {type(head).__name__}, not a Linear")
    name = next(n for n, m in model.named_modules() if m is head)
    embed = model.get_input_embeddings()
    if embed is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        for cfg_obj in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg_obj.tie_word_embeddings = False
    acc: HessianAccumulator | None = None

    def hook(module: nn.Module, args: tuple) -> None:
        nonlocal acc
        x = args[0]
        acc = acc or HessianAccumulator(x.shape[-1], device=x.device)
        acc.add(x)
        raise StopForward

    home = next(model.parameters()).device
    model.to(device)
    handle = head.register_forward_pre_hook(hook)
    try:
        for batch in batches(calib):
            with contextlib.suppress(StopForward):
                forward_batch(model, batch, device)
    finally:
        handle.remove()
        model.to(home)
    assert acc is not None
    qw, report = quantize_weight(head.weight.detach().to(device), acc.H, cfg, name=name)
    set_weight(head, qw)
    return name, qw, report
