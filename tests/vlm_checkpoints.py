"""Quantized tiny VLM checkpoints, built the way `rpiq quantize` builds them, shared by the test modules.

Each family's random model is saved with its processor files as a model directory (what a user
downloads), loaded back with `load_fp_model` (so ``name_or_path`` points at it, as in the CLI),
quantized with image calibration, and exported with only its *tokenizer*: the processor files must
reach the checkpoint through `save_quantized`'s copy from the source directory, as after a
text-calibrated run. One build per family per test session (`build`, cached).

CogVLM2 is built as it ships (`write_remote_cogvlm2`): `models.cogvlm2`'s source written into the model
directory as its remote code, under a ``model_type`` nothing in this process registers, so it only
loads with ``trust_remote_code`` and the checkpoint must carry the ``.py`` file.
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptq_format import QuantizedWeight, save_quantized
from models.loading import load_fp_model
from quantizer.config import GPTQConfig, GridConfig, quant_config
from quantizer.pipeline import quantize_model
from quantizer.vlm_calibration import builtin_samples, vlm_batches
from tests.tiny_vlms import FAMILIES, TEMPLATE

CFG = quant_config("gptq", grid=GridConfig(bits=4, group_size=32), gptq=GPTQConfig(block_size=32))
SERVED = ("idefics3", "qwen2_vl", "llava")  # the families transformers ships natively
QWEN2_VL_TEMPLATE = TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
REMOTE_TYPE = "cogvlm2_remote"
AUTO_MAP = {
    "AutoConfig": "modeling_cogvlm.CogVLM2Config",
    "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM",
}


@dataclass
class VLMCheckpoint:
    family: str
    source: Path  # the full-precision model directory (with processor files)
    path: Path  # the int4 checkpoint
    quantized: torch.nn.Module  # the in-memory model after quantization (weights on the int4 grid)
    weights: dict[str, QuantizedWeight]
    batch: dict[str, Any]  # one calibration batch (image + text), float32


def write_remote_cogvlm2(path: Path) -> None:
    """A CogVLM2-style directory: weights, tokenizer, config with ``auto_map``, and its modeling code."""
    import models.cogvlm2

    vlm = FAMILIES["cogvlm2"]()
    vlm.model.save_pretrained(path)
    vlm.processor.save_pretrained(path)
    source = Path(models.cogvlm2.__file__).read_text()
    source = source.replace('model_type = "cogvlm2"', f'model_type = "{REMOTE_TYPE}"')
    source = re.sub(r"^Auto\w+\.register\(.*\)$", "", source, flags=re.M)  # remote code registers nothing
    (path / "modeling_cogvlm.py").write_text(source)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=REMOTE_TYPE, auto_map=AUTO_MAP)
    (path / "config.json").write_text(json.dumps(config, indent=2))


def save_source(family: str, vlm: Any, path: Path) -> None:
    """The model directory a user would have: weights, config, tokenizer, processor files."""
    if family == "cogvlm2":
        write_remote_cogvlm2(path)
        return
    vlm.model.save_pretrained(path)
    if family == "qwen2_vl":  # no torchvision here: save the processor's parts, as the real repo has them
        from transformers import Qwen2VLImageProcessor

        tok = vlm.processor
        tok.chat_template = QWEN2_VL_TEMPLATE
        tok.save_pretrained(path)
        Qwen2VLImageProcessor(
            min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2, temporal_patch_size=2
        ).save_pretrained(path)
    else:
        vlm.processor.save_pretrained(path)


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="rpiq-vlm-ckpt-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def build(family: str) -> VLMCheckpoint:
    """Quantize `family`'s tiny VLM on two image samples (language and vision towers) and export it."""
    torch.manual_seed(0)
    vlm = FAMILIES[family]()
    source = _root() / f"tiny-{family}"
    save_source(family, vlm, source)
    remote = family == "cogvlm2"
    model, tok, _ = load_fp_model(str(source), trust_remote_code=remote)
    samples = builtin_samples(2, size=(64, 48))
    batches = vlm_batches(model, samples, tokenizer=tok) if remote else vlm.inputs(samples)
    result = quantize_model(model, batches, CFG, progress=False, vision=True)
    path = save_quantized(
        model, result.weights, _root() / f"tiny-{family}-w4", tokenizer=tok, checkpoint_format="gptq_v2"
    )
    return VLMCheckpoint(family, source, path, model, dict(result.weights), batches[0])
