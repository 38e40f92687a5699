"""Server-Sent Events for /v1/vqa and /v1/chat/completions: one state machine, two wire formats.

`AnswerStream` runs a `Plan` as it is made: the preface and any fixed answer first, then the
model's text as it is generated (whole grounded sentences when the plan asks for grounding, raw
deltas otherwise), each sentence optionally spoken, audio handed out in order, all within the
request's deadline. It yields `Text`, `Spoken`, `Failed` and `Done` chunks; each route renders them
in its own format (named rpiq events, or OpenAI ``chat.completion.chunk`` objects) with
`sse_response`.

When the deadline stops generation, the stream ends as the JSON answer does (`assist.answer`): the
last sentence if it was whole, a note that it stopped early, and `Done` with finish reason
"deadline"; a `Failed("timeout")` only when nothing usable was said.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from models.inference import Generation

from .assist import GRACE_S, STOPPED_EARLY, Plan, ends_sentence, finish_reason, record_generation
from .grounding import GroundedSentences
from .lanes import Cancelled, QueueFull
from .runtime import RequestCtx, Runtime
from .speech import Audio


@dataclass
class Text:
    text: str  # a sentence with its trailing space, or a raw model delta


@dataclass
class Spoken:
    index: int
    text: str
    audio: Audio
    t_s: float  # since the request started


@dataclass
class Failed:
    code: str  # speech_failed (the stream goes on), timeout, generation_failed (the stream ends)
    message: str


@dataclass
class Done:
    result: Generation | None  # None: a fixed answer (the model was not asked), or generation overran
    finish_reason: str = "stop"  # stop, length, cancelled or deadline (`assist.finish_reason`)


Chunk = Text | Spoken | Failed | Done


def sse(event: str | None, data: Any) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


class AnswerStream:
    """Starts generating at once (a full model lane is a 503 before anything streams)."""

    def __init__(
        self, rt: Runtime, ctx: RequestCtx, plan: Plan, speak: Callable[[str], Awaitable[Audio]] | None = None
    ) -> None:
        self.rt, self.ctx, self.plan, self.speak = rt, ctx, plan, speak
        self.q: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        self.texts: list[str] = []
        self.first_audio_s: float | None = None
        self.finish: str | None = None  # set once generation is over (or overran the deadline)
        self.generation = self._start() if plan.messages is not None else None

    @property
    def answer(self) -> str:
        return "".join(self.texts).strip()

    def _start(self) -> asyncio.Future:
        """Generate on the model lane: text arrives on the queue as ("delta", text) from the model
        thread, then ("end", None) once generation is over."""
        loop = asyncio.get_running_loop()
        rt, ctx, plan = self.rt, self.ctx, self.plan

        def on_text(text: str) -> None:  # called on the model thread
            loop.call_soon_threadsafe(self.q.put_nowait, ("delta", text))

        until = ctx.generation_deadline
        try:
            cfut = rt.model_lane.submit_sync(rt.engine.generate, plan.messages, plan.options, ctx.cancel, until,
                                             on_text, cancel=ctx.cancel, deadline=until)  # fmt: skip
        except QueueFull as e:
            raise rt.busy(e) from None
        future = asyncio.wrap_future(cfut)
        future.add_done_callback(lambda _f: self.q.put_nowait(("end", None)))
        return future

    async def chunks(self) -> AsyncIterator[Chunk]:
        rt, ctx, plan = self.rt, self.ctx, self.plan
        speaking: list[tuple[str, asyncio.Future]] = []
        model_text = plan.sentences()
        emitted, finished, raw = 0, False, ""

        def emit(sentences: list[str]) -> list[Text]:
            out = []
            for sentence in sentences:
                if self.speak is not None:
                    task = asyncio.ensure_future(self.speak(sentence))
                    task.add_done_callback(lambda _t: self.q.put_nowait(("audio", None)))
                    speaking.append((sentence, task))
                out.append(self._text(sentence + " "))
            return out

        try:
            fixed = GroundedSentences("", "", enabled=False)  # measured facts and fixed answers: never filtered
            for chunk in emit(fixed.feed(plan.preface + " ") + fixed.flush()):
                yield chunk
            if plan.messages is None:
                for chunk in emit(fixed.feed(plan.fixed_answer or "") + fixed.flush()):
                    yield chunk
                self.q.put_nowait(("end", None))
            while True:
                while emitted < len(speaking) and speaking[emitted][1].done():
                    sentence, task = speaking[emitted]
                    emitted += 1
                    if task.exception() is not None:
                        yield Failed("speech_failed", str(task.exception()))
                        continue
                    if self.first_audio_s is None:
                        self.first_audio_s = ctx.elapsed()
                        rt.metrics.first_audio.observe(self.first_audio_s)
                    yield Spoken(emitted - 1, sentence, task.result(), ctx.elapsed())
                if finished and emitted == len(speaking):
                    break
                try:
                    left = max(0.01, ctx.deadline + GRACE_S - time.monotonic())
                    kind, value = await asyncio.wait_for(self.q.get(), timeout=left)
                except TimeoutError:
                    kind, value = "late", None  # generation (or speech) overran the deadline
                if kind == "delta":
                    raw += value
                    for chunk in [self._text(value)] if model_text is None else emit(model_text.feed(value)):
                        yield chunk
                elif kind in ("end", "late") and not finished:
                    finished = True
                    self.finish = "deadline" if kind == "late" else self._finish()
                    ending = self._ending(model_text, raw)
                    if ending is None:
                        yield Failed("timeout", "The request ran out of time.")
                        return
                    for chunk in emit(ending):
                        yield chunk
                elif kind == "late":  # the answer is made but its speech did not finish in time
                    ctx.cancel.set()
                    if self.finish != "deadline":  # else counted already
                        rt.metrics.timed_out()
                    yield Failed("timeout", "The request ran out of time.")
                    return
            result = None
            if self.generation is not None and self.generation.done():
                error = self.generation.exception()
                if isinstance(error, Cancelled):  # its turn on the model lane came after the deadline
                    rt.metrics.timed_out()
                    yield Failed("timeout", "The request ran out of time.")
                    return
                if error is not None:
                    yield Failed("generation_failed", str(error))
                    return
                result = self.generation.result()
                record_generation(rt, ctx, result)
            yield Done(result, self.finish or "stop")
        finally:
            if self.generation is not None and not self.generation.done() and self.finish != "deadline":
                rt.metrics.cancelled.inc()  # the client left mid-answer
            ctx.cancel.set()  # stop generating either way

    def _finish(self) -> str:
        if self.generation is None:
            return "stop"
        if self.generation.exception() is not None:
            return "failed"  # said after the loop
        return finish_reason(self.ctx, self.generation.result())

    def _ending(self, model_text: GroundedSentences | None, raw: str) -> list[str] | None:
        """What ends the answer once generation is over: the rest of the last sentence (or, when every
        sentence was dropped, the plain facts); after a deadline stop only a whole last sentence and the
        note, or None when nothing usable was said in time."""
        if self.finish == "failed":
            return []
        if self.finish != "deadline":
            if model_text is None:
                return []
            rest = model_text.flush()
            return rest if model_text.kept else [model_text.fallback() or ""]
        self.ctx.cancel.set()
        self.rt.metrics.timed_out()
        if model_text is None:  # raw deltas were streamed as they came
            return [f" {STOPPED_EARLY}"] if raw.strip() else None
        rest = model_text.flush() if ends_sentence(raw) else []
        return [*rest, STOPPED_EARLY] if model_text.kept else None

    def _text(self, text: str) -> Text:
        self.texts.append(text)
        return Text(text)


def sse_response(
    stream: AnswerStream, render: Callable[[AsyncIterator[Chunk]], AsyncIterator[str]]
) -> StreamingResponse:
    """`render`'s SSE lines for `stream`'s chunks; a client that leaves closes both (and stops the model)."""

    async def body() -> AsyncIterator[str]:
        async with aclosing(stream.chunks()) as chunks, aclosing(render(chunks)) as lines:
            async for line in lines:
                yield line

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
