"""Everyday objects with SSD-MobileNet-v2 (COCO), as a short list a person can trust.

Why the filtering: the raw detector returns 100 boxes, most of them noise, and several boxes for one
object. Saying them all would be worse than silence. So each class has its own score threshold
(classes the model is known to hallucinate need more evidence), boxes of one class are merged with
non-maximum suppression, a box that nearly coincides with a stronger box of another class is dropped
(a cup that is also called a bowl; a phone inside a person's box is kept), and at most `MAX_OBJECTS`
of the strongest remain.
"""

from __future__ import annotations

import cv2
import numpy as np

from .facts import Box, DetectedObject
from .geometry import box_area, box_centre_x, clock_position, direction_words, nearness
from .runtime import Lazy, limit_opencv_threads, model_files

# The 91-id COCO map the TF Object Detection API models use (id 0 is the background; "" = unused id).
COCO_LABELS: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "", "backpack", "umbrella", "", "",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "", "dining table", "", "",
    "toilet", "", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip
assert len(COCO_LABELS) == 91

SPOKEN = {"dining table": "table", "tv": "television", "cell phone": "mobile phone", "couch": "sofa",
          "motorcycle": "motorbike", "hair drier": "hair dryer", "remote": "remote control",
          "mouse": "computer mouse", "sports ball": "ball"}  # fmt: skip
"""How a COCO class is said to a person (COCO's names are dataset jargon in places)."""

DEFAULT_THRESHOLD = 0.5
THRESHOLDS = {
    # Large, context-driven or look-alike classes the model fires on without the object present.
    "dining table": 0.65, "bed": 0.6, "couch": 0.6, "toilet": 0.6, "tv": 0.6, "mouse": 0.65, "remote": 0.65,
    "tie": 0.65, "kite": 0.65, "frisbee": 0.65, "sports ball": 0.6, "cell phone": 0.6, "hair drier": 0.7,
    "toothbrush": 0.65, "parking meter": 0.65, "fire hydrant": 0.6, "handbag": 0.6, "skis": 0.65,
    "snowboard": 0.65, "baseball bat": 0.65, "baseball glove": 0.65, "surfboard": 0.65, "bench": 0.6,
    "refrigerator": 0.6, "oven": 0.6, "sink": 0.6, "book": 0.55, "clock": 0.55, "vase": 0.55,
    # Small, common, well-learnt classes where a miss costs more than a rare false alarm.
    "person": 0.5, "cup": 0.45, "bottle": 0.45, "cat": 0.45, "dog": 0.45,
}  # fmt: skip
CANDIDATE_FLOOR = 0.3  # boxes below this never reach NMS (the lowest class threshold is above it)
NMS_IOU = 0.45
CROSS_CLASS_IOU = 0.7  # two classes on (nearly) the same box: one object, two names; keep the stronger
MAX_OBJECTS = 8
INPUT_SIZE = (300, 300)


def _load_net() -> cv2.dnn.Net:
    files = model_files()
    limit_opencv_threads()
    return cv2.dnn.readNetFromTensorflow(str(files.ssd_graph), str(files.ssd_config))


_net: Lazy[cv2.dnn.Net] = Lazy(_load_net)


def spoken_name(coco_label: str) -> str:
    return SPOKEN.get(coco_label, coco_label)


def raw_detections(rgb: np.ndarray) -> np.ndarray:
    """Rows ``[class_id, score, x1, y1, x2, y2]`` (normalised) above `CANDIDATE_FLOOR`, from an RGB array."""
    net = _net.get()
    # The net was trained on RGB; the array is RGB already, so no channel swap here.
    blob = cv2.dnn.blobFromImage(rgb, size=INPUT_SIZE, swapRB=False)
    with _net.lock:
        net.setInput(blob)
        out = net.forward()
    rows = out.reshape(-1, 7)[:, 1:]
    return rows[rows[:, 1] >= CANDIDATE_FLOOR]


def filter_detections(rows: np.ndarray) -> list[tuple[str, float, Box]]:
    """Per-class thresholds, per-class NMS, cross-class overlap removal, strongest `MAX_OBJECTS` first."""
    by_class: dict[str, list[tuple[float, Box]]] = {}
    for class_id, score, x1, y1, x2, y2 in rows.tolist():
        cid = int(class_id)
        label = COCO_LABELS[cid] if 0 < cid < len(COCO_LABELS) else ""
        if not label or score < THRESHOLDS.get(label, DEFAULT_THRESHOLD):
            continue
        box = (_clip(x1), _clip(y1), _clip(x2), _clip(y2))
        if box[2] - box[0] > 0.005 and box[3] - box[1] > 0.005:
            by_class.setdefault(label, []).append((float(score), box))

    kept: list[tuple[str, float, Box]] = []
    for label, items in by_class.items():
        xywh = [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for _, b in items]
        keep = cv2.dnn.NMSBoxes(xywh, [s for s, _ in items], 0.0, NMS_IOU)
        kept.extend((label, *items[int(i)]) for i in np.array(keep).reshape(-1))
    kept.sort(key=lambda item: -item[1])

    result: list[tuple[str, float, Box]] = []
    for label, score, box in kept:
        if any(other != label and _iou(box, obox) >= CROSS_CLASS_IOU for other, _, obox in result):
            continue
        result.append((label, score, box))
    return result[:MAX_OBJECTS]


def detect_objects(rgb: np.ndarray) -> list[DetectedObject]:
    """Objects in an RGB uint8 array, strongest first, with where they are and how near."""
    objects = []
    for label, score, box in filter_detections(raw_detections(rgb)):
        cx = box_centre_x(box)
        objects.append(
            DetectedObject(
                label=spoken_name(label),
                score=round(score, 3),
                box=tuple(round(v, 4) for v in box),
                clock=clock_position(cx),
                direction=direction_words(cx),
                nearness=nearness(box),
            )
        )
    return objects


def _clip(v: float) -> float:
    return min(1.0, max(0.0, float(v)))


def _iou(a: Box, b: Box) -> float:
    """Intersection over union of two normalised boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0
