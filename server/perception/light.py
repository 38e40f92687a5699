"""How bright the photo is and where the light is, from luminance alone (no model).

Why: a blind user cannot tell whether a room's light is on, where the window is, or whether a photo
is too dark to say anything about. The mean luminance gives the level; a 3x3 grid of mean luminance
says which part of the view is brightest, which points at a window or a lamp. When the grid is
nearly even, no direction is claimed.
"""

from __future__ import annotations

import cv2
import numpy as np

from .facts import Light

DARK_BELOW = 50.0  # mean luminance 0..255
DIM_BELOW = 100.0
EVEN_WITHIN = 12.0  # brightest cell minus mean of all cells below this: evenly lit
GRID_NAMES = (
    ("top left", "top", "top right"),
    ("left", "centre", "right"),
    ("bottom left", "bottom", "bottom right"),
)


def measure_light(rgb: np.ndarray) -> Light:
    """Light level and brightest part of an RGB uint8 photo."""
    gray = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
    mean = float(gray.mean()) if gray.size else 0.0
    level = "dark" if mean < DARK_BELOW else "dim" if mean < DIM_BELOW else "bright"
    grid = cv2.resize(gray.astype(np.float32), (3, 3), interpolation=cv2.INTER_AREA)
    r, c = np.unravel_index(int(np.argmax(grid)), grid.shape)
    brightest = GRID_NAMES[r][c] if grid[r, c] - float(grid.mean()) >= EVEN_WITHIN else None
    return Light(level=level, mean=round(mean, 1), brightest=brightest)
