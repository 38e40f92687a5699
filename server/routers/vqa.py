"""/v1/vqa: photo + question -> short spoken-style answer, as JSON, WAV, or a stream that speaks
sentence by sentence while the model is still generating."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..assist import Plan, answer, audio_json, check_max_tokens, describe, plan_vqa, with_photo
from ..deps import AcceptsWav, RuntimeDep, require_api_key, require_ready
from ..runtime import RequestCtx, Runtime
from ..schemas import VqaJson, VqaOptions, VqaResponse
from ..speech import Audio
from ..streaming import AnswerStream, Chunk, Failed, Spoken, Text, sse, sse_response
from ..uploads import parse_image_request
from .common import ERRORS, image_body, rounded, speak_timed, speech_voice, wav_response

router = APIRouter(tags=["assist"], dependencies=[Depends(require_api_key), Depends(require_ready)])
log = logging.getLogger("rpiq.server")


@router.post(
    "/v1/vqa",
    response_model=VqaResponse,
    responses={
        200: {
            "content": {"audio/wav": {}, "text/event-stream": {}},
            "description": "JSON; WAV with Accept: audio/wav; SSE (events start, delta, audio, done) with stream=true",
        },
        **ERRORS,
    },
    openapi_extra=image_body(VqaJson, VqaOptions),
    summary="Answer a question about a photo, for a blind user",
)
async def vqa(request: Request, rt: RuntimeDep, as_wav: AcceptsWav) -> Response | VqaResponse:
    image_bytes, opts = await parse_image_request(request, VqaOptions, rt.settings.max_upload_bytes)
    length = opts.length or rt.settings.answer_length
    language = opts.language or rt.settings.language
    max_tokens = check_max_tokens(rt, opts.max_tokens, length)
    speaking = opts.speak or as_wav
    voice = speech_voice(rt, opts, speaking, opts.language)  # every option checked before the photo is touched
    ctx = rt.context(opts.timeout_s, speaking=speaking)
    speech_kw = {"rate": opts.rate, "voice": voice, "volume": opts.volume}

    async def prepare() -> tuple[Plan, dict]:
        context, decode_s = await with_photo(rt, ctx, image_bytes, lambda image: describe(rt, ctx, image))
        timings = {"decode_s": decode_s, **context.timings}
        return plan_vqa(rt, context, opts.question, length=length, language=language, max_tokens=max_tokens), timings

    if opts.stream:
        plan, timings = await rt.guard(request, ctx, prepare())

        async def say(sentence: str) -> Audio:
            return await rt.speech.speak(sentence, cancel=ctx.cancel, **speech_kw)

        stream = AnswerStream(rt, ctx, plan, say if opts.speak else None)
        return sse_response(stream, partial(_events, rt, ctx, stream, timings))

    async def work() -> dict:
        plan, timings = await prepare()
        t1 = time.perf_counter()
        text, result, finish = await answer(rt, ctx, plan)
        if result is not None:
            timings.update(generate_s=time.perf_counter() - t1, completion_tokens=result.completion_tokens,
                           tokens_per_s=result.tokens_per_second)  # fmt: skip
        audio = None
        if opts.speak or as_wav:
            audio = await speak_timed(rt, ctx, text, opts, timings, voice)
        timings["total_s"] = ctx.elapsed()
        return {"plan": plan, "answer": text, "audio": audio, "timings": timings, "finish": finish}

    out = await rt.guard(request, ctx, work())
    if rt.settings.log_content:
        log.info("vqa question=%r answer=%r", opts.question, out["answer"])
    if as_wav:
        return wav_response(out["audio"].wav, out["answer"])
    context = out["plan"].context
    return VqaResponse(
        answer=out["answer"],
        audio=audio_json(out["audio"]) if out["audio"] else None,
        timings=rounded(out["timings"]),
        model=rt.engine.name,
        model_can_see=context.can_see,
        text_in_image=context.text,
        image=context.facts.as_dict(),
        finish_reason=out["finish"],
    )


async def _events(
    rt: Runtime, ctx: RequestCtx, stream: AnswerStream, timings: dict, chunks: AsyncIterator[Chunk]
) -> AsyncIterator[str]:
    """SSE: `start`, then `delta` text events, `audio` events (one WAV per sentence, in order), `done`;
    `error` for a sentence that could not be spoken, or (last) when time ran out before anything usable was
    said or generation failed. An answer stopped by the deadline ends with `done`, finish_reason "deadline"."""
    c = stream.plan.context
    yield sse("start", {"model": rt.engine.name, "model_can_see": c.can_see, "text_in_image": c.text,
                        "image": c.facts.as_dict()})  # fmt: skip
    async for chunk in chunks:
        if isinstance(chunk, Text):
            yield sse("delta", {"text": chunk.text})
        elif isinstance(chunk, Spoken):
            yield sse("audio", {"index": chunk.index, "text": chunk.text, "t_s": round(chunk.t_s, 4),
                                **audio_json(chunk.audio)})  # fmt: skip
        elif isinstance(chunk, Failed):
            yield sse("error", {"error": {"code": chunk.code, "message": chunk.message}})
        else:
            usage, r = {}, chunk.result
            if r is not None:
                usage = {"completion_tokens": r.completion_tokens, "tokens_per_s": round(r.tokens_per_second, 2)}
                timings["first_token_s"] = r.first_token_s or 0.0
            timings["total_s"] = ctx.elapsed()
            if stream.first_audio_s is not None:
                timings["time_to_first_audio_s"] = stream.first_audio_s
            yield sse("done", {"answer": stream.answer, "finish_reason": chunk.finish_reason,
                               "model": rt.engine.name, "timings": rounded(timings), **usage})  # fmt: skip
