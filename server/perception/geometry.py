"""Where something is, from the camera's point of view: clock direction, words, nearness.

Why geometry and not a model: a blind user reaches for the cup or turns towards the door. The
horizontal angle of a box centre follows from the pinhole model, ``tan(angle) = (2 * cx - 1) *
tan(hfov / 2)``, given the camera's horizontal field of view (phones: about 60-70 degrees; 66 is
assumed). A clock hour is 30 degrees, so an honest clock direction inside a 66 degree view is 11, 12
or 1 o'clock; "10" or "2 o'clock" would claim 60 degrees, which the camera cannot see. Nearness comes
from how much of the photo the box fills and whether it reaches the bottom edge (the ground just in
front of the camera): no depth is measured, so only three coarse words are said.
"""

from __future__ import annotations

import math

from .facts import Box, Nearness

DEFAULT_HFOV_DEG = 66.0


def horizontal_angle(cx: float, hfov_deg: float = DEFAULT_HFOV_DEG) -> float:
    """Degrees right (+) or left (-) of straight ahead for a normalised horizontal position ``cx``."""
    cx = min(1.0, max(0.0, cx))
    return math.degrees(math.atan((2.0 * cx - 1.0) * math.tan(math.radians(hfov_deg) / 2.0)))


def clock_position(cx: float, hfov_deg: float = DEFAULT_HFOV_DEG) -> str:
    """Clock direction ("12 o'clock" straight ahead, "1 o'clock" right, "11 o'clock" left) of ``cx``."""
    hour = round(horizontal_angle(cx, hfov_deg) / 30.0)
    return f"{(hour - 1) % 12 + 1} o'clock" if hour else "12 o'clock"


def direction_words(cx: float, hfov_deg: float = DEFAULT_HFOV_DEG) -> str:
    """The direction in plain words, finer than the clock: 'straight ahead', 'slightly left', 'on the right'."""
    angle = horizontal_angle(cx, hfov_deg)
    side = "right" if angle > 0 else "left"
    if abs(angle) < 7.5:
        return "straight ahead"
    if abs(angle) < 20.0:
        return f"slightly {side}"
    return f"on the {side}"


def nearness(box: Box) -> Nearness:
    """'close' (fills a fifth of the photo), 'near' (a twentieth, or stands on the bottom edge), else 'far'."""
    x1, y1, x2, y2 = box
    area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    if area >= 0.2:
        return "close"
    if area >= 0.05 or (y2 >= 0.9 and area >= 0.01):
        return "near"
    return "far"


def box_centre_x(box: Box) -> float:
    return (box[0] + box[2]) / 2.0


def box_area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
