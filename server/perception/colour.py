"""Dominant colours of the photo and of its centre, named from a small table (no model).

Why: "what colour is this shirt?" is among the commonest questions blind users ask, and colour is
measurable. Pixels are clustered with k-means in CIE Lab (a perceptual space: equal distances look
equally different), each cluster centre gets the name of the nearest prototype in `NAMED_COLOURS`
(several prototypes per name cover light and dark shades), and clusters with the same name are
merged. Only names covering a real share of the region are said.
"""

from __future__ import annotations

import cv2
import numpy as np

from .facts import Colour

NAMED_COLOURS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "black": ((0, 0, 0), (35, 35, 35)),
    "grey": ((128, 128, 128), (85, 85, 85), (175, 175, 175), (110, 115, 120)),
    "white": ((255, 255, 255), (225, 225, 220)),
    "red": ((210, 30, 30), (150, 20, 25), (240, 60, 50), (255, 0, 0)),
    "orange": ((245, 130, 30), (215, 105, 40)),
    "yellow": ((245, 220, 40), (225, 205, 90), (255, 255, 0)),
    "green": ((40, 160, 50), (30, 90, 40), (130, 195, 90), (0, 255, 0)),
    "blue": ((30, 80, 200), (20, 35, 110), (110, 160, 230), (0, 0, 255)),
    "purple": ((120, 50, 160), (75, 30, 95), (180, 130, 210)),
    "pink": ((245, 160, 190), (225, 80, 150), (255, 0, 255)),
    "brown": ((125, 75, 35), (155, 105, 65), (90, 60, 40), (60, 40, 25)),
    "beige": ((225, 205, 165), (200, 180, 140)),
}  # fmt: skip
"""Spoken colour names and RGB prototypes of each (several shades per name)."""

SAMPLE_SIDE = 96  # colour needs no detail: 96x96 pixels are plenty and keep k-means at a few ms
CLUSTERS = 5
MIN_SHARE = 0.12


def _lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (N, 3) -> float32 Lab (N, 3), L 0..100."""
    lab = cv2.cvtColor(rgb.reshape(-1, 1, 3).astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    return lab.reshape(-1, 3)


_PROTO_NAMES = [name for name, protos in NAMED_COLOURS.items() for _ in protos]
_PROTO_LAB = _lab(np.array([p for protos in NAMED_COLOURS.values() for p in protos], dtype=np.uint8))


def name_of(lab: np.ndarray) -> str:
    """The table name nearest to one Lab colour."""
    return _PROTO_NAMES[int(np.argmin(np.linalg.norm(_PROTO_LAB - lab[None, :], axis=1)))]


def dominant_colours(rgb: np.ndarray, clusters: int = CLUSTERS, min_share: float = MIN_SHARE) -> list[Colour]:
    """Named colours covering at least ``min_share`` of an RGB uint8 region, largest share first."""
    if rgb.size == 0:
        return []
    h, w = rgb.shape[:2]
    scale = min(1.0, SAMPLE_SIDE / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    lab = _lab(np.ascontiguousarray(rgb[..., :3]))
    k = min(clusters, len(np.unique(lab.round(1), axis=0)))
    if k <= 1:
        centres, counts = lab.mean(axis=0, keepdims=True), np.array([len(lab)])
    else:
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
        cv2.setRNGSeed(0)  # the same photo always gets the same answer
        _, assign, centres = cv2.kmeans(lab, k, None, criteria, 2, cv2.KMEANS_PP_CENTERS)
        counts = np.bincount(assign.reshape(-1), minlength=k)
    shares: dict[str, float] = {}
    for centre, count in zip(centres, counts, strict=True):
        name = name_of(centre)
        shares[name] = shares.get(name, 0.0) + float(count) / len(lab)
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    return [Colour(name=n, share=round(s, 3)) for n, s in ranked if s >= min_share]


def centre_region(rgb: np.ndarray, fraction: float = 0.4) -> np.ndarray:
    """The middle ``fraction`` of the width and height: where a user points the camera at a thing."""
    h, w = rgb.shape[:2]
    dy, dx = int(h * (1 - fraction) / 2), int(w * (1 - fraction) / 2)
    return rgb[dy : h - dy or h, dx : w - dx or w]
