"""Honesty for models that cannot see: answers grounded in what the server really read or measured.

A text-only 135M model asked about a photo invents freely; these rules keep only the sentences
whose names and numbers occur in the OCR text or the question, answer "what does it say?" with
the OCR text verbatim, and say plainly what is missing instead of letting the model guess.
"""

from __future__ import annotations

import re

_READ_INTENT = re.compile(r"\b(read|reads|say|says|said|written|text|sign|label|letter|screen|words?)\b", re.I)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|\d[\d.,:/-]*")
_COMMON_WORDS = (
    "the a an and or but if then this that these those there here it its is are was were be been being has have had "
    "do does did not no yes can cannot could would should will may might photo picture image camera text read says "
    "written sign label page shows show contains contain appears seems looks like about what which who where when "
    "how you your i my me we our they them their he she his her some any all more most very also only just than "
    "because so such into onto from with without for of on in at by to up down out over under again see seen "
    "sure unsure clear dark blurry bright light word words letter letters line lines paper document screen"
)
_COMMON = frozenset(_COMMON_WORDS.split())


def is_read_request(question: str) -> bool:
    """'What does this say?', 'Read the label': answered with the OCR text itself, verbatim."""
    return bool(_READ_INTENT.search(question))


def read_answer(text: str) -> str:
    flat = " ".join(ln.strip() for ln in text.splitlines() if ln.strip())
    return "It says: " + (flat if flat[-1:] in ".!?" else flat + ".")


def grounded(sentence: str, context: str, question: str) -> bool:
    """A model sentence is kept when its content words (names, numbers, long words) occur in what the
    server really knows (OCR text and question); a text-only 135M model otherwise invents freely."""
    known = {w.lower() for w in _WORD.findall(context + " " + question)}
    words = [w for w in _WORD.findall(sentence) if w.lower() not in _COMMON]
    content = [w for w in words if w[0].isdigit() or len(w) >= 5 or (w[0].isupper() and w is not words[0])]
    if not content:
        return True
    unknown = [w for w in content if w.lower() not in known and w.lower().rstrip("s") not in known]
    return len(unknown) <= max(0, len(content) // 4)


class GroundedSentences:
    """Streams sentences of a model answer, dropping ungrounded ones (only for models that cannot see)."""

    def __init__(self, context: str, question: str, enabled: bool) -> None:
        from .speech import SentenceSplitter

        self.splitter = SentenceSplitter()
        self.context, self.question, self.enabled = context, question, enabled
        self.kept: list[str] = []
        self.dropped = 0

    def _filter(self, sentences: list[str]) -> list[str]:
        out = []
        for s in sentences:
            if not self.enabled or grounded(s, self.context, self.question):
                out.append(s)
            else:
                self.dropped += 1
        self.kept.extend(out)
        return out

    def feed(self, delta: str) -> list[str]:
        return self._filter(self.splitter.feed(delta))

    def flush(self) -> list[str]:
        return self._filter(self.splitter.flush())

    def fallback(self) -> str | None:
        """What to say when every sentence was dropped: the plain facts instead of nothing."""
        if self.kept:
            return None
        if self.context.strip():
            return "I can't answer that from the text in the photo. " + read_answer(self.context)
        return "I can't answer that from this photo."


def filter_answer(text: str, context: str, question: str, enabled: bool) -> str:
    g = GroundedSentences(context, question, enabled)
    g.feed(text)
    g.flush()
    return " ".join(g.kept) or g.fallback() or ""
