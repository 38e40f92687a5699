"""What quantizing one linear layer reports: its loss after each step and where the time went.

The codes themselves are a `gptq_format.QuantizedWeight`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerReport:
    """Layer loss `tr(E H E^T)` after each step, and where the time went."""

    name: str = ""
    shape: tuple[int, int] = (0, 0)
    method: str = ""
    loss_rtn: float = float("nan")
    loss_gptq: float = float("nan")
    loss_refined: float = float("nan")  # after stage 2
    # What drove stage 2, after each round: the layer loss itself, or with the single-instance
    # residual the loss plus the upstream-error term.
    objective_rounds: list[float] = field(default_factory=list)
    accepted_rounds: list[float] = field(default_factory=list)  # fraction of rows changed per round
    time_gptq_s: float = 0.0
    time_refine_s: float = 0.0

    @property
    def loss_final(self) -> float:
        if self.loss_refined == self.loss_refined:  # not NaN
            return self.loss_refined
        return self.loss_gptq if self.method != "rtn" else self.loss_rtn

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "method": self.method,
            "loss_rtn": self.loss_rtn,
            "loss_gptq": self.loss_gptq,
            "loss_refined": self.loss_refined,
            "objective_rounds": self.objective_rounds,
            "loss_final": self.loss_final,
            "accepted_rounds": self.accepted_rounds,
            "time_gptq_s": self.time_gptq_s,
            "time_refine_s": self.time_refine_s,
        }
