"""Perception per-stage latency: `server.perception.perceive` over the available photos.

Why: the perception layer runs before every photo answer on a CPU it shares with the language model,
so its cost must be known per stage (detector, pose, classifier, colour, light, codes). Each photo is
run once to warm up (the first call loads the models; load time is reported separately), then
``--repeats`` times; the median of each stage is reported.

    python benchmarks/perception.py                  # calib_images plus ../shared/data/images if present
    python benchmarks/perception.py --threads 1 --repeats 10

Prints a table and saves JSON to benchmarks/results/perception.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTO_DIRS = (REPO / "quantizer" / "calib_images", REPO.parent / "shared" / "data" / "images")
STAGES = ("prepare", "detect", "pose", "classify", "colour", "light", "codes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="perception thread budget (RPIQ_PERCEPTION_THREADS)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "perception.json")
    args = parser.parse_args()
    os.environ["RPIQ_PERCEPTION_THREADS"] = str(args.threads)

    import sys

    sys.path.insert(0, str(REPO))
    from PIL import Image

    from server.perception import ensure_perception_models, perceive

    ensure_perception_models(progress=print)
    photos = [p for d in PHOTO_DIRS if d.is_dir() for p in sorted(d.iterdir()) if p.suffix in (".jpg", ".png")]
    rows = []
    t0 = time.perf_counter()
    perceive(Image.open(photos[0]))  # loads every model once
    load_ms = (time.perf_counter() - t0) * 1000.0
    for path in photos:
        image = Image.open(path)
        image.load()
        perceive(image)  # warm-up for this size
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            scene = perceive(image)
            runs.append((scene, (time.perf_counter() - t) * 1000.0))
        scene = runs[-1][0]
        stages = {s: round(statistics.median(r[0].timings_ms.get(s, 0.0) for r in runs), 1) for s in STAGES}
        rows.append({
            "photo": str(path.relative_to(REPO.parent)),
            "size": list(image.size),
            "stages_ms": stages,
            "total_ms": round(statistics.median(r[1] for r in runs), 1),
            "objects": [f"{o.label} {o.score:.2f}" for o in scene.objects],
            "labels": [f"{lab.name} {lab.score:.2f}" for lab in scene.labels],
            "summary": scene.summary(),
        })  # fmt: skip

    header = f"{'photo':<42}{'size':>10}" + "".join(f"{s:>9}" for s in STAGES) + f"{'total':>9}"
    print(header)
    for row in rows:
        size = "x".join(map(str, row["size"]))
        print(f"{row['photo']:<42}{size:>10}" + "".join(f"{row['stages_ms'][s]:>9.1f}" for s in STAGES)
              + f"{row['total_ms']:>9.1f}")  # fmt: skip
    print(f"(ms, median of {args.repeats}; first call incl. model loading: {load_ms:.0f} ms)")
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads},
        "repeats": args.repeats,
        "first_call_ms": round(load_ms, 1),
        "photos": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
