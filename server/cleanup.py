"""Clean-up of OCR lines that can only insert spaces: dictionary segmentation, no language model.

rapidocr's recogniser (trained on Chinese + English) often drops spaces between English words
("histogram ofgreyvalues:", "background.These", "Fewwomencouldthink"). For a blind user that reads
as gibberish. Two repairs, both made of the OCR's own characters:

* a space after sentence punctuation glued between words ("family,in", "society.He"), but not inside
  abbreviations, decimals, code or addresses ("e.g.", "3.14", "np.zeros", "www.example.com");
* glued letter runs split into words by `wordseg` (word frequencies, no LM).

Because the output differs from the OCR output only in whitespace, no word can be invented
(`same_characters`, checked by the tests and asserted here). The LM used to choose between readings;
measured on rendered pages (benchmarks/reading.py) the dictionary is both more accurate and
thousands of times faster, so /v1/read and the describer behind /v1/vqa share this one path.
"""

from __future__ import annotations

import re

from .wordseg import Lexicon, default_lexicon, segment_text

# "family,in" / "II,with" / "society.He": a comma (etc.) between words; a full stop only before a capital.
_GLUED_PUNCT = re.compile(r"(?<=[A-Za-z]{2}[,;:!?])(?=[A-Za-z]{2})|(?<=[a-z]{2}\.)(?=[A-Z][a-z])")
_ADDRESS = re.compile(r"@|://|^www\.|\.(?:com|org|net|gov|edu|uk|de|io)\b", re.IGNORECASE)


def _split_punctuation(token: str) -> str:
    """A whitespace token with a space after glued sentence punctuation; addresses left alone."""
    return token if _ADDRESS.search(token) else _GLUED_PUNCT.sub(" ", token)


def clean_line(line: str, lex: Lexicon | None = None) -> str:
    """One OCR line with spaces inserted where words were glued together; never any other change."""
    lex = lex or default_lexicon()
    fixed = " ".join(_split_punctuation(tok) for tok in line.split(" "))
    fixed = segment_text(fixed, lex)
    assert same_characters(line, fixed), (line, fixed)
    return fixed


def clean_rows(rows: list[str], lex: Lexicon | None = None) -> list[str]:
    """Every row cleaned (see `clean_line`)."""
    lex = lex or default_lexicon()
    return [clean_line(r, lex) for r in rows]


def same_characters(a: str, b: str) -> bool:
    """True when two readings differ only in whitespace (the clean-up's invariant)."""
    return "".join(a.split()) == "".join(b.split())
