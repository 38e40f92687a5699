"""The CogVLM2 stand-in: adapter, routing-aware Hessians, position rule, and what needs images."""

from __future__ import annotations

import pytest
import torch

from models.cogvlm2 import build_position_ids, vision_token_count
from quantizer.adapters import COGVLM_GROUPS, COGVLM_ROUTING, VISION_TOKEN_TYPE, discover_linear_groups, get_adapter
from quantizer.pipeline import quantize_model
from quantizer.single_instance import stream_hessians
from quantizer.vlm_calibration import builtin_samples
from tests.tiny_vlms import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm():
    return FAMILIES["cogvlm2"]()


@pytest.fixture(scope="module")
def batches(vlm):
    return vlm.inputs(builtin_samples(3, size=(64, 48)))


def test_module_names_are_the_remote_codes(vlm):
    names = {n for n, _ in vlm.model.named_modules()}
    for expected in (
        "model.layers.1.self_attn.vision_expert_query_key_value",
        "model.layers.1.self_attn.language_expert_dense",
        "model.layers.1.mlp.vision_mlp.down_proj",
        "model.layers.1.mlp.language_mlp.gate_proj",
        "model.vision.transformer.layers.1.attention.query_key_value",
        "model.vision.transformer.layers.1.mlp.fc2",
        "model.vision.linear_proj.dense_4h_to_h",
        "model.vision.conv",
        "lm_head",
    ):
        assert expected in names, expected
    attn = vlm.model.model.layers[0].self_attn
    assert attn.vision_expert_query_key_value.bias is not None  # only the visual QKV has a bias
    assert attn.language_expert_query_key_value.bias is None
    # GQA: q (hidden) + k and v (num_multi_query_heads * head_dim each)
    assert attn.vision_expert_query_key_value.out_features == 64 + 2 * 2 * 16


def test_adapter_groups_match_the_traced_forward(vlm):
    adapter = get_adapter(vlm.model)
    assert adapter.name == "cogvlm2"
    assert adapter.linear_groups == COGVLM_GROUPS
    assert discover_linear_groups(vlm.model, vlm.model.model.layers[0]) == COGVLM_GROUPS
    assert {n for n, t in COGVLM_ROUTING.items() if t == VISION_TOKEN_TYPE} == {
        n for g in COGVLM_GROUPS for n in g if ".vision_" in f".{n}"
    }


def test_position_ids_follow_the_remote_code():
    tt = torch.tensor([[0, 1, 1, 1, 1, 0, 0]])
    assert build_position_ids(tt).tolist() == [[0, 1, 2, 2, 3, 4, 5]]


def _layer0_inputs(model, batch):
    """Full-sequence inputs of layer 0's attention and MLP experts, taken at the norms' outputs."""
    got = {}
    layer = model.model.layers[0]
    hooks = [
        layer.input_layernorm.register_forward_hook(lambda m, a, out: got.__setitem__("attn", out)),
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: got.__setitem__("mlp", out)),
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return got


def test_visual_expert_hessian_equals_the_image_tokens_alone(vlm, batches):
    """Routing-aware calibration: each expert's Hessian is 2/n X^T X over exactly its tokens."""
    model = vlm.model
    adapter = get_adapter(model)
    (catchers,) = stream_hessians(model, adapter, batches, [0], torch.device("cpu"))
    hessian = {n: (c, c.hessian(n)) for c in catchers for n in c.modules}
    rows = {"vision": {"attn": [], "mlp": []}, "language": {"attn": [], "mlp": []}}
    for batch in batches:
        tt = batch["token_type_ids"][0]
        image = (tt == 1).nonzero().flatten()
        vision_pos = image[:-1]  # every image position but the last (eoi), which the text expert takes
        text_pos = torch.tensor(sorted(set(range(tt.numel())) - set(vision_pos.tolist())))
        assert vision_pos.numel() == vision_token_count(model.config) - 1
        x = _layer0_inputs(model, batch)
        for site in ("attn", "mlp"):
            rows["vision"][site].append(x[site][0, vision_pos])
            rows["language"][site].append(x[site][0, text_pos])
    for expert in ("vision", "language"):
        for site, name in (
            ("attn", f"self_attn.{expert}_expert_query_key_value"),
            ("mlp", f"mlp.{expert}_mlp.up_proj"),
        ):
            X = torch.cat(rows[expert][site]).double()
            expected = 2.0 / X.shape[0] * X.T @ X
            catcher, H = hessian[name]
            assert catcher.tokens(name) == X.shape[0]
            torch.testing.assert_close(H.double(), expected, rtol=1e-4, atol=1e-6)
    # The two experts really see different tokens.
    assert not torch.allclose(
        hessian["self_attn.vision_expert_query_key_value"][1], hessian["self_attn.language_expert_query_key_value"][1]
    )


def test_text_only_calibration_is_refused_for_the_visual_experts(vlm):
    ids = torch.randint(0, 250, (2, 16))
    with pytest.raises(ValueError, match=r"vision_expert_query_key_value received no calibration tokens .*type 1"):
        quantize_model(vlm.model, ids, progress=False)
