"""/v1/vqa: photo + question -> short spoken-style answer, as JSON, WAV, or a stream that speaks
sentence by sentence while the model is still generating."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..assist import (
    GroundedSentences,
    Plan,
    audio_json,
    check_max_tokens,
    filter_answer,
    generate,
    join_answer,
    load_image,
    plan_vqa,
    record_generation,
)
from ..auth import require_api_key
from ..runtime import ClientGone, RequestCtx, Runtime
from ..schemas import VqaJson, VqaOptions, VqaResponse
from ..uploads import parse_image_request
from .common import (
    ERRORS,
    image_body,
    pick_voice,
    runtime,
    sse,
    start_generation,
    wants_wav,
    wav_response,
)

router = APIRouter(tags=["assist"], dependencies=[Depends(require_api_key)])


def grounding(rt: Runtime, plan: Plan) -> bool:
    return rt.settings.grounding_filter and not plan.context.can_see


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
async def vqa(request: Request) -> Response:
    rt = runtime(request)
    rt.require_ready()
    image_bytes, opts = await parse_image_request(request, VqaOptions, rt.settings.max_upload_bytes)
    length = opts.length or rt.settings.answer_length
    language = opts.language or rt.settings.language
    max_tokens = check_max_tokens(rt, opts.max_tokens, length)
    ctx = rt.context(opts.timeout_s)
    as_wav = wants_wav(request)
    voice = pick_voice(rt, opts.voice, opts.language)
    speech_kw = {"rate": opts.rate, "voice": voice, "volume": opts.volume}

    async def prepare() -> tuple[Plan, dict]:
        t0 = time.perf_counter()
        image = await load_image(rt, image_bytes)
        timings = {"decode_s": time.perf_counter() - t0}
        context = await rt.describer.describe(image, cancel=ctx.cancel, timeout=ctx.remaining())
        timings.update(context.timings)
        return plan_vqa(rt, context, opts.question, length=length, language=language, max_tokens=max_tokens), timings

    if opts.stream:
        try:
            plan, timings = await rt.guard(request, ctx, prepare())
        except ClientGone:
            return Response(status_code=499)
        return _stream(rt, ctx, plan, timings, opts.question, speak=opts.speak, speech_kw=speech_kw)

    async def work() -> dict:
        plan, timings = await prepare()
        finish = "stop"
        if plan.fixed_answer is not None:
            answer = join_answer(plan.preface, plan.fixed_answer)
        else:
            t1 = time.perf_counter()
            result = await generate(rt, ctx, plan.messages, plan.params)
            timings.update(generate_s=time.perf_counter() - t1, completion_tokens=result.completion_tokens,
                           tokens_per_s=result.tokens_per_s)  # fmt: skip
            finish = result.finish_reason
            body = filter_answer(result.text, plan.context.text, opts.question, grounding(rt, plan))
            answer = join_answer(plan.preface, body or "I could not form an answer.")
        audio = None
        if opts.speak or as_wav:
            t2 = time.perf_counter()
            audio = await rt.speech.speak(answer, cancel=ctx.cancel, timeout=ctx.remaining(), **speech_kw)
            timings["speech_s"] = time.perf_counter() - t2
        timings["total_s"] = ctx.elapsed()
        return {"plan": plan, "answer": answer, "audio": audio, "timings": timings, "finish": finish}

    try:
        out = await rt.guard(request, ctx, work())
    except ClientGone:
        return Response(status_code=499)
    if rt.settings.log_content:
        import logging

        logging.getLogger("rpiq.server").info("vqa question=%r answer=%r", opts.question, out["answer"])
    if as_wav:
        return wav_response(out["audio"].wav, out["answer"])
    plan: Plan = out["plan"]
    body = VqaResponse(
        answer=out["answer"],
        audio=audio_json(out["audio"]) if out["audio"] else None,
        timings={k: round(float(v), 4) for k, v in out["timings"].items()},
        model=rt.engine.name,
        model_can_see=plan.context.can_see,
        text_in_image=plan.context.text,
        image=plan.context.facts.as_dict(),
        finish_reason=out["finish"],
    )
    return JSONResponse(body.model_dump())


def _stream(
    rt: Runtime, ctx: RequestCtx, plan: Plan, timings: dict, question: str, *, speak: bool, speech_kw: dict
) -> Response:
    """SSE: `start`, then `delta` text events, `audio` events (one WAV per sentence, in order), `done`."""
    q: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
    gen_future = None
    if plan.messages is not None:
        gen_future = start_generation(rt, ctx, plan.messages, plan.params, q)

    async def events() -> AsyncIterator[str]:
        pieces: list[str] = []
        sentences = GroundedSentences(plan.context.text, question, grounding(rt, plan))
        speaking: list[tuple[str, asyncio.Future]] = []
        emitted = 0
        first_audio: float | None = None
        finished = False
        completed = False

        def say(sentence: str) -> None:
            task = asyncio.ensure_future(rt.speech.speak(sentence, cancel=ctx.cancel, **speech_kw))
            task.add_done_callback(lambda _t: q.put_nowait(("audio", None)))
            speaking.append((sentence, task))

        def emit(sentence_list: list[str]) -> list[str]:
            out = []
            for sentence in sentence_list:
                pieces.append(sentence)
                if speak:
                    say(sentence)
                out.append(sse("delta", {"text": sentence + " "}))
            return out

        try:
            yield sse("start", {"model": rt.engine.name, "model_can_see": plan.context.can_see,
                                "text_in_image": plan.context.text, "image": plan.context.facts.as_dict()})  # fmt: skip
            fixed = GroundedSentences("", "", enabled=False)  # measured facts and fixed answers: never filtered
            for ev in emit(fixed.feed(plan.preface + " ") + fixed.flush()):
                yield ev
            if plan.fixed_answer is not None:
                for ev in emit(fixed.feed(plan.fixed_answer) + fixed.flush()):
                    yield ev
                q.put_nowait(("end", None))
            while True:
                while emitted < len(speaking) and speaking[emitted][1].done():
                    sentence, task = speaking[emitted]
                    emitted += 1
                    if task.exception() is not None:
                        yield sse("error", {"error": {"code": "speech_failed", "message": str(task.exception())}})
                        continue
                    if first_audio is None:
                        first_audio = ctx.elapsed()
                        rt.metrics.first_audio.observe(first_audio)
                    yield sse("audio", {"index": emitted - 1, "text": sentence, "t_s": round(ctx.elapsed(), 4),
                                        **audio_json(task.result())})  # fmt: skip
                if finished and emitted == len(speaking):
                    break
                try:
                    kind, value = await asyncio.wait_for(q.get(), timeout=max(0.01, ctx.deadline - time.monotonic()))
                except TimeoutError:
                    ctx.cancel.set()
                    rt.metrics.timeouts.inc()
                    yield sse("error", {"error": {"code": "timeout", "message": "The request ran out of time."}})
                    return
                if kind == "delta":
                    for ev in emit(sentences.feed(value)):
                        yield ev
                elif kind == "end" and not finished:
                    finished = True
                    rest = sentences.flush()
                    if gen_future is not None and not sentences.kept:
                        rest = [sentences.fallback() or "I could not form an answer."]
                    for ev in emit(rest):
                        yield ev
            finish, usage = "stop", {}
            if gen_future is not None:
                if gen_future.exception() is not None:
                    yield sse("error", {"error": {"code": "generation_failed", "message": str(gen_future.exception())}})
                    return
                result = gen_future.result()
                record_generation(rt, result)
                finish = result.finish_reason
                usage = {"completion_tokens": result.completion_tokens, "tokens_per_s": round(result.tokens_per_s, 2)}
                timings["first_token_s"] = result.first_token_s or 0.0
            timings["total_s"] = ctx.elapsed()
            if first_audio is not None:
                timings["time_to_first_audio_s"] = first_audio
            answer = " ".join(pieces).strip()
            yield sse("done", {"answer": answer, "finish_reason": finish, "model": rt.engine.name,
                               "timings": {k: round(float(v), 4) for k, v in timings.items()}, **usage})  # fmt: skip
            completed = True
        finally:
            if not completed and gen_future is not None and not gen_future.done():
                rt.metrics.cancelled.inc()
            ctx.cancel.set()  # client gone or finished: stop generating either way

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
