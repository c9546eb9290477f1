"""LISA's gIoU / cIoU rules against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from lisa_agent.evaluation.metrics import EPS, IoUMeter, intersection_union, iou_from, score_query


def _mask(shape, *boxes):
    m = np.zeros(shape, dtype=bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_plain_overlap():
    pred = _mask((10, 10), (0, 4, 0, 4))  # 16 px
    gt = _mask((10, 10), (2, 6, 2, 6)).astype(np.uint8)  # 16 px, overlap 2x2 = 4
    i, u = intersection_union(pred, gt)
    assert (i, u) == (4, 28)
    assert iou_from(i, u) == pytest.approx(4 / (28 + EPS))


def test_logits_are_thresholded_at_zero():
    logits = np.full((4, 4), -3.0, np.float32)
    logits[0, :2] = 0.5
    logits[1, 0] = 0.0  # not > 0
    gt = np.zeros((4, 4), np.uint8)
    gt[0, :3] = 1
    assert intersection_union(logits, gt) == (2, 3)


def test_ignore_pixels_count_for_neither():
    gt = np.zeros((4, 4), np.uint8)
    gt[0, :] = 1  # 4 target px
    gt[1, :] = 255  # ignored row
    pred = np.zeros((4, 4), bool)
    pred[0, :2] = True  # 2 hits
    pred[1, :] = True  # all in ignored pixels: no penalty
    pred[2, 0] = True  # 1 false positive
    i, u = intersection_union(pred, gt)
    assert (i, u) == (2, 5)
    # an extra ignore map works the same way
    assert intersection_union(pred, (gt == 1), ignore=(gt == 255)) == (2, 5)


def test_empty_vs_empty_is_one_and_empty_pred_vs_target_is_zero():
    empty = np.zeros((5, 5), bool)
    assert score_query([empty], [empty]).iou == 1.0
    assert score_query([], [], shape=(5, 5)) == score_query([], [], shape=(5, 5))
    s = score_query([], [], shape=(5, 5))
    assert (s.iou, s.inter, s.union) == (1.0, 0, 0)
    gt = _mask((5, 5), (0, 2, 0, 2))
    s = score_query([], [gt])
    assert (s.iou, s.inter, s.union) == (0.0, 0, 4)
    s = score_query([empty], [gt])
    assert (s.iou, s.union) == (0.0, 4)
    # a mask where there is no target: IoU 0 and its area goes into the union
    s = score_query([gt], [])
    assert (s.iou, s.inter, s.union) == (0.0, 0, 4)


def test_single_target_unions_several_predicted_masks():
    gt = _mask((6, 6), (0, 2, 0, 6))  # 12 px
    a = _mask((6, 6), (0, 2, 0, 3))
    b = _mask((6, 6), (0, 2, 3, 6))
    s = score_query([a, b], [gt])
    assert (s.inter, s.union) == (12, 12) and s.iou == pytest.approx(12 / (12 + EPS))


def test_multi_target_pairs_in_order_and_penalises_missing_and_extra_masks():
    t1 = _mask((8, 8), (0, 2, 0, 2))  # 4 px
    t2 = _mask((8, 8), (4, 8, 4, 8))  # 16 px
    s = score_query([t1, t2], [t1, t2])
    assert s.iou == pytest.approx(np.mean([4 / (4 + EPS), 16 / (16 + EPS)]))
    assert (s.inter, s.union) == (20, 20)
    swapped = score_query([t2, t1], [t1, t2])  # right masks in the wrong order: both wrong
    assert swapped.iou == 0.0 and (swapped.inter, swapped.union) == (0, 40)
    missing = score_query([t1], [t1, t2])  # second mask missing = empty
    assert missing.iou == pytest.approx(0.5 * 4 / (4 + EPS))
    assert (missing.inter, missing.union) == (4, 20)
    extra = _mask((8, 8), (3, 4, 0, 3))  # 3 px, no third target
    s = score_query([t1, t2, extra], [t1, t2])
    assert s.iou == pytest.approx((4 / (4 + EPS) + 16 / (16 + EPS) + 0.0) / 3)
    assert (s.inter, s.union) == (20, 23)


def test_meter_giou_is_mean_and_ciou_is_ratio_of_sums():
    m = IoUMeter()
    assert m.summary() == {"gIoU": None, "cIoU": None, "n": 0}
    big = _mask((10, 10), (0, 10, 0, 10))  # 100 px, perfect
    small_gt = _mask((10, 10), (0, 1, 0, 2))  # 2 px
    small_pred = _mask((10, 10), (0, 1, 0, 1))  # 1 px inside
    m.add(score_query([big], [big]))
    m.add(score_query([small_pred], [small_gt]))
    m.add(score_query([], [], shape=(10, 10)))  # empty vs empty: IoU 1, adds nothing to cIoU
    assert m.n == 3
    assert m.giou == pytest.approx((100 / (100 + EPS) + 1 / (2 + EPS) + 1.0) / 3)
    assert m.ciou == pytest.approx(101 / 102)
    only_empty = IoUMeter()
    only_empty.add(score_query([], [], shape=(3, 3)))
    assert only_empty.ciou == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        intersection_union(np.zeros((3, 3), bool), np.zeros((3, 4), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        score_query([], [])
