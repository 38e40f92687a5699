"""Tiny random-weight vision-language models of every supported family, with their inputs.

Each family is built from a transformers config (CogVLM2 from `models.cogvlm2`) with a byte-level
tokenizer made on the spot, so that real processors (LLaVA, Idefics3) and CogVLM2's prompt
builder turn calibration images into model inputs exactly as they do for real checkpoints.
Qwen2-VL's and Qwen2.5-VL's processors need torchvision for their video half, which is not installed
here: their inputs come from the image processor plus the same image-pad expansion the processor performs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from quantizer.vlm_calibration import CalibSample, vlm_batches

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def byte_tokenizer(special: list[str]) -> PreTrainedTokenizerFast:
    """256 byte tokens plus bos/eos/pad and `special`: a real fast tokenizer with a tiny vocabulary."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": special})
    return fast


@dataclass
class TinyVLM:
    model: torch.nn.Module
    inputs: Callable[[list[CalibSample]], list[dict[str, Any]]]  # calibration samples -> model batches
    processor: Any  # what save_quantized stores beside the weights (processor or tokenizer)


def _widen(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves tiny near-identical weights; widen them so quantization error is visible."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    return model.eval()


def llava() -> TinyVLM:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = byte_tokenizer(["<image>"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=TEMPLATE.replace("IMAGE", "<image>"),
    )
    config = LlavaConfig(
        text_config=LlamaConfig(vocab_size=len(tok), **TEXT),
        vision_config=CLIPVisionConfig(**VISION),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model = _widen(LlavaForConditionalGeneration(config))
    return TinyVLM(model, lambda s: vlm_batches(model, s, processor=processor), processor)


def idefics3() -> TinyVLM:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tok = byte_tokenizer(["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"])
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False
    )
    template = TEMPLATE.replace("IMAGE", "<image>")
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=template
    )
    config = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tok), **TEXT),
        vision_config=dict(VISION),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    model = _widen(Idefics3ForConditionalGeneration(config))
    return TinyVLM(model, lambda s: vlm_batches(model, s, processor=processor), processor)


def _qwen_vl(config_cls: Any, model_cls: Any, vision_config: dict[str, Any], max_pixels: int) -> TinyVLM:
    """Qwen2-VL and Qwen2.5-VL share their tokens, image processor and input layout."""
    from transformers import Qwen2VLImageProcessor

    special = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
    tok = byte_tokenizer(special)
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    image_processor = Qwen2VLImageProcessor(
        min_pixels=16 * 16, max_pixels=max_pixels, patch_size=4, merge_size=2, temporal_patch_size=2
    )
    config = config_cls(
        text_config=dict(vocab_size=len(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **TEXT),
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
    )
    model = _widen(model_cls(config))

    def inputs(samples: list[CalibSample]) -> list[dict[str, Any]]:
        out = []
        for s in samples:
            pix = image_processor(images=[s.image], return_tensors="pt")
            n = int(pix["image_grid_thw"].prod()) // 4  # merge_size**2 patches per token
            image = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
            text = f"user: {image}{s.question}\nassistant: {s.answer}\n"
            enc = tok(text, return_tensors="pt")
            mm_types = (enc["input_ids"] == ids["<|image_pad|>"]).long()  # 1 = image, as the processor marks them
            batch = dict(enc, mm_token_type_ids=mm_types, pixel_values=pix["pixel_values"])
            out.append(dict(batch, image_grid_thw=pix["image_grid_thw"]))
        return out

    return TinyVLM(model, inputs, tok)


def qwen2_vl() -> TinyVLM:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(
        depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, mlp_ratio=2,
    )  # fmt: skip
    return _qwen_vl(Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision, max_pixels=32 * 32)


def qwen2_5_vl() -> TinyVLM:
    """Qwen2.5-VL: Qwen2-VL's inputs, but a vision tower of gated-MLP blocks that alternate windowed
    and full attention. 32 px windows over up to 64x64 px images (a 16x16 patch grid, 8x8 merged
    tokens): four windows per image in blocks 0 and 2, the whole image in block 1."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(
        depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=4,
        spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
    )  # fmt: skip
    return _qwen_vl(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision, max_pixels=64 * 64)


def cogvlm2() -> TinyVLM:
    from models.cogvlm2 import CogVLM2Config, CogVLMForCausalLM

    tok = byte_tokenizer([])
    config = CogVLM2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_multi_query_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        vision_config=dict(
            dropout_prob=0.0, hidden_act="gelu", in_channels=3, num_hidden_layers=2, hidden_size=32, patch_size=7,
            num_heads=2, intermediate_size=64, layer_norm_eps=1e-6, num_positions=65, image_size=56,
        ),
    )  # fmt: skip
    torch.manual_seed(0)
    model = _widen(CogVLMForCausalLM(config))
    return TinyVLM(model, lambda s: vlm_batches(model, s, tokenizer=tok), tok)


FAMILIES: dict[str, Callable[[], TinyVLM]] = {
    "llava": llava,
    "idefics3": idefics3,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "cogvlm2": cogvlm2,
}
