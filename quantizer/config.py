"""Typed configuration of one quantization run: one config type per method.

    RTNConfig(grid, calibration)
    GPTQMethodConfig(grid, gptq, calibration)
    RPIQConfig(grid, gptq, refine, calibration, ablation)

Each names only the sections its method reads; `method` is the discriminator, so a JSON dump
(`config.model_dump()`, a recipe file) reads back into the right type with `parse_config`, and
`quant_config("gptq", ...)` builds one from a method name. `CalibrationConfig` says how the
calibration data flows through the model; `AblationConfig` holds the switches that only
benchmarks turn, to show what each piece of RPIQ buys.

The models are frozen pydantic models: invalid values fail at construction with a `ValueError`
(pydantic's `ValidationError` subclasses it) that names the field, instead of surfacing later
as a shape error deep inside a matmul.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from gptq_format.weight import SUPPORTED_BITS

Method = Literal["rtn", "gptq", "rpiq"]
CalibMode = Literal["sequential", "single-instance"]


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

    embeddings: Literal["none", "int8"] = Field(
        "none",
        description="also store the token embedding table (and an LM head tied to it) as row-wise symmetric int8 "
        "with one float16 scale per row (gptq_format.embedding), quantized before calibration so the linears "
        "are fitted to the embeddings they will be served with; rpiq's loaders only",
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


class RefineConfig(_Frozen):
    """Stage 2: multi-round Gauss-Seidel residual-projected block refinement (the RPIQ part).

    rounds, alpha and the block size were chosen by `benchmarks/layer_loss.py` on the embedded model's
    real layers (docs/results/history/2026-11-27-quantizer.md, "Choosing the stage-2 defaults"); the
    ridge by held-out perplexity (`benchmarks/stage2_tuning.py`, docs/results/stage2_tuning.md).
    """

    rounds: int = Field(4, ge=0, description="maximum Gauss-Seidel sweeps over all blocks (R)")
    alpha: float = Field(1.0, gt=0.0, le=2.0, description="step toward the block optimum; 1 = exact")
    block_size: int | None = Field(None, ge=1, description="columns per refinement block; None = stage 1's block size")
    percdamp: float = Field(
        1.0,
        ge=0.0,
        description="ridge on the stage-2 objective, as a fraction of mean(diag H): accept and step on "
        "tr(E (H + lambda I) E^T); 0 = the undamped layer loss, the only setting at which stage 2 never ends "
        "above GPTQ's layer loss. 1.0 measured best of 0/0.1/1.0 by held-out perplexity (SmolLM2-135M, 3-bit "
        "g128, sequential + compensation, mean of 3 seeds): prose 56.79 vs 56.67 with stage 2 off (a tie), "
        "code 37.8 vs 71.7; without the ridge stage 2 overfits the calibration text (seed 0: code 88.4). "
        "It raises the calibration layer loss (docs/results/stage2_tuning.md)",
    )
    tol: float = Field(1e-4, ge=0.0, description="stop early when a round lowers the loss by less than this")


class AblationConfig(_Frozen):
    """Stage-2 switches that only benchmarks and tests turn, to measure what each piece buys."""

    accept: Literal["row", "block", "always"] = Field(
        "row",
        description="closed-loop acceptance: keep a row's (or the whole block's) new codes only if its "
        "loss decreased; 'always' disables the closed loop",
    )
    backtrack: int = Field(0, ge=0, description="after a rejected step, retry with alpha halved up to this many times")
    refit_grid: bool = Field(
        False, description="re-fit each group's scale/zero to the refinement target before re-quantizing"
    )


class CalibrationConfig(_Frozen):
    """How the calibration data flows through the model, and what each layer is fitted to."""

    mode: CalibMode = "sequential"
    compensate: bool | None = Field(
        None,
        description="fit every linear to the full-precision model's outputs (full-precision inputs, "
        "full-precision weights) instead of its own weights on the already-degraded inputs, so each layer "
        "compensates what the layers before it got wrong. sequential: on the whole calibration set "
        "(`quantizer.layer.compensation_target`), at the cost of a second resident stream of hidden states "
        "and one extra partial forward per group. single-instance: stage 1 too fits the kept batch's blended "
        "objective (`quantizer.layer.instance_target`), at no memory cost (stage 2 always does). "
        "None = on for RPIQ (its closed loop across layers), off for GPTQ (GPTQ-classic)",
    )
    compensation_percdamp: float = Field(
        1.0,
        ge=0.0,
        description="with compensation: ridge of the least-squares target "
        "W* = (W C + l W)(H + l I)^-1, l = this x mean(diag H); larger pulls the target towards W. "
        "1.0 measured best of 0.01/0.1/1.0 on both real models (docs/results/report.md): with 0.01 the "
        "target overfits the calibration tokens (Gemma-3-270M got worse than plain GPTQ)",
    )
    instance_windows: int = Field(
        4,
        ge=1,
        description="single-instance: calibration windows kept as the resident batch that drives stage 2 "
        "(measured on the embedded model: 1 window overfits, 4 help; docs/results/history/2026-11-27-quantizer.md)",
    )
    instance_weight: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="single-instance: weight w of the kept batch's real output error in the "
        "stage-2 objective (1-w) tr(E H E^T) + w 2/n ||Y - Xq Wq^T||^2; 1 = the batch alone, 0 = Hessian only. "
        "Chosen by measurement on the embedded model (docs/results/history/2026-11-27-quantizer.md, single-instance)",
    )
    offload_hessians: bool = Field(
        False,
        description="single-instance: keep every linear's running Hessian, and every decoder layer outside "
        "its own forward, in host memory. Each batch's X^T X is still formed on the device and only that "
        "[in, in] product is copied; each layer's weights are copied in for its forward (once per window "
        "in pass 1), so the device holds the embeddings, one layer and one batch",
    )
    hessian_budget_mib: float | None = Field(
        None,
        gt=0,
        description="single-instance: the most Hessian memory (MiB) held at once. Pass 1 then streams the "
        "calibration windows once per run of consecutive layers whose Hessians fit, stores each run's Hessians "
        "on disk (the resume state directory, else a temporary one), and pass 2 reads one layer's at a time. "
        "Still one batch resident; costs one partial forward per extra pass. None = every layer's Hessians in "
        "memory from a single pass",
    )

    @model_validator(mode="after")
    def _options_fit_the_mode(self) -> CalibrationConfig:
        for option in ("offload_hessians", "hessian_budget_mib"):
            if getattr(self, option) not in (None, False) and self.mode != "single-instance":
                raise ValueError(
                    f"{option} applies to single-instance calibration, the mode that holds every "
                    "layer's Hessians at once; sequential holds one layer's"
                )
        return self


class RTNConfig(_Frozen):
    """Round-to-nearest on each group's min/max grid: the baseline every method must beat."""

    method: Literal["rtn"] = "rtn"
    grid: GridConfig = GridConfig()
    calibration: CalibrationConfig = CalibrationConfig()

    @property
    def gptq(self) -> GPTQConfig:
        """RTN runs no GPTQ; the stage-1 defaults stand in where a reader asks (the Hessian's damping
        when fitting a compensation target, the checkpoint's `damp_percent`)."""
        return GPTQConfig()

    @property
    def compensate(self) -> bool:
        return bool(self.calibration.compensate)


class GPTQMethodConfig(_Frozen):
    """GPTQ alone (stage 1); compensation is off unless `calibration.compensate` turns it on."""

    method: Literal["gptq"] = "gptq"
    grid: GridConfig = GridConfig()
    gptq: GPTQConfig = GPTQConfig()
    calibration: CalibrationConfig = CalibrationConfig()

    @property
    def compensate(self) -> bool:
        return bool(self.calibration.compensate)


class RPIQConfig(_Frozen):
    """GPTQ, then the Gauss-Seidel refinement; compensation is on unless `calibration.compensate` is False."""

    method: Literal["rpiq"] = "rpiq"
    grid: GridConfig = GridConfig()
    gptq: GPTQConfig = GPTQConfig()
    refine: RefineConfig = RefineConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    ablation: AblationConfig = AblationConfig()

    @property
    def compensate(self) -> bool:
        return self.calibration.compensate is not False


QuantConfig = Annotated[RTNConfig | GPTQMethodConfig | RPIQConfig, Field(discriminator="method")]
"""Any method's config; `config.method` says which."""

METHOD_CONFIGS: dict[str, type[RTNConfig | GPTQMethodConfig | RPIQConfig]] = {
    "rtn": RTNConfig,
    "gptq": GPTQMethodConfig,
    "rpiq": RPIQConfig,
}
_QUANT_CONFIG: TypeAdapter[RTNConfig | GPTQMethodConfig | RPIQConfig] = TypeAdapter(QuantConfig)


def quant_config(method: str = "rpiq", **sections: Any) -> RTNConfig | GPTQMethodConfig | RPIQConfig:
    """`method`'s config with the given sections, e.g. `quant_config("gptq", grid=GridConfig(bits=3))`.

    Sections the method does not read (`refine` for gptq, `gptq` for rtn) are left out, so one
    call serves a sweep over methods; a section name no method knows is still an error.
    """
    if method not in METHOD_CONFIGS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHOD_CONFIGS)}")
    cls = METHOD_CONFIGS[method]
    unknown = set(sections) - set(RPIQConfig.model_fields)
    if unknown:
        raise ValueError(f"unknown config sections: {', '.join(sorted(unknown))}")
    return cls(**{k: v for k, v in sections.items() if k in cls.model_fields})


def parse_config(data: dict[str, Any]) -> RTNConfig | GPTQMethodConfig | RPIQConfig:
    """A config from its JSON form (`config.model_dump()`, a recipe file); `method` defaults to rpiq."""
    return _QUANT_CONFIG.validate_python({"method": "rpiq", **data})
