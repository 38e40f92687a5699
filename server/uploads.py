"""Reading an image request: multipart (what a phone app sends) or JSON with base64 (what scripts send).

The body is read with a byte limit before anything is parsed, and multipart files are kept in
memory (Starlette would spool parts over 1 MB to a temporary file: camera frames must not touch the
disk). Both forms end as the same pydantic options model, so validation and its 422 reasons are shared.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import AsyncGenerator
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.formparsers import MultiPartException, MultiPartParser

from .errors import ApiError, validation_error

M = TypeVar("M", bound=BaseModel)
IMAGE_FIELDS = ("image", "file")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,", re.I)


class InMemoryMultiPartParser(MultiPartParser):
    spool_max_size = 1 << 62  # never roll over to a temporary file


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"The request body is {declared} bytes; the limit is {limit}.")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(413, "body_too_large", f"The request body exceeds {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_base64_image(value: str) -> bytes:
    """Raw base64 or a data URI (``data:image/jpeg;base64,...``) -> bytes; 400 when it is neither."""
    value = value.strip()
    if value.startswith(("http://", "https://")):
        raise ApiError(
            400, "remote_image", "Images must be sent inline (base64 or a data: URI); this server is offline."
        )
    m = _DATA_URI.match(value)
    if m:
        value = value[m.end() :]
    elif value.startswith("data:"):
        raise ApiError(400, "bad_data_uri", "Only base64 data: URIs are accepted.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", "The image is not valid base64.") from None


def _validate(model: type[M], data: dict) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


async def _once(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def parse_image_request(request: Request, model: type[M], max_image_bytes: int) -> tuple[bytes, M]:
    """(image bytes, validated options) from a multipart or JSON request; 4xx with a reason otherwise."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        body = await read_body(request, max_image_bytes + 256 * 1024)
        parser = InMemoryMultiPartParser(request.headers, _once(body), max_files=1, max_fields=32,
                                         max_part_size=64 * 1024)  # fmt: skip
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise ApiError(400, "bad_multipart", f"The multipart body could not be parsed: {e.message}") from None
        image, fields = None, {}
        for key, value in form.multi_items():
            if key in IMAGE_FIELDS and not isinstance(value, str):
                image = await value.read()
                await value.close()
            elif isinstance(value, str):
                fields[key] = value
        if image is None:
            raise ApiError(422, "missing_image", "Send the photo as a multipart file field named 'image'.")
        return image, _validate(model, fields)
    if ctype.startswith("application/json") or ctype == "":
        body = await read_body(request, max_image_bytes * 4 // 3 + 256 * 1024)
        if not body:
            raise ApiError(422, "missing_body", "Send JSON with 'image' (base64) or a multipart form.")
        try:
            import json

            data = json.loads(body)
        except ValueError:
            raise ApiError(400, "bad_json", "The body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise ApiError(422, "invalid_request", "The JSON body must be an object.")
        image = data.pop("image", None)
        if image is None:
            raise ApiError(422, "missing_image", "JSON requests need 'image': base64 or a data: URI.")
        if not isinstance(image, str):
            raise ApiError(422, "invalid_request", "'image' must be a base64 string.")
        return decode_base64_image(image), _validate(model, data)
    raise ApiError(
        415, "unsupported_content_type",
        f"Content-Type {ctype.split(';')[0]!r} is not accepted; use multipart/form-data or application/json.",
    )  # fmt: skip
