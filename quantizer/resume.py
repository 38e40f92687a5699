"""Per-layer state on disk, so that an interrupted quantization resumes where it stopped.

After each decoder layer the layer's quantized weights and reports are written (atomically)
to `STATE/layer_NNNN.pt`. `STATE/run.json` holds a fingerprint of everything that determines
the result (model, config, calibration tokens); state from a different run is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gptq_format import QuantizedWeight

from .result import LayerReport


def fingerprint(**parts: Any) -> str:
    h = hashlib.sha256()
    for key in sorted(parts):
        value = parts[key]
        if isinstance(value, torch.Tensor):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps({key: value}, sort_keys=True, default=str).encode())
    return h.hexdigest()


class RunState:
    """The on-disk progress of one quantization run."""

    def __init__(self, directory: Path, run_fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = run_fingerprint
        marker = self.dir / "run.json"
        if marker.exists():
            stored = json.loads(marker.read_text()).get("fingerprint")
            if stored != run_fingerprint:
                # A different model/config/calibration: the old layers are not ours to reuse.
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            marker.write_text(json.dumps({"fingerprint": run_fingerprint}))

    def _path(self, index: int) -> Path:
        return self.dir / f"layer_{index:04d}.pt"

    def done_layers(self) -> dict[int, tuple[dict[str, QuantizedWeight], list[LayerReport]]]:
        done = {}
        for p in sorted(self.dir.glob("layer_*.pt")):
            index = int(p.stem.split("_")[1])
            try:
                blob = torch.load(p, weights_only=False)
            except Exception:  # a layer file cut short by a crash: redo that layer
                p.unlink(missing_ok=True)
                continue
            weights = {k: QuantizedWeight(**v) for k, v in blob["weights"].items()}
            reports = [LayerReport(**r) for r in blob["reports"]]
            done[index] = (weights, reports)
        return done

    def save_layer(self, index: int, weights: dict[str, QuantizedWeight], reports: list[LayerReport]) -> None:
        blob = {
            "weights": {k: asdict(v) for k, v in weights.items()},
            "reports": [asdict(r) for r in reports],
        }
        tmp = self._path(index).with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self._path(index))
