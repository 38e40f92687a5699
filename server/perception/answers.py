"""Direct answers to the questions the measured facts answer by themselves.

Why: "is there a cat?", "what colour is it?", "read the barcode" have exact answers in the `Scene`;
routing them through a small language model only adds a chance to get them wrong, and latency.
Every other question returns None and goes to the model with the facts block. An object is affirmed
only when the detector found it; "no" is said only for things the detector knows (COCO classes),
since for anything else its silence proves nothing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .detect import COCO_LABELS, spoken_name
from .wording import count_phrase, join_words, light_sentence, object_phrase, plural, summary, with_article

if TYPE_CHECKING:
    from .scene import Scene

SYNONYMS = {
    "people": "person", "man": "person", "men": "person", "woman": "person", "women": "person",
    "someone": "person", "somebody": "person", "anyone": "person", "anybody": "person", "child": "person",
    "children": "person", "kid": "person", "kids": "person", "human": "person", "phone": "cell phone",
    "mobile": "cell phone", "table": "dining table", "television": "tv", "sofa": "couch", "mug": "cup",
    "plant": "potted plant", "bike": "bicycle", "motorbike": "motorcycle", "doughnut": "donut",
    "ball": "sports ball", "fridge": "refrigerator", "puppy": "dog", "kitten": "cat", "glass": "wine glass",
    "mice": "mouse", "knives": "knife", "laptops": "laptop",
}  # fmt: skip
_KNOWN = {label for label in COCO_LABELS if label and label != "background"}
_DESCRIBE = re.compile(
    r"\b(in front of me|what do you see|what can you see|what('s| is) (this|that|here|there|around)|describe|"
    r"what am i (looking at|holding)|where am i)\b"
)
_CODE = re.compile(r"\b(qr|bar ?codes?|scan)\b")
_LIGHT = re.compile(r"\b(dark|bright|light on|lights on|lights? off|how light|is it light)\b")
_COLOUR = re.compile(r"\bcolou?rs?\b")
_HOW_MANY = re.compile(r"\bhow many ([a-z ]+?)(?: are| is| do| can|$)")
_PRESENCE = re.compile(r"\b(?:is there|are there|do you see|can you see|any|see a|see an|is it a|is this a)\b")
_FILLER_END = re.compile(
    r"(\s+(here|there|nearby|anywhere|at all|around( me)?|in front of me|in (the|this) (photo|picture|image|room)))+$"
)
_FACING = re.compile(r"\b(facing|looking at) (me|the camera)\b")


def coco_label(phrase: str) -> str | None:
    """The COCO class a word or phrase names ('people' -> 'person', 'cups' -> 'cup'), else None."""
    words = phrase.strip().split()
    for n in (2, 1):
        for i in range(len(words) - n + 1):
            term = " ".join(words[i : i + n])
            for form in (term, term[:-1] if term.endswith("s") else term, term[:-2] if term.endswith("es") else term):
                form = SYNONYMS.get(form, form)
                if form in _KNOWN:
                    return form
                if any(spoken_name(k) == form for k in _KNOWN):
                    return next(k for k in _KNOWN if spoken_name(k) == form)
    return None


def answer_from_facts(question: str, scene: Scene) -> str | None:
    """An answer built only from ``scene``'s facts, or None when the facts do not answer ``question``."""
    q = " ".join(re.sub(r"[^a-z0-9' ]+", " ", question.lower()).split())
    if not q:
        return None
    if _CODE.search(q):
        return _codes(scene)
    if _COLOUR.search(q):
        return _colour(q, scene)
    if (m := _HOW_MANY.search(q)) and (label := coco_label(m.group(1))):
        return _how_many(label, scene)
    if _FACING.search(q):
        return _facing(scene)
    if _PRESENCE.search(q) and (label := coco_label(q)):
        return _presence(q, label, scene)
    if _LIGHT.search(q) and scene.light is not None:
        return _light(q, scene)
    if _DESCRIBE.search(q):
        return summary(scene)
    return None


def _detected(label: str, scene: Scene) -> list:
    name = spoken_name(label)
    return [o for o in scene.objects if o.label == name]


def _codes(scene: Scene) -> str | None:
    if "codes" in scene.errors or "codes" not in scene.timings_ms:
        return None
    if not scene.codes:
        return "I can't find a QR code or barcode in this photo. Try holding the code closer and steadier."
    parts = [f'the QR code reads "{c.text}"' if c.kind == "QR code" else f"the {c.kind} number is {c.text}"
             for c in scene.codes]  # fmt: skip
    text = join_words(parts)
    return text[0].upper() + text[1:] + "."


def _colour(q: str, scene: Scene) -> str | None:
    label = coco_label(q)
    if label:
        found = [o for o in _detected(label, scene) if o.colour]
        if found:
            # A box holds background too: say where the colour was measured, not that the object is it.
            return f"Where the {spoken_name(label)} is, the photo is mostly {found[0].colour}."
        if not _detected(label, scene):
            return None  # the model may still know; the facts cannot say
    if not scene.colours:
        return None
    centre = scene.centre_colours or scene.colours
    text = f"The centre of the photo is mostly {join_words([c.name for c in centre[:2]])}"
    if [c.name for c in centre[:2]] != [c.name for c in scene.colours[:2]]:
        text += f"; the whole photo is mostly {join_words([c.name for c in scene.colours[:2]])}"
    return text + "."


def _how_many(label: str, scene: Scene) -> str | None:
    if "detect" not in scene.timings_ms or "detect" in scene.errors:
        return None
    count = len(_detected(label, scene))
    noun = spoken_name(label)
    if count == 0:
        return f"I don't see any {plural(noun)}."
    return f"I see {'one ' + noun if count == 1 else count_phrase(count, noun)}."


def _presence(q: str, label: str, scene: Scene) -> str | None:
    if "detect" not in scene.timings_ms or "detect" in scene.errors:
        return None
    found = _detected(label, scene)
    noun = spoken_name(label)
    if found:
        return f"Yes, I see {object_phrase(scene, noun, found)}."
    # "No" only when the class is what was asked about ("is there a cat here?"), not a word inside a
    # longer description ("a giraffe-shaped lamp"), whose answer the detector does not know.
    tail = " ".join(_FILLER_END.sub("", q).split()[-2:])
    if coco_label(tail.split()[-1] if tail else "") != label and coco_label(tail) != label:
        return None
    return f"I don't see {with_article(noun)}."


def _facing(scene: Scene) -> str | None:
    if not scene.people:
        return "I don't see anyone." if "detect" in scene.timings_ms and "detect" not in scene.errors else None
    facing = scene.people[0].facing
    if facing == "towards the camera":
        return "Yes, the person in front of you is facing you."
    if facing == "away from the camera":
        return "The person in front of you seems to be facing away."
    return "I see a person, but I can't tell which way they are facing."


def _light(q: str, scene: Scene) -> str:
    """'Is it dark?' gets a yes or no first, then the measured light."""
    assert scene.light is not None
    level = scene.light.level
    prefix = ""
    if re.search(r"\bis it (dark|too dark)\b", q):
        prefix = "Yes. " if level == "dark" else "No. "
    elif re.search(r"\bis it (bright|light)\b|\blights? on\b", q):
        prefix = {"bright": "Yes. ", "dark": "No. "}.get(level, "")
    return prefix + light_sentence(scene)
