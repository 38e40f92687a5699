"""/v1/chat/completions: OpenAI-compatible chat, with images as data: URIs and SSE streaming, so
existing OpenAI clients and voice assistants work unchanged."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..assist import (
    GroundedSentences,
    check_max_tokens,
    filter_answer,
    generate,
    join_answer,
    load_image,
    record_generation,
)
from ..auth import require_api_key
from ..engine import GenParams
from ..errors import ApiError
from ..prompts import CANNOT_SEE, NO_TEXT, system_prompt
from ..runtime import ClientGone, RequestCtx, Runtime
from ..schemas import ChatRequest, ImagePart, TextPart, usage
from ..uploads import decode_base64_image, read_body
from .common import ERRORS, runtime, sse, start_generation

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])
MAX_IMAGES = 4


class ChatPlan:
    def __init__(self, messages: list[dict], params: GenParams, preface: str, fixed: str | None) -> None:
        self.messages, self.params, self.preface, self.fixed = messages, params, preface, fixed
        self.ground: tuple[str, str] | None = None  # (OCR text, question) when the answer must be grounded


async def _plan(rt: Runtime, req: ChatRequest, ctx: RequestCtx, max_tokens: int) -> ChatPlan:
    """OpenAI messages -> engine messages; each image becomes the describer's (measured, read) context."""
    length = req.length or rt.settings.answer_length
    language = req.language or rt.settings.language
    system = [system_prompt(length, language)]
    messages: list[dict] = []
    n_images = 0
    last_user_images: list = []
    for i, m in enumerate(req.messages):
        seen: list[dict] = []  # the photos themselves, for a model that can see
        if isinstance(m.content, str) or m.content is None:
            text = m.content or ""
            images_here: list = []
        else:
            parts, images_here = [], []
            for part in m.content:
                if isinstance(part, TextPart):
                    parts.append(part.text)
                elif isinstance(part, ImagePart):
                    n_images += 1
                    if n_images > MAX_IMAGES:
                        raise ApiError(422, "too_many_images", f"At most {MAX_IMAGES} images per request.")
                    image = await load_image(rt, decode_base64_image(part.image_url.url))
                    context = await rt.describer.describe(image, cancel=ctx.cancel, timeout=ctx.remaining())
                    images_here.append(context)
                    parts.append(f"[Photo {n_images}]\n{context.prompt_block()}")
                    if context.can_see and context.image is not None:
                        seen.append({"type": "image", "image": context.image})
            text = "\n\n".join(parts)
        if m.role in ("system", "developer"):
            system.append(text)
            continue
        content = [*seen, {"type": "text", "text": text}] if seen else text
        messages.append({"role": m.role, "content": content})
        if m.role == "user" and i == len(req.messages) - 1:
            last_user_images = images_here
    if not messages or messages[-1]["role"] != "user":
        raise ApiError(422, "invalid_request", "The last message must come from the user.")
    preface = " ".join(s for c in last_user_images for s in c.facts.sentences())
    fixed = None
    if last_user_images and not any(c.can_see or c.text for c in last_user_images):
        fixed = f"{CANNOT_SEE} {NO_TEXT}"
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params = GenParams(max_new_tokens=max_tokens, temperature=req.temperature or 0.0, top_p=req.top_p or 1.0, stop=stop)
    plan = ChatPlan([{"role": "system", "content": "\n\n".join(system)}, *messages], params, preface, fixed)
    if last_user_images and rt.settings.grounding_filter and not any(c.can_see for c in last_user_images):
        question = " ".join(p.text for p in req.messages[-1].content if isinstance(p, TextPart))
        plan.ground = ("\n".join(c.text for c in last_user_images), question)
    return plan


@router.post(
    "/v1/chat/completions",
    responses={200: {"content": {"text/event-stream": {}}, "description": "chat.completion, or SSE chunks"}, **ERRORS},
    openapi_extra={"requestBody": {"required": True,
                                   "content": {"application/json": {"schema": ChatRequest.model_json_schema()}}}},
)  # fmt: skip
async def chat_completions(request: Request) -> Response:
    rt = runtime(request)
    rt.require_ready()
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise ApiError(415, "unsupported_content_type", "Send the chat request as application/json.")
    body = await read_body(request, MAX_IMAGES * rt.settings.max_upload_bytes * 4 // 3 + 1024 * 1024)
    try:
        req = ChatRequest.model_validate_json(body)
    except ValueError as e:
        msg = str(e).split("\n")
        raise ApiError(422, "invalid_request", " ".join(msg[:3])) from None
    length = req.length or rt.settings.answer_length
    max_tokens = check_max_tokens(rt, req.max_completion_tokens or req.max_tokens, length)
    ctx = rt.context(None)
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    if req.stream:
        try:
            plan = await rt.guard(request, ctx, _plan(rt, req, ctx, max_tokens))
        except ClientGone:
            return Response(status_code=499)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream(rt, ctx, plan, cid, created, include_usage)

    async def work() -> tuple[str, str, int, int]:
        plan = await _plan(rt, req, ctx, max_tokens)
        if plan.fixed is not None:
            return join_answer(plan.preface, plan.fixed), "stop", 0, 0
        result = await generate(rt, ctx, plan.messages, plan.params)
        reason = "length" if result.finish_reason in ("length", "cancelled") else "stop"
        text = result.text
        if plan.ground is not None:
            text = filter_answer(text, *plan.ground, enabled=True)
        return join_answer(plan.preface, text), reason, result.prompt_tokens, result.completion_tokens

    try:
        text, reason, n_prompt, n_completion = await rt.guard(request, ctx, work())
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": rt.engine.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                     "logprobs": None}],
        "usage": usage(n_prompt, n_completion),
    })  # fmt: skip


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}  # fmt: skip


def _stream(rt: Runtime, ctx: RequestCtx, plan: ChatPlan, cid: str, created: int, include_usage: bool) -> Response:
    q: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
    gen_future = None
    if plan.fixed is None:
        gen_future = start_generation(rt, ctx, plan.messages, plan.params, q)
    model = rt.engine.name

    async def events() -> AsyncIterator[str]:
        completed = False
        grounded = GroundedSentences(*plan.ground, enabled=True) if plan.ground is not None else None
        try:
            yield sse(None, _chunk(cid, created, model, {"role": "assistant", "content": ""}))
            if plan.preface:
                yield sse(None, _chunk(cid, created, model, {"content": plan.preface + " "}))
            if plan.fixed is not None:
                yield sse(None, _chunk(cid, created, model, {"content": plan.fixed}))
                yield sse(None, _chunk(cid, created, model, {}, "stop"))
                if include_usage:
                    yield sse(None, {**_chunk(cid, created, model, {}), "choices": [], "usage": usage(0, 0)})
                yield sse(None, "[DONE]")
                completed = True
                return
            while True:
                try:
                    kind, value = await asyncio.wait_for(q.get(), timeout=max(0.01, ctx.deadline - time.monotonic()))
                except TimeoutError:
                    ctx.cancel.set()
                    rt.metrics.timeouts.inc()
                    yield sse(None, {"error": {"code": "timeout", "message": "The request ran out of time."}})
                    return
                if kind == "end":
                    if grounded is not None:
                        rest = grounded.flush()
                        if not grounded.kept:
                            rest = [grounded.fallback() or ""]
                        for sentence in rest:
                            yield sse(None, _chunk(cid, created, model, {"content": sentence + " "}))
                    break
                if grounded is None:
                    yield sse(None, _chunk(cid, created, model, {"content": value}))
                else:  # answers about photos from a model that cannot see: whole, grounded sentences only
                    for sentence in grounded.feed(value):
                        yield sse(None, _chunk(cid, created, model, {"content": sentence + " "}))
            if gen_future.exception() is not None:
                yield sse(None, {"error": {"code": "generation_failed", "message": str(gen_future.exception())}})
                return
            result = gen_future.result()
            record_generation(rt, result)
            reason = "length" if result.finish_reason in ("length", "cancelled") else "stop"
            yield sse(None, _chunk(cid, created, model, {}, reason))
            if include_usage:
                yield sse(None, {**_chunk(cid, created, model, {}), "choices": [],
                                 "usage": usage(result.prompt_tokens, result.completion_tokens)})  # fmt: skip
            yield sse(None, "[DONE]")
            completed = True
        finally:
            if not completed and gen_future is not None and not gen_future.done():
                rt.metrics.cancelled.inc()
            ctx.cancel.set()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
