"""Tiny Llama (tied embeddings) and OPT (biases) models quantized layer by layer, shared by the
checkpoint and int4 tests: real quantizer, random-input Hessians, a few seconds on one core."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from gptq_format import QuantizedWeight
from quantizer.config import QuantConfig
from quantizer.layer import quantize_weight


def tiny_llama(layers: int = 2, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(1)
    cfg = OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
        word_embed_proj_dim=64,
        max_position_embeddings=64,
    )
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero biases, so a dropped bias would show in the logits
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0.0, 0.1)
    return model


def quantize_linears(model: nn.Module, cfg: QuantConfig, seed: int = 0) -> dict[str, QuantizedWeight]:
    """Every linear except lm_head (as GPTQ tools do), on H = 2/n X^T X from random inputs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            X = torch.randn(128, mod.in_features, generator=g)
            out[name], _ = quantize_weight(mod.weight.detach(), 2.0 / 128 * X.t() @ X, cfg, name=name)
    return out


def substituted(model: nn.Module, quantized: dict[str, QuantizedWeight], dtype: torch.dtype) -> nn.Module:
    """The in-memory model a checkpoint stands for: other tensors rounded through `dtype`."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
        for name, qw in quantized.items():
            ref.get_submodule(name).weight.copy_(qw.dequantize())
    return ref


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device)).logits.float().cpu()
