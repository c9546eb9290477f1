"""Per-frame features: encode once, query many times (a handle), a cache keyed by the pixels, honest
timings on a hit, and Frames carrying id, stamp and depth through to the result."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_frame

from lisa_agent import LisaSegmenter
from lisa_agent.errors import InvalidArgumentError
from lisa_agent.frames import Frame, Stamp
from lisa_agent.geometry import Intrinsics, depth_to_meters, mask_target

ENCODERS = ("preprocess", "sam_encoder", "clip")
QUERY = "the red mug"


@pytest.fixture
def seg(tiny_checkpoint) -> LisaSegmenter:
    """A fresh engine (its own empty cache) on the tiny checkpoint."""
    return LisaSegmenter.from_pretrained(tiny_checkpoint, device="cpu")


def test_a_cache_hit_reports_its_own_cost_and_says_cached(seg):
    frame = random_frame(480, 640, seed=11)
    runs = {"sam": 0, "clip": 0}

    def counter(name: str):  # noqa: ANN202
        return lambda *_: runs.__setitem__(name, runs[name] + 1)

    hooks = [seg.model.sam.image_encoder.patch_embed.register_forward_hook(counter("sam")),
             seg.model.vision.register_forward_hook(counter("clip"))]
    try:
        miss = seg.segment(frame, QUERY)
        encoded = dict(runs)
        hit = seg.segment(frame.copy(), "another query")  # same pixels, another array
    finally:
        for hook in hooks:
            hook.remove()
    assert encoded == {"sam": 1, "clip": 1} and runs == encoded  # the hit ran neither encoder: one digest
    assert not miss.cached and hit.cached
    assert miss.timings_ms["sam_encoder"] > 0 and miss.timings_ms["clip"] > 0
    assert all(hit.timings_ms[k] == 0 for k in ENCODERS)
    # what the hit reports is what it cost: its stages add up to its total (before, a hit repeated the
    # first call's encoder timings and reported far more than it took)
    stages = sum(v for k, v in hit.timings_ms.items() if k != "total")
    assert hit.timings_ms["total"] == pytest.approx(stages)
    assert hit.to_dict()["cached"] is True and miss.to_dict()["cached"] is False


def test_a_handle_skips_digest_and_encoders_and_gives_the_same_answer(seg):
    frame = random_frame(120, 160, seed=12)
    features = seg.encode(frame)
    seg.clear_cache()  # the handle keeps its features alive whatever the cache does
    by_handle = seg.segment(features, QUERY)
    by_pixels = seg.segment(frame, QUERY)
    assert by_handle.cached and all(by_handle.timings_ms[k] == 0 for k in ("digest", *ENCODERS))
    np.testing.assert_array_equal(by_handle.masks, by_pixels.masks)
    batch = seg.segment_batch(features, [QUERY, "the knife"])
    np.testing.assert_array_equal(batch[0].masks, by_pixels.masks)
    conversation = seg.start_conversation(features)
    assert seg.chat(conversation, QUERY, max_new_tokens=4).cached
    np.testing.assert_array_equal(conversation.image, frame)


def test_features_are_never_served_for_other_pixels_whatever_the_frame_id(seg, tiny_segmenter):
    """Frame ids are names, not cache keys: a black frame sent under another frame's id gets its own
    masks (before, a matching id and size returned the first frame's features)."""
    knife = random_frame(96, 128, seed=13)
    black = np.zeros_like(knife)
    seg.segment(knife, QUERY, frame_id="cam0/42")
    result = seg.segment(black, QUERY, frame_id="cam0/42")
    assert not result.cached and result.frame_id == "cam0/42"
    tiny_segmenter.clear_cache()
    np.testing.assert_array_equal(result.masks, tiny_segmenter.segment(black, QUERY).masks)
    with pytest.raises(InvalidArgumentError, match="encoded by another engine"):
        LisaSegmenter(seg.model, seg.tokenizer, mask_tta="hflip").segment(seg.encode(knife), QUERY)


def test_a_frames_id_stamp_and_size_reach_the_result(seg):
    pixels = random_frame(60, 90, seed=14)
    first = seg.segment(Frame(pixels, frame_id="cam_optical", stamp=1732650000.25), QUERY)
    assert (first.frame_id, first.stamp, first.image_size) == ("cam_optical", Stamp(1732650000, 250_000_000),
                                                               (60, 90))
    # the same pixels later (a static scene): cached features, the new frame's own id and stamp
    again = seg.segment(Frame(pixels, frame_id="cam_optical", stamp=Stamp(1732650001, 5)), QUERY)
    assert again.cached and again.stamp == Stamp(1732650001, 5)
    assert again.to_dict()["stamp"] == {"sec": 1732650001, "nanosec": 5}


def test_depth_and_intrinsics_give_targets_and_depth_from_another_instant_is_refused(seg):
    pixels = random_frame(96, 128, seed=15)
    depth = np.full((96, 128), 750, np.uint16)
    depth[:, :40] = 0  # no reading on the left
    intr = Intrinsics(100.0, 110.0, 64.0, 48.0)
    result = seg.segment(Frame(pixels, stamp=10.0, depth=depth, intrinsics=intr, depth_stamp=10.02), QUERY)
    expected = mask_target(depth_to_meters(depth), result.masks[0], intr)
    if expected is None:
        assert result.targets == [None] and "no valid depth" in result.depth_note
    else:
        assert result.targets[0] == expected and result.depth_note is None
    late = seg.segment(Frame(pixels, stamp=10.0, depth=depth, intrinsics=intr, depth_stamp=10.3), QUERY)
    assert late.targets is None
    assert late.depth_note.startswith("depth image is from 0.300 s after the colour frame (tolerance 0.05 s)")
    np.testing.assert_array_equal(late.masks, result.masks)  # the 2D answer is unaffected
    # without intrinsics: the depth, no 3D point
    flat = seg.segment(Frame(pixels, depth=np.full((96, 128), 0.5, np.float32)), QUERY)
    assert flat.targets[0].depth_m == pytest.approx(0.5) and flat.targets[0].point is None
    assert "no camera intrinsics" in flat.depth_note


def test_frame_validation_names_the_problem():
    pixels = random_frame(20, 30)
    with pytest.raises(InvalidArgumentError, match="stamp must be"):
        Frame(pixels, stamp=-1.0)
    with pytest.raises(InvalidArgumentError, match="intrinsics"):
        Frame(pixels, intrinsics=(1.0, 2.0))
    with pytest.raises(InvalidArgumentError, match="depth_tolerance_s"):
        Frame(pixels, depth_tolerance_s=float("nan"))
    with pytest.raises(Exception, match="depth must be an HxW uint16"):
        Frame(pixels, depth=np.zeros((20, 30), np.int32))
    assert Stamp.of(1.999999999999) == Stamp(2, 0)
