"""Stopping a quantization run right after its first decoder layer, as a crash would."""

from __future__ import annotations

from typing import Any

import pytest

from quantizer.pipeline import quantize_model


class Interrupt(Exception):
    pass


def _stop_after_first(index: int, total: int, reports: list) -> None:
    if index == 0:
        raise Interrupt


def quantize_until_first_layer(*args: Any, **kwargs: Any) -> None:
    """`quantize_model(*args, **kwargs)`, interrupted once layer 0 is finished (and stored)."""
    with pytest.raises(Interrupt):
        quantize_model(*args, on_layer=_stop_after_first, **kwargs)
