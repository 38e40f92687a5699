"""Summary, facts block and direct answers from hand-made scenes (no models)."""

from __future__ import annotations

from server.perception import Scene, answer_from_facts
from server.perception.facts import Code, Colour, DetectedObject, Label, Light, Person

TIMINGS = {"detect": 1.0, "classify": 1.0, "colour": 1.0, "light": 1.0, "codes": 1.0}


def obj(label: str, score: float = 0.9, box=(0.4, 0.3, 0.6, 0.9), clock="12 o'clock", direction="straight ahead",
        nearness="near", colour=None) -> DetectedObject:  # fmt: skip
    return DetectedObject(label=label, score=score, box=box, clock=clock, direction=direction, nearness=nearness,
                          colour=colour)  # fmt: skip


def scene(**kw) -> Scene:
    base = dict(width=640, height=480, light=Light(level="bright", mean=160.0, brightest="top left"),
                colours=[Colour(name="grey", share=0.5), Colour(name="brown", share=0.3)],
                centre_colours=[Colour(name="grey", share=0.6)], timings_ms=TIMINGS)  # fmt: skip
    return Scene(**(base | kw))


def test_summary_of_a_cat() -> None:
    s = scene(objects=[obj("cat", nearness="close")], labels=[Label(name="tabby cat", score=0.8)])
    assert s.summary() == (
        "I see a cat, close, straight ahead. It looks like a tabby cat. Mostly grey and brown. "
        "The light is bright, brightest at the top left."
    )


def test_summary_groups_counts_and_says_codes() -> None:
    s = scene(
        objects=[obj("cup", direction="on the left", nearness="close"), obj("cup", nearness="far"), obj("chair")],
        codes=[Code(kind="QR code", text="menu"), Code(kind="EAN-13 barcode", text="4006381333931")],
    )
    text = s.summary()
    assert text.startswith("I see two cups, the nearest close on the left. Also a chair, near, straight ahead.")
    assert "There is a QR code that reads: menu." in text and "an EAN-13 barcode with the number 4006381333931" in text


def test_nothing_detected_is_said_plainly_and_nothing_is_named() -> None:
    s = scene()
    assert s.summary().startswith("I can't make out any objects with confidence.")
    assert answer_from_facts("is there a cat?", s) == "I don't see a cat."
    assert answer_from_facts("is there a giraffe-shaped lamp?", s) is None  # a lamp, not a giraffe
    assert answer_from_facts("Are there any dogs around here?", s) == "I don't see a dog."
    assert answer_from_facts("is there a unicorn?", s) is None  # not a class the detector knows: no "no"
    dark = scene(light=Light(level="dark", mean=12.0), blank=True, colours=[], centre_colours=[])
    assert dark.summary() == (
        "I can't make out anything in this photo; it looks blank or too small. "
        "It is dark; the photo may be too dark to see much."
    )


def test_facts_block() -> None:
    s = scene(objects=[obj("cat", score=0.93, nearness="close", colour="grey")],
              labels=[Label(name="tabby cat", score=0.61)], codes=[Code(kind="QR code", text="hi")])  # fmt: skip
    block = s.facts_block()
    assert "Objects: a cat at 12 o'clock, close, grey (0.93)" in block
    assert "Looks like (whole-photo guess): tabby cat (0.61)" in block
    assert "Colours: grey 50%, brown 30%; centre: grey 60%" in block
    assert "Light: bright (mean 160/255), brightest at the top left" in block and 'Codes: QR code "hi"' in block


def test_direct_answers() -> None:
    person = obj("person", nearness="close")
    s = scene(objects=[person, obj("person", box=(0.0, 0.4, 0.1, 0.6), nearness="far"), obj("cup", colour="red")],
              people=[Person(box=person.box, score=0.9, clock="12 o'clock", nearness="close",
                             facing="towards the camera")],
              codes=[Code(kind="EAN-13 barcode", text="4006381333931")])  # fmt: skip
    assert answer_from_facts("How many people are there?", s) == "I see two people."
    assert answer_from_facts("is there anyone here?", s).startswith("Yes, I see two people")
    assert answer_from_facts("What colour is the mug?", s) == "Where the cup is, the photo is mostly red."
    assert answer_from_facts("what colour is this?", s) == (
        "The centre of the photo is mostly grey; the whole photo is mostly grey and brown."
    )
    assert answer_from_facts("Can you read the barcode?", s) == "The EAN-13 barcode number is 4006381333931."
    assert answer_from_facts("Is it dark in here?", s) == "No. The light is bright, brightest at the top left."
    assert answer_from_facts("is the person facing me", s) == "Yes, the person in front of you is facing you."
    assert answer_from_facts("what is in front of me?", s) == s.summary()
    assert answer_from_facts("what does the sign say?", s) is None
    assert answer_from_facts("", s) is None
    assert answer_from_facts("read the QR code", scene()).startswith("I can't find a QR code or barcode")


def test_failed_stages_do_not_answer() -> None:
    broken = scene(errors={"detect": "ModelFetchError: offline", "codes": "boom"})
    assert answer_from_facts("is there a cat?", broken) is None
    assert answer_from_facts("read the QR code", broken) is None
    assert "Unavailable: codes, detect" in broken.facts_block()
