"""Which transformers class to build for a config: causal LMs and vision-language models alike.

`AutoModelForCausalLM` builds only the language tower of most VLMs (or refuses them), so a
checkpoint's tensor names would not match. The class is taken from ``config.architectures`` when
transformers has it (what ``save_pretrained`` and `save_quantized` record), else from the
image-text-to-text Auto mapping, else the causal-LM one.
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig


def is_vision_language(config: PretrainedConfig) -> bool:
    """A config with a vision tower (CogVLM2's is a plain dict) or an image-text-to-text class."""
    return getattr(config, "vision_config", None) is not None


def model_class(config: PretrainedConfig) -> Any:
    """The class (or Auto class) whose ``_from_config``/``from_pretrained`` builds `config`'s model."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if is_vision_language(config) and type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def from_config(config: PretrainedConfig, *, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """Build `config`'s model (random or empty weights, per the caller's context managers).

    `trust_remote_code` lets a config whose ``auto_map`` names the checkpoint's own modeling code
    (CogVLM2) build that class; transformers refuses it otherwise.
    """
    cls = model_class(config)
    if cls in (AutoModelForCausalLM, AutoModelForImageTextToText):
        return cls.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    return cls._from_config(config, **kwargs)
