"""Facing from keypoint geometry (no model): mirrored left-right order means facing the camera."""

from __future__ import annotations

import numpy as np
from PIL import Image

from server.perception.pose import facing_from_keypoints, square_crop


def keypoints(**points: tuple[float, float]) -> np.ndarray:
    """17 keypoints, all unseen except the named ones (name -> (x, score))."""
    index = {"nose": 0, "left_eye": 1, "right_eye": 2, "left_shoulder": 5, "right_shoulder": 6}
    kp = np.zeros((17, 3), dtype=np.float32)
    for name, (x, score) in points.items():
        kp[index[name]] = (0.5, x, score)
    return kp


def test_mirrored_eyes_and_shoulders_face_the_camera() -> None:
    kp = keypoints(nose=(0.5, 0.9), left_eye=(0.55, 0.9), right_eye=(0.45, 0.9),
                   left_shoulder=(0.8, 0.8), right_shoulder=(0.2, 0.8))  # fmt: skip
    assert facing_from_keypoints(kp) == "towards the camera"


def test_shoulders_without_a_face_or_in_unmirrored_order_face_away() -> None:
    shoulders_only = keypoints(left_shoulder=(0.8, 0.8), right_shoulder=(0.2, 0.8))
    assert facing_from_keypoints(shoulders_only) == "away from the camera"
    assert facing_from_keypoints(keypoints(left_shoulder=(0.2, 0.8), right_shoulder=(0.8, 0.8), nose=(0.5, 0.5))) == (
        "away from the camera"
    )


def test_too_little_evidence_is_unknown() -> None:
    assert facing_from_keypoints(keypoints(left_eye=(0.55, 0.9))) == "unknown"
    assert facing_from_keypoints(keypoints(left_eye=(0.55, 0.1), right_eye=(0.45, 0.1))) == "unknown"


def test_square_crop_pads_outside_the_photo() -> None:
    crop = square_crop(Image.new("RGB", (200, 100)), (0.0, 0.0, 0.5, 1.0), margin=0.0)
    assert crop.size == (100, 100)
