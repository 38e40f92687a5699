"""Clock directions, words and nearness from normalised box coordinates (no models)."""

from __future__ import annotations

import pytest

from server.perception.geometry import clock_position, direction_words, horizontal_angle, nearness


@pytest.mark.parametrize(
    ("cx", "clock"),
    [(0.5, "12 o'clock"), (0.45, "12 o'clock"), (0.62, "12 o'clock"), (0.8, "1 o'clock"), (1.0, "1 o'clock"),
     (0.2, "11 o'clock"), (0.0, "11 o'clock")],
)  # fmt: skip
def test_clock_position_inside_a_66_degree_view(cx: float, clock: str) -> None:
    assert clock_position(cx) == clock


def test_clock_position_with_a_wide_lens_reaches_two_and_ten() -> None:
    # A 140-degree view puts the edges at 70 degrees: past 60, i.e. 2 and 10 o'clock.
    assert clock_position(1.0, hfov_deg=140) == "2 o'clock"
    assert clock_position(0.0, hfov_deg=140) == "10 o'clock"


def test_horizontal_angle_is_the_pinhole_angle() -> None:
    assert horizontal_angle(0.5) == pytest.approx(0.0)
    assert horizontal_angle(1.0) == pytest.approx(33.0)
    assert horizontal_angle(0.0) == pytest.approx(-33.0)
    assert horizontal_angle(2.0) == pytest.approx(33.0)  # clipped to the photo


def test_direction_words() -> None:
    assert direction_words(0.52) == "straight ahead"
    assert direction_words(0.7) == "slightly right"
    assert direction_words(0.05) == "on the left"


def test_nearness_from_area_and_bottom_edge() -> None:
    assert nearness((0.1, 0.0, 0.9, 1.0)) == "close"
    assert nearness((0.4, 0.4, 0.7, 0.7)) == "near"  # 9% of the photo
    assert nearness((0.45, 0.85, 0.55, 0.98)) == "near"  # small but standing on the bottom edge
    assert nearness((0.45, 0.3, 0.5, 0.35)) == "far"
