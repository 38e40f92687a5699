"""Request and response models: what the OpenAPI schema (/docs, /openapi.json) documents."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .perception.facts import Code, Colour, DetectedObject, Label, Light, Person

LANG_PATTERN = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$"


class SpeechOptions(BaseModel):
    voice: str | None = Field(None, max_length=64, description="espeak-ng voice id, name or language (en, fr, ...)")
    rate: int | None = Field(None, ge=80, le=450, description="words per minute")
    volume: float | None = Field(None, ge=0.0, le=1.0)


class VqaOptions(SpeechOptions):
    """Fields of /v1/vqa (multipart form fields or JSON keys)."""

    question: str = Field(..., min_length=1, max_length=2000, description="what the user asks about the photo")
    speak: bool = Field(False, description="also return speech (base64 WAV in `audio`)")
    stream: bool = Field(False, description="Server-Sent Events: text deltas and per-sentence audio as generated")
    max_tokens: int | None = Field(None, ge=1, description="answer length cap in tokens (server limit applies)")
    length: Literal["short", "medium", "long"] | None = None
    language: str | None = Field(None, pattern=LANG_PATTERN, description="answer language, e.g. en, fr")
    timeout_s: float | None = Field(None, gt=0, description="give up after this long (capped by the server)")


class VqaJson(VqaOptions):
    image: str = Field(..., description="base64 image or data: URI")


class ReadOptions(SpeechOptions):
    speak: bool = False
    cleanup: bool | None = Field(
        None, description="space repair of OCR lines by word segmentation (only inserts spaces, never changes letters)"
    )
    timeout_s: float | None = Field(None, gt=0)


class ReadJson(ReadOptions):
    image: str = Field(..., description="base64 image or data: URI")


class AudioOut(BaseModel):
    format: Literal["wav"] = "wav"
    sample_rate: int
    duration_s: float
    voice: str
    base64: str


class ImageInfo(BaseModel):
    width: int
    height: int
    brightness: float
    contrast: float
    sharpness: float
    warnings: list[str]


class VqaResponse(BaseModel):
    answer: str
    audio: AudioOut | None = None
    timings: dict[str, float]
    model: str
    model_can_see: bool = Field(description="false: the model only knows the OCR text and measured facts")
    text_in_image: str = ""
    image: ImageInfo
    finish_reason: str


class ReadLine(BaseModel):
    text: str
    confidence: float
    box: tuple[float, float, float, float]


class ReadResponse(BaseModel):
    text: str
    lines: list[ReadLine]
    engine: str
    cleaned: bool
    audio: AudioOut | None = None
    timings: dict[str, float]
    model: str
    image: ImageInfo


class SceneOptions(SpeechOptions):
    """Fields of /v1/scene (multipart form fields or JSON keys)."""

    speak: bool = Field(False, description="also return the summary spoken (base64 WAV in `audio`)")
    timeout_s: float | None = Field(None, gt=0, description="give up after this long (capped by the server)")


class SceneJson(SceneOptions):
    image: str = Field(..., description="base64 image or data: URI")


class SceneResponse(BaseModel):
    """What the perception nets and OCR measured in a photo, and one spoken paragraph of it."""

    summary: str = Field(description="one paragraph for a screen reader: quality warnings, objects and where, text")
    objects: list[DetectedObject] = Field(description="detected objects, strongest first (boxes are 0..1 fractions)")
    people: list[Person]
    labels: list[Label] = Field(description="whole-photo guesses, said as 'it looks like'")
    colours: list[Colour] = Field(description="dominant colours of the whole photo")
    centre_colours: list[Colour]
    light: Light | None = None
    codes: list[Code] = Field(description="QR codes and barcodes, decoded")
    blank: bool = Field(description="too small or too flat for the nets: nothing was detected by design")
    text: str = Field("", description="the text in the photo, read by OCR, in reading order")
    image: ImageInfo
    perception_ms: dict[str, float] = Field(description="milliseconds per perception stage (detect, pose, ...)")
    errors: dict[str, str] = Field(default_factory=dict, description="perception stage -> why it reported nothing")
    timings: dict[str, float] = Field(description="seconds: decode_s, ocr_s, perception_s, speech_s, total_s")
    audio: AudioOut | None = None


class SpeakRequest(SpeechOptions):
    text: str = Field(..., min_length=1)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's chat.completions request; fields this server does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stop: str | list[str] | None = None
    language: str | None = Field(None, pattern=LANG_PATTERN, description="rpiq extension: answer language")
    length: Literal["short", "medium", "long"] | None = Field(None, description="rpiq extension")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI's chat.completion object."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rpiq"
    quantized: bool
    can_see: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Voice(BaseModel):
    id: str
    name: str
    languages: list[str]


class VoiceList(BaseModel):
    default: str
    voices: list[Voice]


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
