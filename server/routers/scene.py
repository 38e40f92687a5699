"""/v1/scene: photo -> what the perception nets and OCR measured in it, as structured facts and one
spoken paragraph (objects with clock positions, people, colours, light, codes, text).

No language model is involved: every word of the summary comes from a measurement, so this is the
fastest and most trustworthy answer to "what is in front of me?" on the default (text-only) install.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..assist import audio_json, describe, join_answer, spoken_description, with_photo
from ..deps import AcceptsWav, RuntimeDep, require_api_key, require_ready
from ..perception import Scene
from ..schemas import SceneJson, SceneOptions, SceneResponse
from ..uploads import parse_image_request
from .common import ERRORS, image_body, rounded, speak_timed, speech_voice, wav_response

SCENE_FIELDS = {"objects", "people", "labels", "colours", "centre_colours", "light", "codes", "blank", "errors"}
router = APIRouter(tags=["assist"], dependencies=[Depends(require_api_key), Depends(require_ready)])


@router.post(
    "/v1/scene",
    response_model=SceneResponse,
    responses={200: {"content": {"audio/wav": {}}, "description": "JSON, or WAV with Accept: audio/wav"}, **ERRORS},
    openapi_extra=image_body(SceneJson, SceneOptions),
    summary="Describe a photo from measured facts: objects and where they are, people, colours, light, codes, text",
)
async def scene(request: Request, rt: RuntimeDep, as_wav: AcceptsWav) -> Response | SceneResponse:
    image_bytes, opts = await parse_image_request(request, SceneOptions, rt.settings.max_upload_bytes)
    voice = speech_voice(rt, opts, opts.speak or as_wav)
    ctx = rt.context(opts.timeout_s)

    async def work() -> dict:
        context, decode_s = await with_photo(rt, ctx, image_bytes, lambda image: describe(rt, ctx, image))
        timings = {"decode_s": decode_s, **context.timings}
        summary = join_answer(" ".join(context.facts.sentences()), spoken_description(context))
        audio = await speak_timed(rt, ctx, summary, opts, timings, voice) if opts.speak or as_wav else None
        timings["total_s"] = ctx.elapsed()
        return {"context": context, "summary": summary, "audio": audio, "timings": timings}

    out = await rt.guard(request, ctx, work())
    if as_wav:
        return wav_response(out["audio"].wav, out["summary"])
    context = out["context"]
    facts: Scene = context.scene or Scene(width=context.facts.width, height=context.facts.height,
                                          errors={"perception": "unavailable"})  # fmt: skip
    return SceneResponse(
        summary=out["summary"],
        **facts.model_dump(include=SCENE_FIELDS),
        text=context.text,
        image=context.facts.as_dict(),
        perception_ms=facts.timings_ms,
        timings=rounded(out["timings"]),
        audio=audio_json(out["audio"]) if out["audio"] else None,
    )
