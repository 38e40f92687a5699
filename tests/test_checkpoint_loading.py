"""GPTQ checkpoints that fail to load name the problem; third-party loaders read ours.

Cases and fixtures are shared with `test_checkpoint.py` (`tests.checkpoint_cases`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gptq_format import CheckpointError, load_quantized_state, save_quantized
from models.dequantized import dequantized_model

from .checkpoint_cases import (  # noqa: F401 (fixtures `llama`, `quantized`)
    Q_PROJ,
    llama_fixture,
    quantized_fixture,
    rewrite_tensors,
)
from .limits import generous
from .quantized_models import logits

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- load-time errors


@pytest.fixture
def saved(llama, quantized, tmp_path) -> Path:
    return save_quantized(llama, quantized("g32"), tmp_path / "ck")


def test_truncated_file_names_the_file(saved):
    f = saved / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"ck/model\.safetensors: corrupt or truncated"):
        load_quantized_state(saved)


def test_truncated_shard_names_the_shard(llama, quantized, tmp_path):
    out = save_quantized(llama, quantized("g32"), tmp_path / "ck", max_shard_bytes=16_000)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=shard.name):
        load_quantized_state(out)


def test_missing_scales_names_the_tensor(saved):
    rewrite_tensors(saved, lambda t: t.pop(f"{Q_PROJ}.scales"))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{Q_PROJ}\.scales' is missing"):
        load_quantized_state(saved)


def test_wrong_shape_and_dtype_name_the_tensor(saved):
    rewrite_tensors(saved, lambda t: t.update({f"{Q_PROJ}.scales": t[f"{Q_PROJ}.scales"][:1].clone()}))
    with pytest.raises(CheckpointError, match=rf"'{Q_PROJ}\.scales' has shape \[1, 64\]; expected \[2, 64\]"):
        load_quantized_state(saved)
    rewrite_tensors(saved, lambda t: t.update({f"{Q_PROJ}.qweight": t[f"{Q_PROJ}.qweight"].long()}))
    with pytest.raises(CheckpointError, match=rf"'{Q_PROJ}\.qweight' has dtype torch\.int64"):
        load_quantized_state(saved)


def test_qweight_rows_must_match_the_groups(saved):
    rewrite_tensors(saved, lambda t: t.update({f"{Q_PROJ}.qweight": t[f"{Q_PROJ}.qweight"][:4].clone()}))
    with pytest.raises(CheckpointError, match=rf"'{Q_PROJ}\.scales' has shape \[2, 64\]; expected \[1, 64\]"):
        load_quantized_state(saved)


def test_config_errors(saved):
    config = json.loads((saved / "config.json").read_text())
    for patch, message in [
        ({"bits": 5}, "bits=5 is not supported"),
        ({"quant_method": "awq"}, "quant_method='awq' is not supported"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ]:
        bad = {**config, "quantization_config": {**config["quantization_config"], **patch}}
        (saved / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=message):
            load_quantized_state(saved)
    (saved / "quantize_config.json").unlink()
    (saved / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    with pytest.raises(CheckpointError, match="no 'quantization_config'"):
        load_quantized_state(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file is missing"):
        load_quantized_state(saved)


# --------------------------------------------------------------------------- third-party loader

_THIRD_PARTY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    def weights(model):
        qlinears = ((n, m) for n, m in model.named_modules() if hasattr(m, "qweight"))
        return {n: m.dequantize_weight().float().t() for n, m in qlinears}

    out = {}
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    for path in sys.argv[2:]:
        g = GPTQModel.load(path, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
        # transformers' own GPTQ integration (optimum + gptqmodel kernels); only the backend is ours,
        # every other field comes from the checkpoint's quantization_config
        bits = json.load(open(path + "/config.json"))["quantization_config"]["bits"]
        backend = GPTQConfig(bits=bits, backend="torch")
        hf = AutoModelForCausalLM.from_pretrained(
            path, device_map="cpu", dtype=torch.float16, quantization_config=backend
        )
        with torch.no_grad():
            out[path] = {
                "gptqmodel": g(ids).logits.float(),
                "transformers": hf(ids).logits.float(),
                "weights": weights(g),
            }
    torch.save(out, sys.argv[1])
    """
)


def test_gptqmodel_loads_our_checkpoints(llama, quantized, tmp_path):
    """GPTQModel's own torch kernel must decode our files to the same weights and logits.

    Not `pytest.importorskip`: importing gptqmodel sets process-wide env vars and patches
    libraries, so it runs in a subprocess and the test only checks that it is installed.
    GPTQModel refuses asymmetric v1 ('gptq') checkpoints not produced by itself, so asymmetric
    cases are checked in gptq_v2 and v1 with the symmetric grid.
    """
    if importlib.util.find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel is not installed (pip install '.[thirdparty]')")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(  # GPTQModel.load insists on a tokenizer
        tokenizer_object=Tokenizer(WordLevel(vocab={f"<{i}>": i for i in range(256)}, unk_token="<0>")),
        unk_token="<0>",
    )
    cases = [("g32", "gptq_v2"), ("act_order", "gptq_v2"), ("3bit", "gptq_v2"), ("8bit_channel", "gptq_v2")]
    cases += [("partial_group", "gptq_v2")]
    cases += [("sym", "gptq")]
    paths = {}
    for case, fmt in cases:
        paths[case] = str(save_quantized(llama, quantized(case), tmp_path / case, checkpoint_format=fmt, tokenizer=tok))
    result_file = tmp_path / "gptqmodel.pt"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _THIRD_PARTY_SCRIPT, str(result_file), *paths.values()],
        capture_output=True,
        text=True,
        timeout=generous(300),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(result_file)
    for case, path in paths.items():
        qs = quantized(case)
        # their weights are ours rounded to float16, bit for bit
        assert sorted(theirs[path]["weights"]) == sorted(qs), case
        for name, w in theirs[path]["weights"].items():
            assert torch.equal(w, qs[name].dequantize().half().float()), (case, name)
        # logits differ from ours only by float16 arithmetic
        ours = logits(dequantized_model(path))
        for loader in ("gptqmodel", "transformers"):
            err = (theirs[path][loader] - ours).abs().max().item()
            assert err < 5e-3, (case, loader, err)
