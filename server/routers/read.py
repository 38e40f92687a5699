"""/v1/read: image -> the text in it, in reading order, and optionally speech."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from PIL import Image

from ..assist import audio_json, with_photo
from ..deps import AcceptsWav, RuntimeDep, require_api_key, require_ready
from ..errors import ApiError
from ..images import ImageFacts, measure
from ..prompts import NO_TEXT
from ..reading import Reading
from ..schemas import ReadJson, ReadOptions, ReadResponse
from ..uploads import parse_image_request
from .common import ERRORS, image_body, rounded, speak_timed, speech_voice, wav_response

router = APIRouter(tags=["assist"], dependencies=[Depends(require_api_key), Depends(require_ready)])


@router.post(
    "/v1/read",
    response_model=ReadResponse,
    responses={200: {"content": {"audio/wav": {}}, "description": "JSON, or WAV with Accept: audio/wav"}, **ERRORS},
    openapi_extra=image_body(ReadJson, ReadOptions),
    summary="Read the text in a photo (signs, labels, letters, screens), in reading order",
)
async def read(request: Request, rt: RuntimeDep, as_wav: AcceptsWav) -> Response | ReadResponse:
    image_bytes, opts = await parse_image_request(request, ReadOptions, rt.settings.max_upload_bytes)
    voice = speech_voice(rt, opts, opts.speak or as_wav)
    if rt.reader is None:
        raise ApiError(503, "ocr_unavailable", f"No OCR engine is available: {rt.components.get('ocr')}")
    ctx = rt.context(opts.timeout_s)
    cleanup = rt.settings.ocr_cleanup if opts.cleanup is None else opts.cleanup

    async def read_photo(image: Image.Image) -> tuple[ImageFacts, Reading]:
        return measure(image), await rt.reader.read(image, cancel=ctx.cancel, timeout=ctx.remaining(),
                                                    cleanup=cleanup)  # fmt: skip

    async def work() -> dict:
        (facts, reading), decode_s = await with_photo(rt, ctx, image_bytes, read_photo)
        timings = {"decode_s": decode_s}
        timings.update(reading.timings)
        audio = None
        if opts.speak or as_wav:
            spoken = " ".join([*facts.sentences(), reading.text.replace("\n", ". ") if reading.text else NO_TEXT])
            audio = await speak_timed(rt, ctx, spoken, opts, timings, voice)
        timings["total_s"] = ctx.elapsed()
        return {"reading": reading, "facts": facts, "audio": audio, "timings": timings}

    out = await rt.guard(request, ctx, work())
    reading, audio = out["reading"], out["audio"]
    if as_wav:
        return wav_response(audio.wav, reading.text)
    return ReadResponse(
        text=reading.text,
        lines=[{"text": ln.text, "confidence": round(ln.confidence, 3), "box": ln.box} for ln in reading.lines],
        engine=reading.engine,
        cleaned=reading.cleaned,
        audio=audio_json(audio) if audio else None,
        timings=rounded(out["timings"]),
        model=rt.engine.name,
        image=out["facts"].as_dict(),
    )
