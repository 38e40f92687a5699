"""A checkpoint as a plain transformers model with dequantized weights (no int4 kernels).

This evaluates a checkpoint the way a GPTQ kernel computes it (up to accumulation order), from
exactly the bytes on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from gptq_format.reader import QuantizedCheckpoint, load_quantized_state
from gptq_format.spec import CONFIG_NAME, CheckpointError


def dequantized_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A plain transformers model whose linears hold the checkpoint's dequantized weights."""
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from .architectures import from_config

    ckpt = load_quantized_state(path)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # or transformers would look for a GPTQ backend
    with no_init_weights():  # every weight is overwritten below; random init is wasted time
        model = from_config(config, dtype=dtype)
    model.tie_weights()  # skipped under no_init_weights; the key check below relies on it
    state = _dequantized_state(ckpt, dtype)
    _check_keys(Path(path), model, state)
    model.load_state_dict(state, strict=False)
    return model.eval()


def _dequantized_state(ckpt: QuantizedCheckpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in ckpt.tensors.items()}
    for name, qw in ckpt.weights.items():
        state[f"{name}.weight"] = qw.dequantize().to(dtype)
    return state


def _check_keys(path: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict loading that still accepts tied weights stored once, as save_pretrained writes them."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model_state = model.state_dict()
    required = set(remove_tied_weights_from_state_dict(dict(model_state), model))
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - set(model_state))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match the {type(model).__name__} built from {CONFIG_NAME}: "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    for key, t in state.items():
        if tuple(model_state[key].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{path}: tensor '{key}' has shape {list(t.shape)}, the model expects {list(model_state[key].shape)}"
            )
