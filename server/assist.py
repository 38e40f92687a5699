"""The assistive logic shared by /v1/vqa, /v1/read and /v1/chat/completions, independent of HTTP.

Honesty rules, enforced in code rather than hoped for from a 135M-parameter model:
* quality problems (dark, blurry, no contrast) are measured and said first, before any model text;
* a model that cannot see, given a photo without readable text, is not asked at all: the answer says
  plainly that it cannot see the picture and found no text, instead of letting the model make one up.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from .engine import GenParams, GenResult
from .errors import ApiError
from .images import ImageLimits, decode_image
from .prompts import CANNOT_SEE, NO_TEXT, default_max_tokens, system_prompt
from .runtime import RequestCtx, Runtime
from .speech import Audio
from .vision import ImageContext


def limits(rt: Runtime) -> ImageLimits:
    s = rt.settings
    return ImageLimits(s.max_upload_bytes, s.max_pixels, tuple(f.upper() for f in s.image_formats))


async def load_image(rt: Runtime, data: bytes) -> Image.Image:
    """Decode off the event loop (a 12 MB JPEG takes a while), with all the upload limits."""
    return await asyncio.to_thread(decode_image, data, limits(rt))


def check_max_tokens(rt: Runtime, requested: int | None, length: str) -> int:
    limit = rt.settings.max_new_tokens
    if requested is not None and requested > limit:
        raise ApiError(422, "max_tokens_too_large", f"max_tokens={requested} is above this server's limit of {limit}.")
    return requested or min(default_max_tokens(length), limit)


def audio_json(audio: Audio) -> dict:
    return {
        "format": "wav",
        "sample_rate": audio.sample_rate,
        "duration_s": round(audio.duration_s, 3),
        "voice": audio.voice,
        "base64": base64.b64encode(audio.wav).decode("ascii"),
    }


@dataclass
class Plan:
    """What to do for a question about a photo: either a fixed answer, or a prompt for the model."""

    context: ImageContext
    preface: str  # measured warnings, said first
    fixed_answer: str | None
    messages: list[dict] | None
    params: GenParams | None


def plan_vqa(rt: Runtime, context: ImageContext, question: str, *, length: str, language: str, max_tokens: int) -> Plan:
    preface = " ".join(context.facts.sentences())
    if not context.can_see and not context.text:
        return Plan(context, preface, f"{CANNOT_SEE} {NO_TEXT}", None, None)
    if not context.can_see and is_read_request(question):
        return Plan(context, preface, read_answer(context.text), None, None)
    messages = [
        {"role": "system", "content": system_prompt(length, language)},
        {"role": "user", "content": context.message_content(f"{context.prompt_block()}\n\nQuestion: {question}")},
    ]
    return Plan(context, preface, None, messages, GenParams(max_new_tokens=max_tokens))


def join_answer(preface: str, body: str) -> str:
    return f"{preface} {body}".strip() if preface else body.strip()


async def generate(
    rt: Runtime, ctx: RequestCtx, messages: list[dict], params: GenParams, on_text: Callable[[str], None] | None = None
) -> GenResult:
    result = await rt.model_lane.run(
        rt.engine.generate, messages, params, ctx.cancel, ctx.deadline, on_text, cancel=ctx.cancel,
        timeout=ctx.remaining(),
    )  # fmt: skip
    record_generation(rt, result)
    return result


def record_generation(rt: Runtime, result: GenResult) -> None:
    rt.metrics.tokens.inc(result.completion_tokens)
    if result.completion_tokens:
        rt.metrics.tokens_per_second.set(result.tokens_per_s)
    if result.finish_reason == "cancelled":
        rt.metrics.cancelled.inc()


# --- honesty for text-only models ---------------------------------------------------------------------
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
