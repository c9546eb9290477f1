"""Result object and its encoders (COCO RLE, PNG, overlay)."""

from __future__ import annotations

import json

import numpy as np

from lisa_agent.encoders import mask_to_rle, render_overlay, rle_to_mask
from lisa_agent.result import SegmentationResult


def _masks():
    m = np.zeros((2, 30, 40), bool)
    m[0, 5:10, 8:20] = True
    m[1, 20:28, 30:39] = True
    return m


def test_rle_round_trip():
    m = _masks()[0]
    rle = mask_to_rle(m)
    assert rle["size"] == [30, 40] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(rle_to_mask(rle), m)


def test_statistics_and_json_round_trip():
    res = SegmentationResult.from_masks(_masks(), [0.9, 0.5], text="Sure, [SEG] and [SEG] .", query="q",
                                        mode="fast", image_size=(30, 40), timings_ms={"total": 3.0})
    a, b = res.instances
    assert a.bbox == (8, 5, 19, 9) and a.area == 60 and a.centroid == (13.5, 7.0)
    assert b.bbox == (30, 20, 38, 27) and b.score == 0.5
    d = json.loads(json.dumps(res.to_dict()))
    assert d["masks"][0]["bbox"] == [8, 5, 19, 9] and d["masks"][0]["centroid"] == [13.5, 7.0]
    back = SegmentationResult.from_dict(d)
    np.testing.assert_array_equal(back.masks, res.masks)
    assert back.instances == res.instances and back.text == res.text
    labels = res.label_mask()
    assert labels[6, 10] == 1 and labels[21, 31] == 2 and labels[0, 0] == 0


def test_overlay_tints_only_the_mask():
    frame = np.full((30, 40, 3), 100, np.uint8)
    m = _masks()[:1]
    out = render_overlay(frame, m, labels=["knife"])
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert not np.array_equal(out[7, 14], frame[7, 14])  # inside the mask: tinted
    assert np.array_equal(out[25, 5], frame[25, 5])  # far from mask, box and label: untouched
