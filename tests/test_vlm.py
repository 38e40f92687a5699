"""Vision-language models end to end: image calibration, quantization, GPTQ export, int4 reload."""

from __future__ import annotations

import copy

import pytest
import torch

from gptq_format import save_quantized
from models.int4 import load_quantized
from quantizer.adapters import get_adapter
from quantizer.config import CalibrationConfig, GPTQConfig, GridConfig, RefineConfig, quant_config
from quantizer.pipeline import quantize_model
from quantizer.vlm_calibration import PHOTOS, TEXTS, builtin_samples
from tests.tiny_vlms import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")

# Stage 2 on the layer loss itself (no ridge), where it never ends above GPTQ's, which the tests assert.
CFG = quant_config(
    "rpiq", grid=GridConfig(bits=4, group_size=32), gptq=GPTQConfig(block_size=32), refine=RefineConfig(percdamp=0.0)
)


@pytest.fixture(scope="module")
def samples():
    return builtin_samples(4, size=(64, 48))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


def _tower_linears(model, adapter) -> set[str]:
    n = len(adapter.layers(model))
    return {f"{adapter.layers_path}.{i}.{name}" for i in range(n) for name in adapter.linear_names()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantize_with_images_export_and_run_on_int4(family, samples, tmp_path):
    vlm = FAMILIES[family]()
    batches = vlm.inputs(samples)
    model = vlm.model
    fp = copy.deepcopy(model)
    adapter = get_adapter(model)
    result = quantize_model(model, batches, CFG, progress=False, vision=True)
    # Both towers, every block's linears, nothing else (projector and embeddings stay 16-bit).
    assert set(result.weights) == _tower_linears(model, adapter) | _tower_linears(model, adapter.vision)
    for rep in result.reports:
        assert 0 < rep.loss_final <= rep.loss_gptq * (1 + 1e-6) < rep.loss_rtn, rep.name
    fp_params = dict(fp.named_parameters())
    for name, p in model.named_parameters():
        if name.removesuffix(".weight") not in result.weights:
            assert torch.equal(p, fp_params[name]), name
    ref, quant = _logits(fp, batches[0]), _logits(model, batches[0])
    assert 0 < torch.mean((quant - ref) ** 2) < 0.05 * torch.mean(ref**2)

    out = save_quantized(model, result.weights, tmp_path / "ckpt", tokenizer=vlm.processor, checkpoint_format="gptq_v2")
    loaded = load_quantized(out, kernel="auto")
    assert type(loaded) is type(model)  # the VLM class, not its bare language model
    assert sum(loaded.int4_kernels.values()) == len(result.weights)
    int4 = _logits(loaded, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _flat(batches[0])})
    # bf16 activations and kernel accumulation only: far below the quantization error itself.
    err = torch.mean((int4 - quant) ** 2)
    assert err < 0.05 * torch.mean((quant - ref) ** 2) + 1e-4 * torch.mean(quant**2), float(err)


def _flat(batch):
    """Batch items with CogVLM's List[List[Tensor]] images stacked, so they can be cast."""
    for k, v in batch.items():
        yield k, torch.stack([img for sample in v for img in sample]) if isinstance(v, list) else v


def test_default_policy_keeps_vision_tower_projector_and_embeddings(samples):
    vlm = FAMILIES["llava"]()
    fp = copy.deepcopy(vlm.model)
    result = quantize_model(vlm.model, vlm.inputs(samples), CFG, progress=False)
    assert all(name.startswith("model.language_model.layers.") for name in result.weights)
    assert len(result.weights) == 2 * 7
    fp_params = dict(fp.named_parameters())
    for name, p in vlm.model.named_parameters():
        if not name.startswith("model.language_model.layers."):
            assert torch.equal(p, fp_params[name]), name


def test_image_calibration_changes_the_language_hessians(samples):
    """Image features reach the language tower: its result differs from one without pixels."""
    vlm = FAMILIES["llava"]()
    batches = vlm.inputs(samples)
    with_images = quantize_model(copy.deepcopy(vlm.model), batches, CFG, progress=False)
    model = vlm.model
    image_id = model.config.image_token_index
    text_only = []
    for b in batches:  # same token ids, but the image positions hold the token embedding, not image features
        ids = b["input_ids"].clone()
        ids[ids == image_id] = 0
        text_only.append({"input_ids": ids, "attention_mask": b["attention_mask"]})
    without = quantize_model(copy.deepcopy(model), text_only, CFG, progress=False)
    name = "model.language_model.layers.0.self_attn.q_proj"
    assert not torch.equal(with_images.weights[name].codes, without.weights[name].codes)


def test_builtin_image_set_is_deterministic_and_answers_are_ground_truth():
    a, b = builtin_samples(8, seed=3), builtin_samples(8, seed=3)
    other = builtin_samples(8, seed=4)
    assert [s.answer for s in a[: len(PHOTOS)]] == [p[2] for p in PHOTOS]
    for x, y in zip(a, b, strict=True):
        assert x.answer == y.answer and x.image.tobytes() == y.image.tobytes()
    generated = a[len(PHOTOS) :]
    assert all(s.answer in TEXTS for s in generated)
    assert any(x.image.tobytes() != y.image.tobytes() for x, y in zip(generated, other[len(PHOTOS) :], strict=True))
    with pytest.raises(ValueError, match="at least one"):
        builtin_samples(0)


def test_single_instance_mode_runs_on_image_batches(samples):
    vlm = FAMILIES["qwen2_vl"]()
    ref = _logits(vlm.model, vlm.inputs(samples)[0])
    batches = vlm.inputs(samples)
    cal = CalibrationConfig(mode="single-instance", instance_windows=2)
    result = quantize_model(vlm.model, batches, CFG.model_copy(update={"calibration": cal}), progress=False)
    assert len(result.weights) == 2 * 7
    err = torch.mean((_logits(vlm.model, batches[0]) - ref) ** 2)
    assert 0 < err < 0.05 * torch.mean(ref**2)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cli_quantizes_a_vlm_directory_with_images(family, tmp_path):
    """Qwen2-VL's processor has a video half that demands torchvision; calibration (like serving)
    builds it without, so the directory a user has quantizes as it is."""
    from typer.testing import CliRunner

    from models.loading import load_processor
    from rpiq.cli import app
    from tests.vlm_checkpoints import save_source

    vlm = FAMILIES[family]()
    src = tmp_path / f"tiny-{family}"
    save_source(family, vlm, src)
    out = tmp_path / "q"
    args = ["quantize", str(src), "--out", str(out), "--calib-data", "images", "--nsamples", "2", "--group-size", "32"]
    vision = ["--quantize-vision"] if family == "llava" else []
    result = CliRunner().invoke(app, [*args, *vision, "--no-progress"])
    assert result.exit_code == 0, result.output
    loaded = load_quantized(out)
    language = 2 * 7
    assert sum(loaded.int4_kernels.values()) == (language + 2 * 6 if vision else language)
    processor = load_processor(out)  # the processor travels with the checkpoint
    assert hasattr(processor, "image_processor") and processor.tokenizer is not None
