"""Single-instance Hessians on disk, between the streaming pass(es) and the layer-by-layer pass.

A whole model's Hessians can outweigh the model (SmolLM2-135M: about 400 MB in float32 against
540 MB of weights; a 7B LLaMA: about 22 GB). With a budget (`CalibrationConfig.hessian_budget_mib`)
pass 1 streams the calibration windows once per run of consecutive layers whose Hessians fit,
writes each run's Hessians here, and pass 2 reads back one layer's at a time. Only one batch is
resident throughout; the price is one partial forward per extra pass.

Files are written atomically (temporary name, then rename). Under a resumable run's state
directory a layer whose Hessians are already stored is not streamed again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .capture import GroupHessians
from .hessian import HessianAccumulator

BYTES_PER_ENTRY = 4  # float32 accumulators


def hessian_bytes(layer: nn.Module, groups: Sequence[Sequence[str]]) -> int:
    """An upper bound on one decoder layer's Hessian memory: one `in x in` matrix per linear.

    Members fed the same input share one matrix, but which do is only known once inputs flow,
    so the bound counts each member; a budget planned with it is never exceeded.
    """
    return sum(layer.get_submodule(n).in_features ** 2 * BYTES_PER_ENTRY for group in groups for n in group)


def plan_passes(sizes: dict[int, int], budget_bytes: int) -> list[list[int]]:
    """Split the layers (index -> Hessian bytes, in model order) into runs that fit the budget.

    A layer larger than the budget on its own still gets a pass of its own (and a clear
    message from the caller); nothing is skipped.
    """
    passes: list[list[int]] = []
    used = 0
    for index, size in sizes.items():
        if passes and used + size <= budget_bytes:
            passes[-1].append(index)
            used += size
        else:
            passes.append([index])
            used = size
    return passes


class HessianStore:
    """One safetensors file per decoder layer: every group's distinct Hessians plus who shares them."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.dir / f"hessians_{index:04d}.safetensors"

    def has(self, index: int) -> bool:
        return self._path(index).exists()

    def drop(self, index: int) -> None:
        """Forget layer `index`'s Hessians (its quantized weights are stored by then)."""
        self._path(index).unlink(missing_ok=True)

    def save(self, index: int, groups: Sequence[GroupHessians]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        layout = []
        for g, group in enumerate(groups):
            for owner, acc in group.hessians.items():
                tensors[f"{g}.{owner}"] = acc.H.detach().to("cpu").contiguous()
            layout.append(
                {"share": group.share, "nsamples": {owner: acc.nsamples for owner, acc in group.hessians.items()}}
            )
        path = self._path(index)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"groups": json.dumps(layout)})
        os.replace(tmp, path)

    def load(self, index: int, groups: Sequence[GroupHessians]) -> None:
        """Fill `groups` (same order as when saved) with layer `index`'s stored Hessians."""
        path = self._path(index)
        try:
            with safe_open(str(path), framework="pt") as f:
                layout = json.loads((f.metadata() or {})["groups"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"stored Hessians {path} are unreadable ({e}); delete the file to recompute them") from e
        if len(layout) != len(groups):
            raise ValueError(f"stored Hessians {path} hold {len(layout)} linear groups, the layer has {len(groups)}")
        for g, (group, entry) in enumerate(zip(groups, layout, strict=True)):
            group.share = dict(entry["share"])
            group.hessians = {
                owner: HessianAccumulator.restored(tensors[f"{g}.{owner}"], int(n))
                for owner, n in entry["nsamples"].items()
            }
