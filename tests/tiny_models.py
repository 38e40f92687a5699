"""Tiny random-weight instances of every supported architecture, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2)


def _decoder(config_cls, **extra):
    return config_cls(**COMMON, num_attention_heads=4, num_key_value_heads=2, **extra)


CONFIGS = {
    "llama": lambda: _decoder(LlamaConfig, tie_word_embeddings=True),
    "mistral": lambda: _decoder(MistralConfig),
    "qwen2": lambda: _decoder(Qwen2Config),
    "qwen3": lambda: _decoder(Qwen3Config, head_dim=16),
    # Sliding-window and full-attention layers get different masks and rotary embeddings.
    "gemma3": lambda: _decoder(
        Gemma3TextConfig,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=128,
    ),
    "llava": lambda: LlavaConfig(
        text_config=_decoder(LlamaConfig),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        image_token_index=VOCAB - 1,
    ),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = LlavaForConditionalGeneration(config) if arch == "llava" else AutoModelForCausalLM.from_config(config)
    # Random init gives near-identical tiny weights everywhere; widen them so that quantization
    # error is far above float noise and the methods can be told apart.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    return model.eval()
