"""Synthetic linear layers with realistic calibration inputs, shared by the quantizer tests.

Real LLM activations are strongly correlated (a decaying spectrum) and have a few outlier
channels with much larger magnitude; GPTQ's advantage over RTN, and stage 2's over GPTQ, only
show on inputs like that, never on white noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Layer:
    W: torch.Tensor  # [out, in]
    X: torch.Tensor  # [tokens, in]

    @property
    def H(self) -> torch.Tensor:
        return 2.0 / self.X.shape[0] * self.X.t() @ self.X


def realistic_layer(out: int, inp: int, tokens: int = 2048, seed: int = 0, outliers: int = 4) -> Layer:
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g))
    spectrum = torch.exp(-torch.arange(inp, dtype=torch.float32) / (inp / 8))
    X = torch.randn(tokens, inp, generator=g) @ (basis * spectrum) @ basis.t()
    X = X + 0.02 * torch.randn(tokens, inp, generator=g)
    X[:, torch.randperm(inp, generator=g)[:outliers]] *= 20.0
    W = 0.05 * torch.randn(out, inp, generator=g)
    W[: max(1, out // 64)] *= 4.0  # a few rows with larger weights, as in real layers
    return Layer(W=W, X=X)
