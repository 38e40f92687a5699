"""UI tests reuse the server tests' real `rpiq serve` process (tiny model, API key) instead of starting their own."""

from __future__ import annotations

from tests.server.conftest import tiny_model_dir, tiny_server  # noqa: F401 (fixtures, re-exported for tests/ui)
