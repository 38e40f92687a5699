"""Turning a `Scene` into words: a facts block for a language model and a spoken summary.

Why two forms: a language model needs every fact with its number (score, share, clock hour) to
reason and to hedge; a person listening through a screen reader needs one short paragraph, most
useful fact first (what is there and where), no numbers. Both are built only from measured facts:
an object is named only when the detector found it; classifier labels are said as "it looks like".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .facts import Colour, DetectedObject

if TYPE_CHECKING:
    from .scene import Scene

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
IRREGULAR_PLURALS = {"person": "people", "knife": "knives", "mouse": "mice", "sheep": "sheep", "skis": "skis"}
NOTHING_SEEN = "I can't make out any objects with confidence."


def with_article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def plural(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    head, _, last = noun.rpartition(" ")
    last = IRREGULAR_PLURALS.get(last) or (last + "es" if last.endswith(("s", "sh", "ch", "x")) else last + "s")
    return f"{head} {last}" if head else last


def count_phrase(count: int, noun: str) -> str:
    """'a cup', 'two cups', '12 cups'."""
    if count == 1:
        return with_article(noun)
    return f"{NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else count} {plural(noun)}"


def join_words(parts: list[str], conj: str = "and") -> str:
    if len(parts) <= 2:
        return f" {conj} ".join(parts)
    return ", ".join(parts[:-1]) + f", {conj} " + parts[-1]


def _grouped(objects: list[DetectedObject]) -> dict[str, list[DetectedObject]]:
    groups: dict[str, list[DetectedObject]] = {}
    for obj in objects:  # strongest first, so each group's first object is its most certain one
        groups.setdefault(obj.label, []).append(obj)
    return groups


def _facing_note(scene: Scene, obj: DetectedObject) -> str:
    for person in scene.people:
        if person.box == obj.box and person.facing != "unknown":
            return f", facing {'you' if person.facing == 'towards the camera' else 'away'}"
    return ""


def _colour_words(colours: list[Colour], limit: int = 2) -> str:
    return join_words([c.name for c in colours[:limit]])


def object_phrase(scene: Scene, label: str, group: list[DetectedObject]) -> str:
    """'a cat, close, straight ahead' or 'two cups, the nearest close on the left'."""
    if len(group) == 1:
        obj = group[0]
        return f"{with_article(label)}, {obj.nearness}, {obj.direction}{_facing_note(scene, obj)}"
    rank = {"close": 0, "near": 1, "far": 2}
    nearest = min(group, key=lambda o: rank[o.nearness])
    return f"{count_phrase(len(group), label)}, the nearest {nearest.nearness} {nearest.direction}"


def summary(scene: Scene) -> str:
    """One spoken paragraph; says plainly when nothing was detected with confidence."""
    sentences: list[str] = []
    groups = _grouped(scene.objects)
    if groups:
        phrases = [object_phrase(scene, lab, grp) for lab, grp in groups.items()]
        sentences.append(f"I see {phrases[0]}.")
        if len(phrases) > 1:  # the phrases hold commas already: one per clause, never one long list
            rest = [*phrases[1:-1], ("and " if len(phrases) > 2 else "") + phrases[-1]]
            sentences.append("Also " + "; ".join(rest) + ".")
    elif scene.blank:
        sentences.append("I can't make out anything in this photo; it looks blank or too small.")
    else:
        sentences.append(NOTHING_SEEN)
    if scene.labels:
        guesses = [with_article(label.name) for label in scene.labels[:2]]
        sentences.append(f"It looks like {join_words(guesses, 'or')}.")
    if scene.codes:
        sentences.extend(code_sentence(code.kind, code.text) for code in scene.codes)
    if scene.colours:
        sentences.append(f"Mostly {_colour_words(scene.colours)}.")
        if scene.centre_colours and scene.centre_colours[0].name != scene.colours[0].name:
            sentences.append(f"In the centre, {_colour_words(scene.centre_colours, 1)}.")
    if scene.light is not None:
        sentences.append(light_sentence(scene))
    return " ".join(sentences)


def code_sentence(kind: str, text: str) -> str:
    if kind == "QR code":
        return f"There is a QR code that reads: {text}."
    return f"There is {with_article(kind)} with the number {text}."


def light_sentence(scene: Scene) -> str:
    light = scene.light
    assert light is not None
    if light.level == "dark":
        return "It is dark; the photo may be too dark to see much."
    where = f", brightest at the {light.brightest}" if light.brightest else ", evenly lit"
    return f"The light is {light.level}{where}."


def facts_block(scene: Scene) -> str:
    """Labelled lines of every fact, with numbers, for a language model; 'none detected' when empty."""
    objects = "; ".join(
        f"{with_article(o.label)} at {o.clock}, {o.nearness}"
        + (f", {o.colour}" if o.colour else "")
        + f" ({o.score:.2f})"
        for o in scene.objects
    )
    lines = [f"Objects: {objects or 'none detected with confidence'}"]
    if scene.people:
        facing = [p.facing for p in scene.people[:1] if p.facing != "unknown"]
        lines.append(f"People: {len(scene.people)}" + (f" (the largest is facing {facing[0]})" if facing else ""))
    looks = ", ".join(f"{label.name} ({label.score:.2f})" for label in scene.labels)
    lines.append(f"Looks like (whole-photo guess): {looks or 'no confident guess'}")
    if scene.colours:
        whole = ", ".join(f"{c.name} {c.share:.0%}" for c in scene.colours)
        centre = ", ".join(f"{c.name} {c.share:.0%}" for c in scene.centre_colours)
        lines.append(f"Colours: {whole}" + (f"; centre: {centre}" if centre else ""))
    if scene.light is not None:
        where = f", brightest at the {scene.light.brightest}" if scene.light.brightest else ", evenly lit"
        lines.append(f"Light: {scene.light.level} (mean {scene.light.mean:.0f}/255){where}")
    codes = "; ".join(f'{c.kind} "{c.text}"' for c in scene.codes)
    lines.append(f"Codes: {codes or 'none found'}")
    if scene.blank:
        lines.append("Note: the photo is blank or too small; the object detector and classifier were not run")
    if scene.errors:
        lines.append("Unavailable: " + ", ".join(sorted(scene.errors)))
    return "\n".join(lines)
