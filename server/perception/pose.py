"""Whether the largest person faces the camera, from MoveNet Lightning body keypoints.

Why only this: a blind user wants to know if the person in front is turned towards them (to start
talking, or to know they are being addressed). Keypoints say that from geometry alone: a person who
faces the camera shows both eyes, with their left eye on the *right* of the photo (a mirror image),
and their left shoulder on the right too. Nothing else is inferred: no identity, age, gender or
expression, which a camera cannot know and a user did not ask a machine to guess.

MoveNet is a single-person model, so it runs on a square crop around the largest person the detector
found; on a whole photo with several people it would mix their joints.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .facts import Box, Facing
from .runtime import Lazy, model_files, tflite_interpreter

INPUT = 192
KEYPOINT_MIN_SCORE = 0.3
NOSE, LEFT_EYE, RIGHT_EYE, LEFT_EAR, RIGHT_EAR, LEFT_SHOULDER, RIGHT_SHOULDER = range(7)

_pose = Lazy(lambda: tflite_interpreter(str(model_files().pose)))


def square_crop(image: Image.Image, box: Box, margin: float = 0.15) -> Image.Image:
    """The box widened by ``margin`` and made square (padding outside the photo is black)."""
    w, h = image.size
    x1, y1, x2, y2 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    left, top = round(cx - side / 2.0), round(cy - side / 2.0)
    size = max(1, round(side))
    return image.crop((left, top, left + size, top + size))


def keypoints(crop: Image.Image) -> np.ndarray:
    """17 rows ``[y, x, score]`` (normalised to the crop) for the person in a square RGB crop."""
    interpreter = _pose.get()
    x = np.asarray(crop.convert("RGB").resize((INPUT, INPUT), Image.Resampling.BILINEAR), dtype=np.uint8)[None]
    with _pose.lock:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    return np.asarray(out, dtype=np.float32).reshape(17, 3)


def facing_from_keypoints(kp: np.ndarray, min_score: float = KEYPOINT_MIN_SCORE) -> Facing:
    """Judge facing from keypoint visibility and left-right order (see the module docstring).

    Towards the camera: both eyes seen, the person's left eye to the right of their right eye, and
    the shoulders (when both are seen) in the same mirrored order. Away: both shoulders seen in the
    unmirrored order, or shoulders seen while neither eye nor the nose is. Anything else: unknown.
    """
    seen = kp[:, 2] >= min_score
    x = kp[:, 1]
    shoulders = bool(seen[LEFT_SHOULDER] and seen[RIGHT_SHOULDER])
    shoulders_mirrored = shoulders and x[LEFT_SHOULDER] > x[RIGHT_SHOULDER]
    if seen[LEFT_EYE] and seen[RIGHT_EYE] and x[LEFT_EYE] > x[RIGHT_EYE] and (not shoulders or shoulders_mirrored):
        return "towards the camera"
    face_seen = bool(seen[NOSE] or seen[LEFT_EYE] or seen[RIGHT_EYE])
    if shoulders and (not shoulders_mirrored or not face_seen):
        return "away from the camera"
    return "unknown"


def person_facing(image: Image.Image, box: Box) -> Facing:
    """Facing of the person inside ``box`` (normalised) of an RGB photo."""
    return facing_from_keypoints(keypoints(square_crop(image, box)))
