"""Loading each model once, lazily and thread-safely, and running it under a small thread budget.

Why: the server shares a few CPU cores with torch; a detector that grabbed every core would stall
the language model. Models load on first use (an idle server pays nothing) and exactly once even when
several requests arrive together. OpenCV nets and TFLite interpreters are not safe to call from two
threads at once, so each model also serialises its own calls.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import cv2

from .assets import ModelFiles, ensure_perception_models

ENV_THREADS = "RPIQ_PERCEPTION_THREADS"
T = TypeVar("T")


def thread_budget() -> int:
    """Threads per model: ``$RPIQ_PERCEPTION_THREADS`` (default 2), at least 1."""
    try:
        return max(1, int(os.environ.get(ENV_THREADS, "2")))
    except ValueError:
        return 2


class Lazy(Generic[T]):
    """A value built on first `get()`, once, under a lock; `lock` also serialises use of the value."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None
        self.lock = threading.Lock()

    def get(self) -> T:
        if self._value is None:
            with self.lock:
                if self._value is None:
                    self._value = self._build()
        return self._value


_files: Lazy[ModelFiles] = Lazy(ensure_perception_models)


def model_files() -> ModelFiles:
    """The model files, fetched once per process (see `assets.ensure_perception_models`)."""
    return _files.get()


def limit_opencv_threads() -> None:
    """Cap OpenCV's worker pool (process-wide) to the perception thread budget."""
    cv2.setNumThreads(thread_budget())


def tflite_interpreter(path: str):  # -> ai_edge_litert.interpreter.Interpreter
    """A TFLite interpreter for ``path`` with tensors allocated and the thread budget applied."""
    from ai_edge_litert.interpreter import Interpreter  # imported late: only when a model is first used

    interpreter = Interpreter(model_path=path, num_threads=thread_budget())
    interpreter.allocate_tensors()
    return interpreter
