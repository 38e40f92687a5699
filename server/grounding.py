"""Honesty for models that cannot see: answers grounded in what the server really read or measured.

A text-only 135M model asked about a photo invents freely; these rules keep only the sentences
whose words the server can vouch for, answer "what does it say?" with the OCR text verbatim, and say
plainly what is missing instead of letting the model guess. What the server knows is the OCR text,
the question and, with perception, the measured facts of the photo (`server.perception.Scene`).
A model sentence is dropped when:

* it names an object, colour, number or name that occurs in none of them; or it affirms an object
  the detector did not find, or denies one it found (the detector's word beats the model's);
* it answers a yes/no question about an object ("Is there a person?") against the facts, even with
  no content word at all ("Yes, there is.");
* it merely repeats the question (as a statement, "The oven is off.", or as a question) without
  anything the facts support: text in the photo is data, never a reason to affirm the question;
* too many of its other long words are unknown (a paraphrase may use a few).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from .perception.answers import coco_label
from .perception.colour import NAMED_COLOURS
from .perception.wording import NUMBER_WORDS

if TYPE_CHECKING:
    from .perception import Scene

_READ_INTENT = re.compile(r"\b(read|reads|say|says|said|written|text|sign|label|letter|screen|words?)\b", re.I)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|\d[\d.,:/-]*")
_COMMON_WORDS = (
    "the a an and or but if then this that these those there here it its is are was were be been being has have had "
    "do does did not no yes can cannot could would should will may might photo picture image camera text read says "
    "written sign label page shows show contains contain appears seems looks like about what which who where when "
    "how you your i my me we our they them their he she his her some any all more most very also only just than "
    "because so such into onto from with without for of on in at by to up down out over under again see seen "
    "sure unsure clear dark blurry bright light word words letter letters line lines paper document screen "
    "there's it's i'm can't don't doesn't isn't aren't yeah yep question answer well think"
)
_COMMON = frozenset(_COMMON_WORDS.split())
_COLOURS = frozenset(NAMED_COLOURS) | {
    "gold", "golden", "silver", "violet", "navy", "tan", "cyan", "magenta", "maroon", "turquoise", "cream", "ivory",
    "khaki", "olive", "teal", "lilac",
}  # fmt: skip
_NUMBERS = frozenset(NUMBER_WORDS[2:]) | {"eleven", "twelve", "twenty", "dozen", "hundred", "thousand"}
_STRICT_WORDS = _COLOURS | _NUMBERS
_NEGATION = re.compile(r"\b(no|not|none|nobody|nothing|never|cannot|without)\b|n't\b", re.I)
_YES = re.compile(r"^\W*(yes|yeah|yep|sure|correct|indeed)\b|\b(there is|there are|there's|i see|i can see)\b", re.I)
_NO = re.compile(r"^\W*(no|nope)\b", re.I)
_PRESENCE_QUESTION = re.compile(
    r"\b(is there|are there|do you see|can you see|do i have|any|see a|see an|is (it|this|that) an?)\b", re.I
)
_CLOCK = re.compile(r"\bo'?\s?clock\b", re.I)


def is_read_request(question: str) -> bool:
    """'What does this say?', 'Read the label': answered with the OCR text itself, verbatim."""
    return bool(_READ_INTENT.search(question))


def read_answer(text: str) -> str:
    flat = " ".join(ln.strip() for ln in text.splitlines() if ln.strip())
    return "It says: " + (flat if flat[-1:] in ".!?" else flat + ".")


@lru_cache(maxsize=8192)
def _label(word: str) -> str | None:
    """The COCO class a lower-case word names ('kittens' -> cat), else None; cached (called per word)."""
    return None if word in _COMMON else coco_label(word)


def _words(text: str) -> list[str]:
    return _WORD.findall(_CLOCK.sub(" oclock", text))


def _forms(word: str) -> tuple[str, ...]:
    w = word.lower()
    return (w, w.rstrip("s"), w[:-2] if w.endswith("es") else w)


@dataclass(frozen=True)
class Knowledge:
    """What the server can vouch for about one photo and one question."""

    known: frozenset[str]  # every word of the OCR text, the question and the facts
    known_labels: frozenset[str]  # the COCO classes those words name ('anyone' is known when 'person' is)
    ocr: frozenset[str]
    scene_words: frozenset[str]  # words of the measured facts only
    question: tuple[str, ...]
    detected: frozenset[str] | None  # COCO labels the detector found; None when it did not run
    guessed: frozenset[str]  # words of the classifier's whole-photo guesses ("it looks like")
    asked: str | None  # the COCO label a yes/no question asks about ("Is there a person?" -> person)

    def is_known(self, word: str) -> bool:
        return any(f in self.known for f in _forms(word)) or _label(word.lower()) in self.known_labels


def scene_text(scene: Scene | None) -> str:
    """Every word the facts say: the labelled block (labels, colours, codes, numbers) and the summary
    (counts in words, plurals, directions)."""
    return f"{scene.facts_block()}\n{scene.summary()}" if scene is not None else ""


def knowledge(context: str, question: str, scene: Scene | None = None) -> Knowledge:
    facts = scene_text(scene)
    lower = lambda text: frozenset(w.lower() for w in _words(text))  # noqa: E731
    detected = None
    if scene is not None and "detect" not in scene.errors and ("detect" in scene.timings_ms or scene.blank):
        detected = frozenset(label for o in scene.objects if (label := _label(o.label)))
    asked = coco_label(" ".join(_words(question)).lower()) if _PRESENCE_QUESTION.search(question) else None
    known = lower(f"{context} {question} {facts}")
    return Knowledge(
        known=known,
        known_labels=frozenset(label for w in known if (label := _label(w))),
        ocr=lower(context),
        scene_words=lower(facts),
        question=tuple(w.lower() for w in _words(question)),
        detected=detected,
        guessed=lower(" ".join(label.name for label in scene.labels)) if scene is not None else frozenset(),
        asked=asked,
    )


def _object_claims_hold(sentence: str, words: list[str], k: Knowledge) -> bool:
    """False when the sentence affirms an object the detector did not find, or denies one it found."""
    if k.detected is None:
        return True
    negated = bool(_NEGATION.search(sentence))
    quoting = bool(_READ_INTENT.search(sentence))  # "the sign says DOG": the word is read, not seen
    for w in words:
        lw = w.lower()
        if lw in _COMMON or lw in _COLOURS or lw in k.guessed or (quoting and lw in k.ocr):
            continue
        label = _label(lw)
        if label is None:
            continue
        if (label in k.detected) == negated:
            return False
    return True


def _yes_no_agrees(sentence: str, k: Knowledge) -> bool | None:
    """For "Is there a <thing>?": whether the sentence's yes or no agrees with the detector (None: no claim)."""
    if k.asked is None or k.detected is None:
        return None
    if _NO.search(sentence) or _NEGATION.search(sentence):
        says_yes = False
    elif _YES.search(sentence):
        says_yes = True
    else:
        return None
    return says_yes == (k.asked in k.detected)


def _repeats_question(sentence: str, words: list[str], k: Knowledge) -> bool:
    """The sentence adds nothing to the question that the measured facts support."""
    own = {w.lower() for w in words}
    if not own <= set(k.question) | _COMMON:
        return False
    if sentence.rstrip().endswith("?"):
        return True
    content = {w for w in own if w not in _COMMON}
    return not content or not all(any(f in k.scene_words for f in _forms(w)) for w in content)


def allowed(sentence: str, k: Knowledge) -> bool:
    words = _words(sentence)
    if not _object_claims_hold(sentence, words, k):
        return False
    agrees = _yes_no_agrees(sentence, k)
    if agrees is False:
        return False
    if agrees is None and _repeats_question(sentence, words, k):
        return False
    content = [w for w in words if w.lower() not in _COMMON]
    strict = [w for w in content if w[0].isdigit() or not _STRICT_WORDS.isdisjoint(_forms(w))
              or _label(w.lower()) is not None or (w[0].isupper() and w is not words[0])]  # fmt: skip
    if any(not k.is_known(w) for w in strict):
        return False
    loose = [w for w in content if len(w) >= 5 and w not in strict]
    unknown = [w for w in loose if not k.is_known(w)]
    return len(unknown) <= max(0, (len(strict) + len(loose)) // 4)


def grounded(sentence: str, context: str, question: str, scene: Scene | None = None) -> bool:
    """A model sentence is kept when everything it names is vouched for by what the server really knows
    (OCR text, question, measured facts); a text-only 135M model otherwise invents freely."""
    return allowed(sentence, knowledge(context, question, scene))


class GroundedSentences:
    """Streams sentences of a model answer, dropping ungrounded ones (only for models that cannot see)."""

    def __init__(self, context: str, question: str, enabled: bool, scene: Scene | None = None) -> None:
        from .speech import SentenceSplitter

        self.splitter = SentenceSplitter()
        self.context, self.question, self.enabled, self.scene = context, question, enabled, scene
        self.knowledge = knowledge(context, question, scene) if enabled else None
        self.kept: list[str] = []
        self.dropped = 0

    def _filter(self, sentences: list[str]) -> list[str]:
        out = []
        for s in sentences:
            if self.knowledge is None or allowed(s, self.knowledge):
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
        if self.scene is not None:
            return "I can't answer that from what I can make out. " + self.scene.summary()
        return "I can't answer that from this photo."


def filter_answer(text: str, context: str, question: str, enabled: bool, scene: Scene | None = None) -> str:
    g = GroundedSentences(context, question, enabled, scene)
    g.feed(text)
    g.flush()
    return " ".join(g.kept) or g.fallback() or ""
