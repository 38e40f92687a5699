"""Streaming accumulation of a linear layer's Hessian `H = 2/N * X^T X`.

Calibration inputs arrive batch by batch (only one batch is ever resident), so `H` is kept as a
running mean: each update rescales the old estimate by `n/(n+m)` before adding the new batch's
`2/(n+m) * X^T X`. The entries therefore stay O(|x|^2) however many tokens are seen, instead of
growing with N as a plain sum would, which keeps float32 accumulation accurate; float64 is
available for very long runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class HessianAccumulator:
    """Running `2/N * X^T X` over every token fed to `add`."""

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float32, device: str | None = None):
        """`device` is where `H` lives. Inputs on another device (a GPU, with `H` in host memory)
        are multiplied out where they are and only the [in, in] product travels, so a whole
        model's Hessians can be accumulated off the accelerator (single-instance offload)."""
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.nsamples = 0

    @classmethod
    def restored(cls, H: torch.Tensor, nsamples: int) -> HessianAccumulator:
        """An accumulator holding a finished running mean (read back from disk)."""
        acc = cls.__new__(cls)
        acc.H, acc.nsamples = H, nsamples
        return acc

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Fold in a batch of inputs `x` [..., in_features] (one row per token).

        With `y` (the same tokens' inputs from another stream, same shape) the running mean is
        the cross term `2/N X^T Y` instead: upstream compensation pairs the full-precision
        model's inputs `X` with the partly quantized model's `Y` (see `quantizer.layer`).
        """
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] != self.H.shape[0]:
            raise ValueError(f"input has {x.shape[-1]} features, Hessian expects {self.H.shape[0]}")
        if y is not None and y.numel() != x.numel():
            raise ValueError(f"paired inputs differ in shape: {tuple(x.shape)} and {tuple(y.shape)}")
        m = x.shape[0]
        if m == 0:
            return
        total = self.nsamples + m
        self.H.mul_(self.nsamples / total)
        scale = (2.0 / total) ** 0.5
        x = x.to(dtype=self.H.dtype) * scale
        other = x if y is None else y.reshape(-1, x.shape[-1]).to(device=x.device, dtype=x.dtype) * scale
        if x.device == self.H.device:
            self.H.addmm_(x.t(), other)
        else:  # offloaded: the product is formed where the inputs are, only [in, in] is copied
            self.H.add_((x.t() @ other).to(self.H.device))
        self.nsamples = total


@dataclass
class PreparedHessian:
    """A damped, dead-column-safe Hessian ready for inversion, plus what was done to it."""

    H: torch.Tensor  # [in, in] float32, damped
    dead: torch.Tensor  # [in] bool: inputs never active in calibration
    damp: float


def prepare_hessian(H: torch.Tensor, percdamp: float) -> PreparedHessian:
    """Dead inputs get `H_ii = 1` (their weights are zeroed by the caller); then `+ lambda I`."""
    H = H.detach().to(torch.float32).clone()
    if not torch.isfinite(H).all():
        raise ValueError("Hessian contains NaN or Inf; the calibration activations overflowed")
    diag = torch.diagonal(H)
    dead = diag == 0
    H[dead, dead] = 1.0
    damp = percdamp * float(torch.mean(torch.diagonal(H)))
    H.diagonal().add_(damp)
    return PreparedHessian(H=H, dead=dead, damp=damp)


def _extra_damping(H: torch.Tensor):
    """0, then 1 % of mean(diag H), then 10x more each time: what a near-singular `H` gets added."""
    mean_diag = float(torch.mean(torch.diagonal(H)))
    extra = 0.0
    for _ in range(8):
        yield extra
        extra = mean_diag * 0.01 if extra == 0.0 else 10.0 * extra


def cholesky_lower(H: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of `H`, raising the damping step by step if `H` is not numerically
    positive definite (as `inverse_cholesky_upper` does)."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for extra in _extra_damping(H):
        L, info = torch.linalg.cholesky_ex(H if extra == 0.0 else H + extra * eye)
        if int(info) == 0:
            return L
    raise ValueError("Hessian is not positive definite even after extra damping")


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor `U` of `H^-1` (`H^-1 = U^T U`), the GPTQ error-feedback operator.

    If `H` is not numerically positive definite, the damping is raised step by step rather than
    failing: a layer fed with nearly collinear inputs still gets quantized.
    """
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for extra in _extra_damping(H):
        L, info = torch.linalg.cholesky_ex(H if extra == 0.0 else H + extra * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise ValueError("Hessian is not positive definite even after extra damping")
