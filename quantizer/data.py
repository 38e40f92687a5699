"""Calibration and evaluation text, and the GPTQ-protocol token windows cut from it.

Why a built-in corpus: rpiq runs offline, and the standard GPTQ data sets (C4, WikiText-2, PTB)
are not obtainable without a dataset hub. The package therefore ships two public-domain novels by
Jane Austen (plain ASCII, from Debian's r-cran-janeaustenr / Project Gutenberg):

* ``"calib"``   -> *Persuasion* (``corpus/persuasion.txt``): calibration text;
* ``"heldout"`` -> *Northanger Abbey* (``corpus/northangerabbey.txt``): held-out evaluation text,
  a different book so that perplexity is never measured on the calibration data.

A second, different domain for held-apart evaluation: ``"code"`` is the Python source of a
fixed list of standard-library modules, read from the running interpreter (every machine that
runs rpiq has it; record the Python version with the numbers).

The WikiText-2 protocol is kept for users who have it: ``"wikitext"`` reads it from a *local*
``datasets`` cache, and any text file (e.g. ``wiki.test.raw``) can be passed by path.

The window functions follow the GPTQ reference code (Frantar et al., ``datautils.py`` /
``llama.py``): the whole text is tokenized once; calibration draws ``nsamples`` random windows of
``seqlen`` tokens; evaluation cuts the token stream into non-overlapping ``seqlen`` windows and
drops the tail.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch

BUILTIN_TEXTS: dict[str, str] = {
    "calib": "persuasion.txt",
    "heldout": "northangerabbey.txt",
}
"""Built-in names resolved from package data (``quantizer/corpus``)."""

WIKITEXT = "wikitext"
CODE = "code"
CODE_MODULES: tuple[str, ...] = ("argparse", "textwrap", "difflib", "configparser", "tarfile", "inspect")
"""Standard-library modules whose source makes up the ``"code"`` text (~0.5 MB of Python)."""
BUILTIN_NAMES: tuple[str, ...] = (*BUILTIN_TEXTS, CODE, WIKITEXT)


def load_text(source: str) -> str:
    """Return the text for ``source``: a built-in name or the path of a UTF-8 text file.

    Built-in names (``"calib"``, ``"heldout"``, ``"wikitext"``) take precedence over a file of the
    same name in the working directory; write ``./calib`` to mean such a file.

    Raises:
        ValueError: unknown name, missing/unreadable file, or WikiText not available offline.
    """
    if source in BUILTIN_TEXTS:
        return (resources.files("quantizer") / "corpus" / BUILTIN_TEXTS[source]).read_text(encoding="utf-8")
    if source == WIKITEXT:
        return _load_wikitext()
    if source == CODE:
        return _load_stdlib_code()
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(
            f"Text source {source!r} is neither a built-in name ({', '.join(BUILTIN_NAMES)}) nor an existing file."
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Cannot read text source {source!r} as UTF-8 text: {exc}") from exc


_WIKITEXT_UNAVAILABLE = (
    "WikiText-2 is not available offline (it needs the `datasets` package with "
    "wikitext/wikitext-2-raw-v1 already in its local cache). Pass the path of a text file instead, "
    "e.g. the wiki.test.raw file from wikitext-2-raw-v1, or use a built-in text ('calib', 'heldout')."
)


@contextlib.contextmanager
def _datasets_offline(datasets_module: Any) -> Iterator[None]:
    """Force ``datasets`` into offline mode for the duration, so that only its cache is used.

    The offline switches are read into ``datasets.config`` at import time; their names differ
    between versions, so every one that exists is patched and restored afterwards.
    """
    config = getattr(datasets_module, "config", None)
    saved: dict[str, Any] = {}
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if config is not None and hasattr(config, name):
            saved[name] = getattr(config, name)
            setattr(config, name, True)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def _load_stdlib_code() -> str:
    import importlib.util

    parts = []
    for name in CODE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"built-in text 'code' needs the standard-library module {name!r}, which is missing")
        parts.append(Path(spec.origin).read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def _load_wikitext() -> str:
    """WikiText-2 raw test split joined with blank lines, as in the GPTQ evaluation protocol."""
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(_WIKITEXT_UNAVAILABLE) from exc
    try:
        with _datasets_offline(datasets):
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(data["text"])
    except Exception as exc:  # any failure here means "not in the local cache"
        raise ValueError(f"{_WIKITEXT_UNAVAILABLE} ({type(exc).__name__}: {exc})") from exc


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` in one piece (as GPTQ does) and return the ids as a 1-D int64 tensor.

    ``tokenizer`` is any Hugging Face tokenizer, or a callable with the same
    ``tokenizer(text, return_tensors="pt")["input_ids"]`` contract.
    """
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"]
    ids = torch.as_tensor(ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"Expected one tokenized sequence, got a batch of {ids.shape[0]}")
        ids = ids[0]
    return ids.to(torch.int64)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def calibration_windows(
    tokenizer: Any,
    text: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
) -> torch.Tensor:
    """Draw ``nsamples`` random windows of ``seqlen`` tokens from ``text`` (GPTQ calibration).

    Start offsets are uniform over ``[0, n_tokens - seqlen - 1]`` (the reference code's
    ``random.randint(0, n - seqlen - 1)``), drawn from a :class:`torch.Generator` seeded with
    ``seed`` so that a run is reproducible regardless of global RNG state. Windows may overlap.

    Returns:
        int64 tensor ``[nsamples, seqlen]``.

    Raises:
        ValueError: ``nsamples``/``seqlen`` < 1, or the text has fewer than ``seqlen + 1`` tokens.
    """
    _check_positive("nsamples", nsamples)
    _check_positive("seqlen", seqlen)
    ids = tokenize_text(tokenizer, text)
    n = ids.numel()
    if n < seqlen + 1:
        raise ValueError(
            f"Calibration text has {n} tokens; need at least seqlen + 1 = {seqlen + 1}. "
            f"Use a longer text or a smaller seqlen."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=gen, dtype=torch.int64)
    index = starts[:, None] + torch.arange(seqlen, dtype=torch.int64)[None, :]
    return ids[index].contiguous()


def evaluation_windows(
    tokenizer: Any,
    text: str,
    seqlen: int,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Cut ``text`` into consecutive non-overlapping windows of ``seqlen`` tokens (GPTQ evaluation).

    The incomplete tail is dropped, as in the reference protocol, so every window is scored with the
    same context length. ``max_windows`` keeps only the first windows, for quick runs.

    Returns:
        int64 tensor ``[n_windows, seqlen]``.

    Raises:
        ValueError: ``seqlen``/``max_windows`` < 1, or the text is shorter than one window.
    """
    _check_positive("seqlen", seqlen)
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    ids = tokenize_text(tokenizer, text)
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"Evaluation text has {ids.numel()} tokens, fewer than one window of seqlen = {seqlen}.")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    return ids[: n_windows * seqlen].reshape(n_windows, seqlen).contiguous()
