"""The assistive logic shared by /v1/vqa, /v1/read and /v1/chat/completions, independent of HTTP:
the two planners (a photo question, an OpenAI conversation) and running a plan to an answer.

Honesty rules, enforced in code rather than hoped for from a 135M-parameter model:
* quality problems (dark, blurry, no contrast) are measured and said first, before any model text;
* a model that cannot see is not asked what the measured facts answer by themselves ("what is in
  front of me?", "is there a person?", "what colour is it?": `perception.answer_from_facts`), nor
  about a photo in which nothing was read or detected with confidence: the facts' own summary says so;
* otherwise it gets the facts and the OCR text as labelled data, and its answers keep only sentences
  grounded in them (`grounding.py`);
* a generation stopped by the request's deadline answers with the whole (grounded) sentences it made
  and says it stopped early (finish reason "deadline"); only a generation with nothing usable is a 504.

Everything a request asks for is checked before its photo is decoded (the routes, `chat_photos`), and
photos are decoded only once the image gate admits them (`with_photo`): a burst of uploads waits as
compressed bytes, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from models.inference import Generation, GenerationOptions, Message

from .errors import ApiError
from .grounding import GroundedSentences, filter_answer, is_read_request, read_answer
from .images import ImageLimits, decode_image
from .perception import Scene
from .prompts import CANNOT_SEE, NO_TEXT, default_max_tokens, system_prompt
from .runtime import RequestCtx, Runtime
from .schemas import ChatRequest, ImagePart, TextPart
from .speech import Audio
from .uploads import decode_base64_image
from .vision import ImageContext

REPETITION_PENALTY = 1.1  # small models loop without it
MAX_IMAGES = 4  # per chat request
GRACE_S = 2.0  # beyond its deadline, how long a generation may take to notice it (one token, on a slow board)
STOPPED_EARLY = "(stopped early: out of time)"
SENTENCE_ENDS = ".!?…"
T = TypeVar("T")


def limits(rt: Runtime) -> ImageLimits:
    s = rt.settings
    return ImageLimits(s.max_upload_bytes, s.max_pixels, tuple(f.upper() for f in s.image_formats), s.max_image_side)


async def load_image(rt: Runtime, data: bytes) -> Image.Image:
    """Decode off the event loop (a 12 MB JPEG takes a while), with all the upload limits."""
    return await asyncio.to_thread(decode_image, data, limits(rt))


async def with_photo(
    rt: Runtime, ctx: RequestCtx, data: bytes, use: Callable[[Image.Image], Awaitable[T]]
) -> tuple[T, float]:
    """(`use(photo)`, decode seconds) with `data` decoded only once the image gate admits it, so at most
    `max_decoded_images` photos are in memory however many uploads arrive; the pixels are released as
    soon as `use` returns. Above the memory ceiling: 503 + Retry-After before anything is decoded."""
    if (rss := await rt.memory.over_ceiling()) is not None:
        rt.metrics.rejected.labels("memory").inc()
        retry = rt.image_gate.retry_after()
        raise ApiError(503, "memory_full", f"The server is low on memory ({rss >> 20} MB in use); retry in {retry} s.",
                       {"Retry-After": str(retry)})  # fmt: skip
    async with rt.image_gate.hold(ctx.remaining()):
        t0 = time.perf_counter()
        image = await load_image(rt, data)
        decode_s = time.perf_counter() - t0
        try:
            return await use(image), decode_s
        finally:
            image.close()  # the pixels go now, whatever still refers to the object (a traceback, a cache)


async def describe(rt: Runtime, ctx: RequestCtx, image: Image.Image) -> ImageContext:
    """The describer's context for one photo (OCR and perception, once), its stage timings recorded."""
    context = await rt.describer.describe(image, cancel=ctx.cancel, timeout=ctx.remaining())
    if context.scene is not None:
        rt.metrics.observe_perception(context.scene.timings_ms)
    return context


def spoken_description(context: ImageContext) -> str:
    """The facts said as one paragraph: what was detected, then the text read, if any."""
    read = read_answer(context.text) if context.text else ""
    if context.scene is None:
        return read or f"{CANNOT_SEE} {NO_TEXT}"
    return f"{context.scene.summary()} {read}".strip()


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


def options(
    max_tokens: int, temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = ()
) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             repetition_penalty=REPETITION_PENALTY, stop=tuple(stop))  # fmt: skip


@dataclass
class Plan:
    """What to answer: a fixed answer, or `messages` for the model; `preface` (measured warnings) is
    said first either way. With `grounding` (OCR text, question, filter on) the model's answer is
    split into sentences and, when the filter is on, the ungrounded ones are dropped."""

    preface: str
    fixed_answer: str | None = None
    messages: list[Message] | None = None
    options: GenerationOptions | None = None
    grounding: tuple[str, str, bool, Scene | None] | None = None
    context: ImageContext | None = None  # /v1/vqa's photo

    def sentences(self) -> GroundedSentences | None:
        return GroundedSentences(*self.grounding) if self.grounding is not None else None


def fixed_answer(context: ImageContext, question: str) -> str | None:
    """For a model that cannot see: the answer the OCR text and the measured facts give by themselves,
    or None when the model should answer (with the facts)."""
    text, scene = context.text, context.scene
    if text and is_read_request(question):
        return read_answer(text)  # read verbatim: the text is data, never the model's to rephrase
    if scene is None:  # perception off or failed: only the text is known
        return None if text else f"{CANNOT_SEE} {NO_TEXT}"
    direct = scene.answer(question)
    if direct is not None:
        return spoken_description(context) if direct == scene.summary() else direct
    if not text and is_read_request(question):
        return f"{NO_TEXT} {scene.summary()}"
    if not text and not context.detected_anything:
        return scene.summary()  # nothing detected with confidence: said plainly, nothing for a model to embroider
    return None


def plan_vqa(rt: Runtime, context: ImageContext, question: str, *, length: str, language: str, max_tokens: int) -> Plan:
    preface = " ".join(context.facts.sentences())
    if not context.can_see and (fixed := fixed_answer(context, question)) is not None:
        return Plan(preface, fixed, context=context)
    messages = [
        {"role": "system", "content": system_prompt(length, language)},
        {"role": "user", "content": context.message_content(f"{context.prompt_block()}\n\nQuestion: {question}")},
    ]
    grounding = (context.text, question, rt.settings.grounding_filter and not context.can_see, context.scene)
    return Plan(preface, None, messages, options(max_tokens), grounding, context)


def chat_photos(req: ChatRequest) -> list[bytes]:
    """Every photo of a conversation as bytes, and the conversation's shape checked, before any photo is
    looked at: a fifth image, bad base64 or a last message not from the user costs no OCR at all."""
    parts = [p for m in req.messages if isinstance(m.content, list) for p in m.content if isinstance(p, ImagePart)]
    if len(parts) > MAX_IMAGES:
        raise ApiError(422, "too_many_images", f"At most {MAX_IMAGES} images per request.")
    turns = [m.role for m in req.messages if m.role not in ("system", "developer")]
    if not turns or turns[-1] != "user":
        raise ApiError(422, "invalid_request", "The last message must come from the user.")
    return [decode_base64_image(p.image_url.url) for p in parts]


async def plan_chat(rt: Runtime, ctx: RequestCtx, req: ChatRequest, max_tokens: int) -> Plan:
    """OpenAI messages -> model messages; each image becomes the describer's (measured, read) context."""
    photos = chat_photos(req)
    system = [system_prompt(req.length or rt.settings.answer_length, req.language or rt.settings.language)]
    messages: list[Message] = []
    n_images = 0
    last_user_images: list[ImageContext] = []
    for i, m in enumerate(req.messages):
        seen: list[dict] = []  # the photos themselves, for a model that can see
        images_here: list[ImageContext] = []
        if isinstance(m.content, str) or m.content is None:
            text = m.content or ""
        else:
            parts = []
            for part in m.content:
                if isinstance(part, TextPart):
                    parts.append(part.text)
                elif isinstance(part, ImagePart):
                    n_images += 1
                    context, _ = await with_photo(rt, ctx, photos[n_images - 1], lambda im: describe(rt, ctx, im))
                    images_here.append(context)
                    parts.append(f"[Photo {n_images}]\n{context.prompt_block()}")
                    if context.can_see and context.image is not None:
                        seen.append({"type": "image", "image": context.image})
            text = "\n\n".join(parts)
        if m.role in ("system", "developer"):
            system.append(text)
            continue
        messages.append({"role": m.role, "content": [*seen, {"type": "text", "text": text}] if seen else text})
        if m.role == "user" and i == len(req.messages) - 1:
            last_user_images = images_here
    preface = " ".join(s for c in last_user_images for s in c.facts.sentences())
    if last_user_images and not any(c.can_see or c.text or c.detected_anything for c in last_user_images):
        return Plan(preface, " ".join(spoken_description(c) for c in last_user_images))
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    grounding = None
    if last_user_images and rt.settings.grounding_filter and not any(c.can_see for c in last_user_images):
        question = " ".join(p.text for p in req.messages[-1].content if isinstance(p, TextPart))
        scene = last_user_images[0].scene if len(last_user_images) == 1 else None
        grounding = ("\n".join(c.text for c in last_user_images), question, True, scene)
    opts = options(max_tokens, req.temperature or 0.0, req.top_p or 1.0, stop)
    return Plan(preface, None, [{"role": "system", "content": "\n\n".join(system)}, *messages], opts, grounding)


def join_answer(preface: str, body: str) -> str:
    return f"{preface} {body}".strip() if preface else body.strip()


def finish_reason(ctx: RequestCtx, result: Generation | None) -> str:
    """stop, length, cancelled, or deadline: stopped by the request's (generation) deadline."""
    if result is None:
        return "stop"
    if result.finish_reason == "cancelled" and ctx.out_of_time():
        return "deadline"
    return result.finish_reason


def ends_sentence(text: str) -> bool:
    return text.rstrip().rstrip("\"')]")[-1:] in tuple(SENTENCE_ENDS)


def said_in_time(text: str, grounding: tuple | None) -> str:
    """What a generation cut by the deadline said that is usable: its whole sentences (grounded ones,
    when the plan filters); a sentence cut mid-way is dropped. Empty: nothing usable."""
    g = GroundedSentences(*grounding) if grounding is not None else GroundedSentences("", "", enabled=False)
    g.feed(text)
    if ends_sentence(text):
        g.flush()
    return " ".join(g.kept)


async def answer(rt: Runtime, ctx: RequestCtx, plan: Plan) -> tuple[str, Generation | None, str]:
    """The whole answer to `plan` (preface first, model text grounded), the generation if any, and its
    finish reason. Stopped by the deadline: the sentences made in time and a note; TimeoutError (504)
    when there were none."""
    if plan.messages is None:
        return join_answer(plan.preface, plan.fixed_answer or ""), None, "stop"
    result = await generate(rt, ctx, plan.messages, plan.options)
    finish = finish_reason(ctx, result)
    if finish != "deadline":
        body = filter_answer(result.text, *plan.grounding) if plan.grounding is not None else result.text
        return join_answer(plan.preface, body), result, finish
    body = said_in_time(result.text, plan.grounding)
    if not body:
        raise TimeoutError  # nothing usable: `Runtime.guard` answers 504 and counts it
    rt.metrics.timed_out()
    return join_answer(plan.preface, f"{body} {STOPPED_EARLY}"), result, finish


async def generate(rt: Runtime, ctx: RequestCtx, messages: list[Message], opts: GenerationOptions) -> Generation:
    """On the model lane, stopping at the generation deadline (skipped if its turn comes after it)."""
    until = ctx.generation_deadline
    result = await rt.model_lane.run(rt.engine.generate, messages, opts, ctx.cancel, until, cancel=ctx.cancel,
                                     deadline=until, timeout=ctx.remaining(until) + GRACE_S)  # fmt: skip
    record_generation(rt, ctx, result)
    return result


def record_generation(rt: Runtime, ctx: RequestCtx, result: Generation) -> None:
    """Tokens and speed; a cancelled generation (not a deadline stop: its request counts that) as cancelled."""
    rt.metrics.tokens.inc(result.completion_tokens)
    rt.metrics.decodes.labels(decoder=result.decoder).inc()
    if result.completion_tokens:
        rt.metrics.tokens_per_second.set(result.tokens_per_second)
    if finish_reason(ctx, result) == "cancelled":
        rt.metrics.cancelled.inc()
