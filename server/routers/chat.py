"""/v1/chat/completions: OpenAI-compatible chat, with images as data: URIs and SSE streaming, so
existing OpenAI clients and voice assistants work unchanged."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from models.inference import Generation

from ..assist import MAX_IMAGES, answer, check_max_tokens, plan_chat
from ..deps import RuntimeDep, require_api_key, require_json, require_ready
from ..schemas import ChatCompletion, ChatRequest, usage
from ..settings import ServerSettings
from ..streaming import AnswerStream, Chunk, Done, Failed, Text, sse, sse_response
from .common import ERRORS, body_limited


def max_body_bytes(settings: ServerSettings) -> int:
    return MAX_IMAGES * settings.max_upload_bytes * 4 // 3 + 1024 * 1024


router = APIRouter(
    tags=["openai"],
    dependencies=[Depends(require_api_key), Depends(require_ready)],
    route_class=body_limited(max_body_bytes),
)


def _finish(finish: str) -> str:
    """OpenAI's finish reasons: a cut-off answer (max tokens, or time ran out) is "length"."""
    return "length" if finish in ("length", "cancelled", "deadline") else "stop"


TRUNCATED_HEADER = "X-Rpiq-Prompt-Truncated"
FINISH_HEADER = "X-Rpiq-Finish-Reason"
OK_RESPONSE = {
    "content": {"text/event-stream": {}},
    "description": "chat.completion, or SSE chunks. A conversation longer than the model's prompt budget "
    "(RPIQ_MAX_PROMPT_TOKENS) keeps its system prompt and last message and drops the oldest turns (then the "
    f"middle of the longest message); the answer then carries `{TRUNCATED_HEADER}: true`, and in a stream the "
    'finish chunk carries `"prompt_truncated": true` (an rpiq extension). An answer stopped by the request '
    'deadline keeps the sentences made in time, ends with "(stopped early: out of time)" and has finish_reason '
    f'"length" plus `{FINISH_HEADER}: deadline` (in a stream: `"rpiq_finish_reason": "deadline"`).',
    "headers": {
        TRUNCATED_HEADER: {"description": "true when the prompt was cut to fit", "schema": {"type": "string"}},
        FINISH_HEADER: {"description": "deadline: stopped early, out of time", "schema": {"type": "string"}},
    },
}


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={200: OK_RESPONSE, **ERRORS},
    dependencies=[Depends(require_json)],
    summary="OpenAI-compatible chat; images as data: URIs",
)
async def chat_completions(
    req: ChatRequest, rt: RuntimeDep, request: Request, response: Response
) -> Response | ChatCompletion:
    length = req.length or rt.settings.answer_length
    max_tokens = check_max_tokens(rt, req.max_completion_tokens or req.max_tokens, length)
    ctx = rt.context(None)
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    if req.stream:
        plan = await rt.guard(request, ctx, plan_chat(rt, ctx, req, max_tokens))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stream = AnswerStream(rt, ctx, plan)
        return sse_response(stream, partial(_events, cid, created, rt.engine.name, include_usage))

    async def work() -> tuple[str, Generation | None, str]:
        return await answer(rt, ctx, await plan_chat(rt, ctx, req, max_tokens))

    text, result, finish = await rt.guard(request, ctx, work())
    n_prompt, n_completion = (result.prompt_tokens, result.completion_tokens) if result else (0, 0)
    if result is not None and result.prompt_truncated:
        response.headers[TRUNCATED_HEADER] = "true"
    if finish == "deadline":
        response.headers[FINISH_HEADER] = finish
    return ChatCompletion(
        id=cid, created=created, model=rt.engine.name,
        choices=[{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": _finish(finish)}],
        usage=usage(n_prompt, n_completion),
    )  # fmt: skip


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}  # fmt: skip


async def _events(
    cid: str, created: int, model: str, include_usage: bool, chunks: AsyncIterator[Chunk]
) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk, content chunks, a finish chunk, optionally usage, then [DONE];
    an ``{"error": ...}`` object ends it early when time runs out or generation fails."""
    yield sse(None, _chunk(cid, created, model, {"role": "assistant", "content": ""}))
    async for chunk in chunks:
        if isinstance(chunk, Text):
            yield sse(None, _chunk(cid, created, model, {"content": chunk.text}))
        elif isinstance(chunk, Failed):
            yield sse(None, {"error": {"code": chunk.code, "message": chunk.message}})
        elif isinstance(chunk, Done):
            finish = _chunk(cid, created, model, {}, _finish(chunk.finish_reason))
            if chunk.result is not None and chunk.result.prompt_truncated:
                finish["prompt_truncated"] = True
            if chunk.finish_reason == "deadline":
                finish["rpiq_finish_reason"] = "deadline"
            yield sse(None, finish)
            if include_usage:
                r = chunk.result
                counts = usage(r.prompt_tokens, r.completion_tokens) if r else usage(0, 0)
                yield sse(None, {**_chunk(cid, created, model, {}), "choices": [], "usage": counts})
            yield sse(None, "[DONE]")
