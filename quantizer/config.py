"""Typed configuration of one quantization run.

Every switch of the algorithm is a field here, so that benchmarks can turn each piece of RPIQ
on and off and show what it buys. The models are frozen pydantic models: invalid values fail
at construction with a `ValueError` (pydantic's `ValidationError` subclasses it) that names
the field, instead of surfacing later as a shape error deep inside a matmul.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SUPPORTED_BITS = (2, 3, 4, 8)

Method = Literal["rtn", "gptq", "rpiq"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GridConfig(_Frozen):
    """The integer grid: b-bit codes, one (scale, zero) pair per output row and column group."""

    bits: int = 4
    group_size: int = Field(128, description="columns sharing one scale/zero; -1 = one per output row")
    sym: bool = Field(False, description="symmetric grid (zero fixed at mid-range) instead of asymmetric")
    fp16_scales: bool = Field(
        True,
        description="round scales to float16 before quantizing, so the fp16 scales a GPTQ checkpoint "
        "stores reproduce the in-memory weights bit for bit",
    )
    min_zero: int = Field(
        0,
        ge=0,
        le=1,
        description="smallest allowed zero point; 1 keeps asymmetric zeros representable in the legacy "
        "GPTQ v1 checkpoint form, which stores zero-1",
    )

    @field_validator("bits")
    @classmethod
    def _bits_supported(cls, v: int) -> int:
        if v not in SUPPORTED_BITS:
            raise ValueError(f"bits={v} is not supported; choose one of {SUPPORTED_BITS}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size_valid(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"group_size={v} is invalid; use -1 (per output channel) or a positive size")
        return v

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


class GPTQConfig(_Frozen):
    """Stage 1: GPTQ (Frantar et al. 2022) with lazy block updates."""

    block_size: int = Field(128, ge=1, description="columns per lazy-update block (B)")
    percdamp: float = Field(0.01, ge=0.0, description="damping as a fraction of mean(diag H)")
    act_order: bool = Field(False, description="quantize columns by descending diag(H); keeps g_idx")
    static_groups: bool = Field(
        False, description="with act_order: fix every group's grid up front from the unpermuted weights"
    )
    compensation_percdamp: float = Field(
        1.0,
        ge=0.0,
        description="with compensation (`CalibrationConfig.compensate`): ridge of the least-squares target "
        "W* = (W C + l W)(H + l I)^-1, l = this x mean(diag H); larger pulls the target towards W. "
        "1.0 measured best of 0.01/0.1/1.0 on both real models (README, evidence report): with 0.01 the "
        "target overfits the calibration tokens (Gemma-3-270M got worse than plain GPTQ)",
    )


class RefineConfig(_Frozen):
    """Stage 2: multi-round Gauss-Seidel residual-projected block refinement (the RPIQ part).

    Defaults were chosen by `benchmarks/layer_loss.py` on the embedded model's real layers
    (see README, "Choosing the stage-2 defaults").
    """

    rounds: int = Field(4, ge=0, description="maximum Gauss-Seidel sweeps over all blocks (R)")
    alpha: float = Field(1.0, gt=0.0, le=2.0, description="step toward the block optimum; 1 = exact")
    block_size: int | None = Field(None, ge=1, description="columns per refinement block; None = stage 1's block size")
    accept: Literal["row", "block", "always"] = Field(
        "row",
        description="closed-loop acceptance: keep a row's (or the whole block's) new codes only if its "
        "loss decreased; 'always' disables the closed loop (for ablations)",
    )
    backtrack: int = Field(0, ge=0, description="after a rejected step, retry with alpha halved up to this many times")
    percdamp: float = Field(
        0.0,
        ge=0.0,
        description="ridge on the stage-2 objective, as a fraction of mean(diag H): accept and step on "
        "tr(E (H + lambda I) E^T); 0 = the undamped layer loss",
    )
    tol: float = Field(1e-4, ge=0.0, description="stop early when a round lowers the loss by less than this")
    instance_weight: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="single-instance calibration: weight w of the kept batch's real output error in the "
        "stage-2 objective (1-w) tr(E H E^T) + w 2/n ||Y - Xq Wq^T||^2; 1 = the batch alone, 0 = Hessian only. "
        "Chosen by measurement on the embedded model (README, single-instance)",
    )
    refit_grid: bool = Field(
        False, description="re-fit each group's scale/zero to the refinement target before re-quantizing"
    )


class QuantConfig(_Frozen):
    """One verb, one config: what `quantize_weight` does to a layer."""

    method: Method = "rpiq"
    grid: GridConfig = GridConfig()
    gptq: GPTQConfig = GPTQConfig()
    refine: RefineConfig = RefineConfig()
