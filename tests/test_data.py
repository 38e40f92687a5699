"""Calibration/evaluation text and GPTQ-protocol windows (no model download needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from quantizer.data import (
    BUILTIN_NAMES,
    calibration_windows,
    evaluation_windows,
    load_text,
    tokenize_text,
)


class CharTokenizer:
    """Minimal stand-in for a HF tokenizer: one token per character (ids = code points)."""

    def __call__(self, text: str, return_tensors: str | None = None) -> dict[str, torch.Tensor]:
        assert return_tensors == "pt"
        return {"input_ids": torch.tensor([[ord(c) for c in text]], dtype=torch.int64)}


def _word_level_tokenizer(text: str):  # -> PreTrainedTokenizerFast, built locally (no download)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for w, _ in pre.pre_tokenize_str(text)})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _is_contiguous_slice(window: torch.Tensor, ids: torch.Tensor) -> int:
    """Offset where ``window`` occurs in ``ids`` (asserts that it does)."""
    n = window.numel()
    hits = (ids.unfold(0, n, 1) == window).all(dim=1).nonzero()
    assert hits.numel() > 0, "window is not a contiguous slice of the tokenized text"
    return int(hits[0])


# ----------------------------------------------------------------------------------------- load_text


def test_builtin_texts_are_the_shipped_novels() -> None:
    calib = load_text("calib")
    heldout = load_text("heldout")
    assert "Persuasion" in calib[:200] or "PERSUASION" in calib[:200]
    assert "NORTHANGER ABBEY" in heldout[:200]
    assert len(calib) > 400_000 and len(heldout) > 400_000
    assert calib != heldout


def test_load_text_from_path(tmp_path: Path) -> None:
    p = tmp_path / "wiki.test.raw"
    p.write_text(" = Valkyria Chronicles = \n\nSome text.\n", encoding="utf-8")
    assert load_text(str(p)) == p.read_text(encoding="utf-8")


def test_load_text_unknown_name_lists_builtins() -> None:
    with pytest.raises(ValueError) as info:
        load_text("no-such-corpus-or-file")
    msg = str(info.value)
    assert "no-such-corpus-or-file" in msg
    for name in BUILTIN_NAMES:
        assert name in msg


def test_load_text_undecodable_file(tmp_path: Path) -> None:
    p = tmp_path / "bin.dat"
    p.write_bytes(b"\xff\xfe\xfa" * 10)
    with pytest.raises(ValueError, match="UTF-8"):
        load_text(str(p))


def test_wikitext_unavailable_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ValueError, match=r"not available offline.*wiki\.test\.raw"):
        load_text("wikitext")


def test_wikitext_from_local_datasets_cache_joined_gptq_style(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``datasets`` present the test split is joined with blank lines, in offline mode."""
    import types

    seen: dict[str, object] = {}
    config = types.SimpleNamespace(HF_HUB_OFFLINE=False)

    def load_dataset(path: str, name: str, split: str) -> dict[str, list[str]]:
        seen.update(path=path, name=name, split=split, offline=config.HF_HUB_OFFLINE)
        return {"text": ["", " = Title = ", " body "]}

    fake = types.SimpleNamespace(load_dataset=load_dataset, config=config)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_text("wikitext") == "\n\n = Title = \n\n body "
    assert seen == {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test", "offline": True}
    assert config.HF_HUB_OFFLINE is False  # restored


def test_wikitext_not_in_cache_is_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    def load_dataset(*args: object, **kwargs: object) -> None:
        raise ConnectionError("offline and not cached")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ValueError, match="not available offline"):
        load_text("wikitext")


# ------------------------------------------------------------------------------- calibration_windows

TEXT = load_text("calib")[:20_000]


def test_calibration_shapes_dtype_and_slices() -> None:
    tok = CharTokenizer()
    ids = tokenize_text(tok, TEXT)
    w = calibration_windows(tok, TEXT, nsamples=8, seqlen=64, seed=0)
    assert w.shape == (8, 64) and w.dtype == torch.int64
    for row in w:
        start = _is_contiguous_slice(row, ids)
        assert 0 <= start <= ids.numel() - 64 - 1


def test_calibration_deterministic_per_seed() -> None:
    tok = CharTokenizer()
    torch.manual_seed(123)
    a = calibration_windows(tok, TEXT, 16, 32, seed=7)
    torch.manual_seed(456)  # global RNG state must not matter
    b = calibration_windows(tok, TEXT, 16, 32, seed=7)
    c = calibration_windows(tok, TEXT, 16, 32, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_with_real_hf_tokenizer() -> None:
    tok = _word_level_tokenizer(TEXT)
    ids = tok(TEXT, return_tensors="pt")["input_ids"][0]
    w = calibration_windows(tok, TEXT, nsamples=4, seqlen=50, seed=1)
    assert w.shape == (4, 50)
    for row in w:
        _is_contiguous_slice(row, ids)


def test_calibration_minimum_length_boundary() -> None:
    tok = CharTokenizer()
    # exactly seqlen + 1 tokens: the only legal start is 0
    w = calibration_windows(tok, "abcdef", nsamples=3, seqlen=5)
    assert torch.equal(w, torch.tensor([[ord(c) for c in "abcde"]] * 3))
    with pytest.raises(ValueError, match=r"5 tokens.*seqlen \+ 1 = 6"):
        calibration_windows(tok, "abcde", nsamples=1, seqlen=5)


@pytest.mark.parametrize(("nsamples", "seqlen"), [(0, 8), (4, 0), (-1, 8), (4, -3)])
def test_calibration_rejects_non_positive(nsamples: int, seqlen: int) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        calibration_windows(CharTokenizer(), TEXT, nsamples, seqlen)


# -------------------------------------------------------------------------------- evaluation_windows


def test_evaluation_windows_non_overlapping_tail_dropped() -> None:
    tok = CharTokenizer()
    text = TEXT[:1000]
    ids = tokenize_text(tok, text)
    w = evaluation_windows(tok, text, seqlen=64)
    assert w.shape == (1000 // 64, 64) and w.dtype == torch.int64
    assert torch.equal(w.reshape(-1), ids[: (1000 // 64) * 64])


def test_evaluation_windows_cap() -> None:
    tok = CharTokenizer()
    full = evaluation_windows(tok, TEXT, seqlen=100)
    capped = evaluation_windows(tok, TEXT, seqlen=100, max_windows=3)
    assert capped.shape == (3, 100)
    assert torch.equal(capped, full[:3])
    assert evaluation_windows(tok, "x" * 250, seqlen=100, max_windows=10).shape == (2, 100)


def test_evaluation_windows_errors() -> None:
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_windows(tok, "short", seqlen=64)
    with pytest.raises(ValueError, match="seqlen"):
        evaluation_windows(tok, TEXT, seqlen=0)
    with pytest.raises(ValueError, match="max_windows"):
        evaluation_windows(tok, TEXT, seqlen=8, max_windows=0)


def test_code_text_is_python_source_of_the_listed_modules() -> None:
    from quantizer.data import CODE_MODULES

    code = load_text("code")
    assert len(code) > 300_000
    assert "class ArgumentParser" in code and "def dedent" in code  # argparse, textwrap
    assert code == load_text("code")  # deterministic
    assert len(CODE_MODULES) == 6
