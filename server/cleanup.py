"""Clean-up of OCR lines that can only insert spaces: the language model picks, it never writes.

rapidocr's recogniser (trained on Chinese + English) often drops spaces between English words
("histogram ofgreyvalues:", "background.These"). For a blind user that reads as gibberish. Here each
line gets at most one alternative reading built from the OCR's own characters with spaces inserted
(after sentence punctuation glued to a word, and inside long runs that split into vocabulary words);
the language model scores both readings and the likelier one is kept. Because candidates differ
from the OCR output only in whitespace, no word can be invented (`tests/server` checks that).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_GLUED_PUNCT = re.compile(r"(?<=[a-z]{2}[.,;:!?])(?=[A-Za-z]{2})")
_ALPHA_RUN = re.compile(r"[A-Za-z]{6,}")
MAX_RUN = 40


def vocabulary_from_tokenizer(tokenizer) -> frozenset[str]:
    """Whole lower-case words the tokenizer has as word-initial tokens ("Ġword" / "▁word")."""
    words = set()
    for tok in tokenizer.get_vocab():
        if tok[:1] in ("Ġ", "▁"):
            w = tok[1:]
            if len(w) >= 2 and w.isascii() and w.isalpha():
                words.add(w.lower())
    words.update({"a", "i"})
    return frozenset(words)


def _split_run(run: str, vocab: frozenset[str]) -> str | None:
    """Fewest-words split of a letter run into vocabulary words, or None when there is none (or none needed)."""
    low = run.lower()
    if low in vocab or len(run) > MAX_RUN:
        return None
    n = len(low)
    best: list[tuple[float, int] | None] = [None] * (n + 1)
    best[0] = (0.0, 0)
    for end in range(1, n + 1):
        for start in range(max(0, end - 20), end):
            if best[start] is None:
                continue
            piece = low[start:end]
            if piece not in vocab:
                continue
            cost = best[start][0] + 1.0 + (0.6 if len(piece) <= 2 else 0.0)
            if best[end] is None or cost < best[end][0]:
                best[end] = (cost, start)
    if best[n] is None:
        return None
    cuts, end = [], n
    while end > 0:
        start = best[end][1]
        cuts.append(start)
        end = start
    pieces, prev = [], 0
    for c in [*sorted(cuts)[1:], n]:
        pieces.append(run[prev:c])
        prev = c
    return " ".join(pieces) if len(pieces) > 1 else None


def repair_candidate(line: str, vocab: frozenset[str]) -> str | None:
    """One alternative reading of `line` with spaces inserted, or None if there is nothing to try."""
    fixed = _GLUED_PUNCT.sub(" ", line)
    fixed = _ALPHA_RUN.sub(lambda m: _split_run(m.group(0), vocab) or m.group(0), fixed)
    return fixed if fixed != line else None


def same_characters(a: str, b: str) -> bool:
    """True when two readings differ only in whitespace (the clean-up's invariant)."""
    return "".join(a.split()) == "".join(b.split())


def choose(lines: Iterable[str], candidates: list[str | None], scores: dict[str, float]) -> list[str]:
    """Per line, the candidate with the higher LM log-likelihood (the original on ties or when unscored)."""
    out = []
    for line, cand in zip(lines, candidates, strict=True):
        if cand is not None and scores.get(cand, float("-inf")) > scores.get(line, float("-inf")):
            assert same_characters(line, cand)
            out.append(cand)
        else:
            out.append(line)
    return out
