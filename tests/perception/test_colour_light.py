"""Colour names and light from synthetic images (no models)."""

from __future__ import annotations

import numpy as np
import pytest

from server.perception.colour import centre_region, dominant_colours, name_of
from server.perception.light import measure_light


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (120, 160)) -> np.ndarray:
    return np.full((*size, 3), rgb, dtype=np.uint8)


@pytest.mark.parametrize(
    ("rgb", "name"),
    [((255, 0, 0), "red"), ((0, 160, 0), "green"), ((20, 40, 200), "blue"), ((250, 250, 250), "white"),
     ((10, 10, 10), "black"), ((128, 128, 128), "grey"), ((250, 230, 30), "yellow"), ((120, 70, 30), "brown")],
)  # fmt: skip
def test_solid_colours_are_named(rgb: tuple[int, int, int], name: str) -> None:
    colours = dominant_colours(solid(rgb))
    assert [c.name for c in colours] == [name] and colours[0].share == pytest.approx(1.0)


def test_red_square_on_white_is_red_in_the_centre_and_shares_add_up() -> None:
    img = solid((255, 255, 255), (300, 300))
    img[90:210, 90:210] = (220, 20, 20)
    whole = dominant_colours(img)
    assert [c.name for c in whole] == ["white", "red"]
    assert whole[1].share == pytest.approx(0.16, abs=0.03)
    assert dominant_colours(centre_region(img))[0].name == "red"


def test_name_of_lab_and_tiny_regions() -> None:
    assert dominant_colours(solid((255, 0, 0), (1, 1)))[0].name == "red"
    assert dominant_colours(np.zeros((0, 0, 3), dtype=np.uint8)) == []
    assert name_of(np.array([100.0, 0.0, 0.0], dtype=np.float32)) == "white"


def test_light_levels() -> None:
    assert measure_light(solid((10, 10, 10))).level == "dark"
    assert measure_light(solid((70, 70, 70))).level == "dim"
    bright = measure_light(solid((200, 200, 200)))
    assert bright.level == "bright" and bright.brightest is None  # evenly lit: no direction claimed


@pytest.mark.parametrize(
    ("rows", "cols", "where"),
    [((0, 40), (0, 50), "top left"), ((0, 40), (110, 160), "top right"), ((80, 120), (55, 105), "bottom"),
     ((40, 80), (55, 105), "centre")],
)  # fmt: skip
def test_brightest_part(rows: tuple[int, int], cols: tuple[int, int], where: str) -> None:
    img = solid((60, 60, 60))
    img[rows[0] : rows[1], cols[0] : cols[1]] = 250
    assert measure_light(img).brightest == where
