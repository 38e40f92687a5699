"""The assistive logic shared by /v1/vqa, /v1/read and /v1/chat/completions, independent of HTTP:
the two planners (a photo question, an OpenAI conversation) and running a plan to an answer.

Honesty rules, enforced in code rather than hoped for from a 135M-parameter model:
* quality problems (dark, blurry, no contrast) are measured and said first, before any model text;
* a model that cannot see is not asked what the measured facts answer by themselves ("what is in
  front of me?", "is there a person?", "what colour is it?": `perception.answer_from_facts`), nor
  about a photo in which nothing was read or detected with confidence: the facts' own summary says so;
* otherwise it gets the facts and the OCR text as labelled data, and its answers keep only sentences
  grounded in them (`grounding.py`).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from dataclasses import dataclass

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


def limits(rt: Runtime) -> ImageLimits:
    s = rt.settings
    return ImageLimits(s.max_upload_bytes, s.max_pixels, tuple(f.upper() for f in s.image_formats), s.max_image_side)


async def load_image(rt: Runtime, data: bytes) -> Image.Image:
    """Decode off the event loop (a 12 MB JPEG takes a while), with all the upload limits."""
    return await asyncio.to_thread(decode_image, data, limits(rt))


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


async def plan_chat(rt: Runtime, ctx: RequestCtx, req: ChatRequest, max_tokens: int) -> Plan:
    """OpenAI messages -> model messages; each image becomes the describer's (measured, read) context."""
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
                    if n_images > MAX_IMAGES:
                        raise ApiError(422, "too_many_images", f"At most {MAX_IMAGES} images per request.")
                    image = await load_image(rt, decode_base64_image(part.image_url.url))
                    context = await describe(rt, ctx, image)
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
    if not messages or messages[-1]["role"] != "user":
        raise ApiError(422, "invalid_request", "The last message must come from the user.")
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


async def answer(rt: Runtime, ctx: RequestCtx, plan: Plan) -> tuple[str, Generation | None]:
    """The whole answer to `plan` (preface first, model text grounded) and the generation, if any."""
    if plan.messages is None:
        return join_answer(plan.preface, plan.fixed_answer or ""), None
    result = await generate(rt, ctx, plan.messages, plan.options)
    body = filter_answer(result.text, *plan.grounding) if plan.grounding is not None else result.text
    return join_answer(plan.preface, body), result


async def generate(rt: Runtime, ctx: RequestCtx, messages: list[Message], opts: GenerationOptions) -> Generation:
    result = await rt.model_lane.run(rt.engine.generate, messages, opts, ctx.cancel, ctx.deadline,
                                     cancel=ctx.cancel, timeout=ctx.remaining())  # fmt: skip
    record_generation(rt, result)
    return result


def record_generation(rt: Runtime, result: Generation) -> None:
    rt.metrics.tokens.inc(result.completion_tokens)
    if result.completion_tokens:
        rt.metrics.tokens_per_second.set(result.tokens_per_second)
    if result.finish_reason == "cancelled":
        rt.metrics.cancelled.inc()
