"""The reference-library GPTQ baselines: llm-compressor (benchmarks/reference_gptq.py, in .venv-ref)
and GPTQModel v1 / v2 (benchmarks/gptqmodel_worker.py, in .venv-gptqmodel).

Each runs only where `bash scripts/install_reference.sh [gptqmodel]` has created its venv; skipped, saying so,
elsewhere. A quick run (2 x 128 calibration tokens, 2 x 128 evaluation tokens, ~1-2 min on 2 cores).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.limits import generous

ROOT = Path(__file__).resolve().parent.parent
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
SCRIPT = ROOT / "benchmarks" / "reference_gptq.py"

pytestmark = pytest.mark.slow

QUICK = {"nsamples": 2, "seqlen": 128, "eval_seqlen": 128, "eval_windows": 2}


@pytest.fixture(scope="module")
def ref_python() -> Path:
    if not REF_PYTHON.exists():
        pytest.skip(f"{REF_PYTHON} does not exist: run `bash scripts/install_reference.sh` to install llm-compressor")
    return REF_PYTHON


def _fp_ppl(model_dir: Path) -> float:
    from models.loading import load_fp_model
    from quantizer.data import evaluation_windows, load_text
    from quantizer.evaluate import perplexity

    model, tok, _ = load_fp_model(str(model_dir))
    ev = evaluation_windows(tok, load_text("heldout"), QUICK["eval_seqlen"], max_windows=QUICK["eval_windows"])
    return perplexity(model, ev)


def test_reference_gptq_quick_run(ref_python, default_model_dir, tmp_path):
    out = tmp_path / "ref.json"
    cmd = [
        str(ref_python), str(SCRIPT), "--model", str(default_model_dir), "--bits", "4", "--group-size", "128",
        "--nsamples", str(QUICK["nsamples"]), "--seqlen", str(QUICK["seqlen"]), "--seed", "0",
        "--eval", "heldout", "--eval-seqlen", str(QUICK["eval_seqlen"]),
        "--eval-windows", str(QUICK["eval_windows"]), "--eval2", "calib", "--fp-ppl", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=generous(900))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert out.is_file()
    row = json.loads(out.read_text())

    fp = _fp_ppl(default_model_dir)
    assert math.isfinite(row["ppl"])
    assert row["ppl"] > fp, (row["ppl"], fp)
    assert row["ppl"] < 3 * fp, (row["ppl"], fp)  # 4-bit g128 GPTQ: a modest loss, not a broken model
    # The FP model gives the same perplexity under the reference venv's transformers.
    assert row["fp_ppl_this_env"] == pytest.approx(fp, rel=1e-3)

    assert row["eval2"] == "calib" and math.isfinite(row["ppl_eval2"]) and row["ppl_eval2"] > 1

    assert row["grid_check"]["passed"], row["grid_check"]
    for m in row["grid_check"]["modules"].values():
        assert m["max_distinct_per_group"] <= 16
        assert m["fraction_weights_changed"] > 0.5
    assert row["calibration_check"]["passed"], row["calibration_check"]
    assert row["quantized_linears"]["not_quantized"] == ["lm_head"]

    assert row["method"] == "gptq-llmcompressor"
    for key, value in {"bits": 4, "group_size": 128, "calib": "sequential", "seed": 0, "eval": "heldout"}.items():
        assert row[key] == value
    assert row["nsamples"] == QUICK["nsamples"] and row["seqlen"] == QUICK["seqlen"]
    assert row["quantize_seconds"] > 0 and row["peak_rss_mb_before_eval"] > 0
    assert row["versions"]["llmcompressor"] == "0.14.0.1"
    assert row["settings"]["dampening_frac"] == 0.01 and row["settings"]["actorder"] is None
    assert row["settings"]["symmetric"] is False and row["settings"]["block_size"] == 128


# --------------------------------------------------------------------------- GPTQModel (v1 GPTQ, v2 GPTAQ)

GPTQMODEL_PYTHON = ROOT / ".venv-gptqmodel" / "bin" / "python"
GPTQMODEL_SCRIPT = ROOT / "benchmarks" / "gptqmodel_worker.py"


@pytest.fixture(scope="module")
def gptqmodel_python() -> Path:
    if not GPTQMODEL_PYTHON.exists():
        pytest.skip(f"{GPTQMODEL_PYTHON} does not exist: run `bash scripts/install_reference.sh gptqmodel`")
    return GPTQMODEL_PYTHON


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_gptqmodel_quick_run_on_cpu(gptqmodel_python, default_model_dir, tmp_path, variant):
    """GPTQModel quantizes on the CPU, on our windows; its checkpoint, dequantized into our model,
    scores like its own modules, and every checked (row, group) holds at most 2**bits levels."""
    out = tmp_path / "gptqmodel.json"
    cmd = [
        str(gptqmodel_python), str(GPTQMODEL_SCRIPT), "--variant", variant, "--model", str(default_model_dir),
        "--bits", "4", "--group-size", "128", "--nsamples", str(QUICK["nsamples"]), "--seqlen", str(QUICK["seqlen"]),
        "--seed", "0", "--eval", "heldout", "--eval-seqlen", str(QUICK["eval_seqlen"]),
        "--eval-windows", str(QUICK["eval_windows"]), "--eval2", "calib", "--fp-ppl", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=generous(900))
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(out.read_text())

    fp = _fp_ppl(default_model_dir)
    assert row["fp_ppl_this_env"] == pytest.approx(fp, rel=1e-3)  # same model, same windows, same code
    assert math.isfinite(row["ppl"]) and fp < row["ppl"] < 3 * fp, (row["ppl"], fp)
    assert row["eval2"] == "calib" and math.isfinite(row["ppl_eval2"])
    assert row["grid_check"]["passed"], row["grid_check"]
    for m in row["grid_check"]["modules"].values():
        assert m["max_distinct_per_group"] <= 16 and m["fraction_weights_changed"] > 0.5
    assert row["calibration_check"]["passed"], row["calibration_check"]
    assert row["quantized_linears"]["not_quantized"] == ["lm_head"]
    # The library's own (bf16) forward on its loaded checkpoint agrees with our float32 copy.
    assert row["library_forward_check"]["relative_difference"] < 0.05, row["library_forward_check"]
    assert row["method"] == f"gptqmodel-{variant}" and row["versions"]["gptqmodel"] == "7.7.0"
    assert row["settings"]["gptaq_alpha"] == (0.25 if variant == "v2" else None)
    assert row["settings"]["damp_percent"] == 0.01 and row["settings"]["symmetric"] is False
