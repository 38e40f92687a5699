"""The detector's filtering on hand-made raw rows: thresholds, NMS, cross-class merge, cap (no model)."""

from __future__ import annotations

import numpy as np

from server.perception.detect import COCO_LABELS, MAX_OBJECTS, filter_detections, spoken_name


def rows(*items: tuple[int, float, float, float, float, float]) -> np.ndarray:
    return np.array(items, dtype=np.float32).reshape(-1, 6)


def test_coco_map_has_91_ids_with_the_tf_numbering() -> None:
    assert len(COCO_LABELS) == 91
    assert (COCO_LABELS[1], COCO_LABELS[17], COCO_LABELS[47], COCO_LABELS[67], COCO_LABELS[90]) == (
        "person", "cat", "cup", "dining table", "toothbrush",
    )  # fmt: skip
    assert COCO_LABELS[12] == "" and spoken_name("dining table") == "table"


def test_per_class_thresholds() -> None:
    kept = filter_detections(rows((17, 0.47, 0.1, 0.1, 0.5, 0.5), (74, 0.5, 0.6, 0.6, 0.9, 0.9)))
    assert [label for label, _, _ in kept] == ["cat"]  # a cat at 0.47 counts; a mouse at 0.50 does not


def test_nms_merges_duplicate_boxes_of_one_class() -> None:
    kept = filter_detections(rows((47, 0.9, 0.1, 0.1, 0.5, 0.5), (47, 0.8, 0.12, 0.1, 0.52, 0.5),
                                  (47, 0.7, 0.6, 0.1, 0.9, 0.4)))  # fmt: skip
    assert [(label, round(score, 2)) for label, score, _ in kept] == [("cup", 0.9), ("cup", 0.7)]


def test_cross_class_duplicates_keep_the_stronger_name_but_nested_objects_stay() -> None:
    kept = filter_detections(rows((47, 0.9, 0.2, 0.2, 0.6, 0.7), (51, 0.6, 0.21, 0.2, 0.6, 0.7),
                                  (1, 0.95, 0.0, 0.0, 1.0, 1.0), (77, 0.7, 0.4, 0.4, 0.5, 0.6)))  # fmt: skip
    assert [label for label, _, _ in kept] == ["person", "cup", "cell phone"]


def test_unused_ids_background_and_degenerate_boxes_are_dropped_and_the_list_is_capped() -> None:
    assert filter_detections(rows((0, 0.99, 0, 0, 1, 1), (12, 0.99, 0, 0, 1, 1), (17, 0.99, 0.5, 0.5, 0.5, 0.9))) == []
    many = rows(*[(44, 0.9 - i * 0.01, i / 20, 0.0, i / 20 + 0.04, 0.1) for i in range(20)])
    kept = filter_detections(many)
    assert len(kept) == MAX_OBJECTS and kept[0][1] > kept[-1][1]
