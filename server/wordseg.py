"""Dictionary word segmentation of glued letter runs ("ofthe" -> "of the"), with no language model.

Why: rapidocr's recogniser drops spaces between English words on printed pages ("Fewwomencouldthink").
Scoring alternatives with the LM cost one forward pass per line (tens of seconds on a page with a
larger model) and its split proposals (fewest tokenizer words) cut real words apart ("buil don").
Here a unigram prior decides instead: the most probable split under word frequencies from the
`wordsegment` wheel (Google Web Trillion Word counts, plus a Scrabble word list, both shipped inside
the wheel, so nothing downloads at run time). The rules that keep it from doing harm:

* a run that is a dictionary word is never split ("atone", "together");
* every piece of a split must be a dictionary word or a listed web word of four or more letters
  (names: "Walter"); short web junk such as "cov" or "nch" never becomes a piece, and rare junk
  such as "buil" loses to the frequent reading ("build on");
* a split is kept only when it is more probable than the run left whole (an unknown run costs a
  per-letter price, so a long glued run splits and a short unknown name stays as it is);
* it only ever inserts spaces: the output has exactly the input's characters, in order.
"""

from __future__ import annotations

import importlib.resources
import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise

MAX_WORD = 24  # longest piece considered ("internationalization" is 20)
MAX_RUN = 120  # longer runs are left alone: the DP is O(n * MAX_WORD)
ROMAN = frozenset({"ii", "iii", "iv", "vi", "vii", "viii", "ix", "xi", "xii", "xiii", "xiv", "xv", "xvi"})
CONTRACTIONS = frozenset({"s", "t", "d", "m", "ll", "re", "ve"})
_RUN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")  # a letter run, apostrophes inside it kept ("Elliot'scharacter")


@dataclass(frozen=True)
class Lexicon:
    """Word costs (negative natural-log unigram probability), the dictionary, and the pieces a split may use."""

    cost: Mapping[str, float]
    dictionary: frozenset[str]
    pieces: frozenset[str]
    unknown_cost: float  # the cost of the rarest listed word: an unknown run starts here
    per_letter: float = 1.6  # ... and pays this per letter (glued text averages ~2 nats a letter)

    @classmethod
    def from_counts(cls, counts: Iterable[tuple[str, int]], dictionary: Iterable[str]) -> Lexicon:
        """A lexicon from (word, count) pairs and a list of dictionary words.

        Pieces: dictionary words, listed words of four or more letters (names: "Walter", "Dugdale"; their
        cost keeps rare junk such as "buil" from winning) and Roman numerals ("Charles II")."""
        pairs = [(w.lower(), c) for w, c in counts if w.isalpha() and w.isascii() and c > 0]
        total = float(sum(c for _, c in pairs)) or 1.0
        cost = {w: math.log(total / c) for w, c in pairs}
        floor = math.log(total / min((c for _, c in pairs), default=1))
        words = frozenset(w.lower() for w in dictionary) | {"a", "i"}
        pieces = {w for w in cost if len(w) >= 4} | {w for w in words if len(w) > 1} | ROMAN | {"a", "i"}
        return cls(cost, words, frozenset(pieces), floor)

    def word_cost(self, word: str) -> float:
        """Cost of `word` (lower case) as one word: its listed cost, or the unknown-word cost by length."""
        known = self.cost.get(word)
        if known is not None:
            return known
        return self.unknown_cost + self.per_letter * len(word)


_LOCK = threading.Lock()
_DEFAULT: Lexicon | None = None


def default_lexicon() -> Lexicon:
    """The lexicon built from the `wordsegment` wheel's data, loaded once (~1 s, ~40 MB) and shared."""
    global _DEFAULT
    with _LOCK:
        if _DEFAULT is None:
            data = importlib.resources.files("wordsegment")
            with (data / "unigrams.txt").open(encoding="utf-8") as f:
                counts = [(w, int(c)) for w, c in (line.split("\t") for line in f if "\t" in line)]
            dictionary = (data / "words.txt").read_text(encoding="utf-8").split()
            _DEFAULT = Lexicon.from_counts(counts, dictionary)
        return _DEFAULT


def _piece_cost(piece: str, lex: Lexicon, after_apostrophe: bool) -> float | None:
    """Cost of one piece of a split, or None when it may not be a piece."""
    if "'" in piece:  # "elliot's", "don't": the head must be a word, the tail a contraction
        head, _, tail = piece.partition("'")
        if tail not in CONTRACTIONS or "'" in tail:
            return None
        if tail == "t" and head.endswith("n") and head not in lex.pieces:
            head = head[:-1]  # "wouldn't": "would" + n't
        head_cost = _piece_cost(head, lex, after_apostrophe)
        return None if head_cost is None else head_cost + 1.0
    if after_apostrophe and piece in CONTRACTIONS:
        return 1.0  # "'s" glued to the next word: "Elliot'scharacter" -> "Elliot's character"
    return lex.word_cost(piece) if piece in lex.pieces else None


def _best_split(low: str, lex: Lexicon) -> tuple[float, list[int]] | None:
    """The cheapest cover of `low` by allowed pieces: (cost, cut positions), or None when there is none."""
    n = len(low)
    best: list[tuple[float, int] | None] = [None] * (n + 1)
    best[0] = (0.0, 0)
    for end in range(1, n + 1):
        for start in range(max(0, end - MAX_WORD), end):
            prev = best[start]
            if prev is None or low[start] == "'" or low[end - 1] == "'":
                continue  # never cut next to an apostrophe
            after_apostrophe = start > 0 and low[start - 1] == "'"
            cost = _piece_cost(low[start:end], lex, after_apostrophe)
            if cost is not None and (best[end] is None or prev[0] + cost < best[end][0]):
                best[end] = (prev[0] + cost, start)
    if best[n] is None:
        return None
    cuts, end = [], n
    while end > 0:
        end = best[end][1]
        if end > 0:
            cuts.append(end)
    return best[n][0], sorted(cuts)


def _whole_cost(low: str, lex: Lexicon) -> float:
    """Cost of the run left as one word ("walter's" as "walter" plus a contraction)."""
    head, _, tail = low.partition("'")
    if not tail:
        return lex.word_cost(low)
    if tail in CONTRACTIONS:
        return lex.word_cost(head) + 1.0
    return lex.word_cost(low.replace("'", ""))


def is_word(run: str, lex: Lexicon) -> bool:
    """Whether `run` is a dictionary word (with or without a contraction: "walter's" counts via "walter")."""
    head, _, tail = run.lower().partition("'")
    return head in lex.dictionary and (not tail or tail in CONTRACTIONS)


def segment_run(run: str, lex: Lexicon) -> str:
    """`run` with spaces inserted where it is more probably several words; otherwise `run` unchanged."""
    low = run.lower()
    letters = len(low) - low.count("'")
    if letters < 3 or len(run) > MAX_RUN or is_word(run, lex):
        return run
    found = _best_split(low, lex)
    if found is None or not found[1] or found[0] >= _whole_cost(low, lex):
        return run
    bounds = [0, *found[1], len(run)]
    return " ".join(run[a:b] for a, b in pairwise(bounds))


def segment_text(text: str, lex: Lexicon | None = None) -> str:
    """Every letter run in `text` segmented; everything else (digits, punctuation, spaces) untouched."""
    lex = lex or default_lexicon()
    return _RUN.sub(lambda m: segment_run(m.group(0), lex), text)
