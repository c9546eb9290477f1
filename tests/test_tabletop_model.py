"""The bundled tabletop-tiny model really segments: held-out scenes, measured as LISA measures.

The held-out set is small and fixed (test-split seeds, never trained on) so the test stays fast; the
full numbers (60 scenes, 378 queries) are in the model card. Thresholds sit a little under what the
shipped weights measure here (CPU, fp32, deterministic), so a regression in the engine, the loader or
the weights fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest

from lisa_agent import LisaSegmenter
from lisa_agent.data.queries import queries_for_scene
from lisa_agent.data.tabletop import render_scene, split_seed
from lisa_agent.evaluation.metrics import IoUMeter, score_query

pytestmark = pytest.mark.slow  # evaluates the bundled model on held-out scenes

N_SCENES = 10
SIZE = (240, 320)
# Measured on these 10 scenes with the shipped weights (stage 7, its declared mask augmentation "flips" and
# presence gate threshold): explicit 0.695, implicit 0.702, right object 0.935, two masks 1.0, no-target
# answered without a mask 1.0, demo IoU with the knife 0.84. Thresholds sit a little lower (one no-target
# query of ten is 0.1); right object is asserted at the project's bar (85%).
EXPLICIT_GIOU, IMPLICIT_GIOU, RIGHT_OBJECT, TWO_MASKS, NO_MASK, DEMO_IOU = 0.66, 0.66, 0.85, 0.9, 0.9, 0.75


@pytest.fixture(scope="module")
def model():
    seg = LisaSegmenter.from_pretrained("tabletop-tiny")
    assert seg.mask_tta == "flips"  # the numbers above are the model with the augmentation it declares
    return seg


@pytest.fixture(scope="module")
def report(model):
    """Generated answers (chat mode) on N_SCENES held-out scenes: per-subset gIoU and behaviour rates."""
    meters = {s: IoUMeter() for s in ("explicit", "implicit", "multi", "no_target")}
    right, no_mask, two = [], [], []
    for k in range(N_SCENES):
        scene = render_scene(split_seed("test", 500 + k), size=SIZE)
        objects = np.stack([o.mask for o in scene.objects])
        for q in queries_for_scene(scene):
            res = model.segment(scene.image, q.text, mode="chat", max_new_tokens=32)
            meters[q.subset].add(score_query(res.masks, q.masks, shape=SIZE))
            pred = res.masks.any(axis=0) if len(res.masks) else np.zeros(SIZE, bool)
            if q.subset in ("explicit", "implicit"):
                overlaps = (objects & pred).sum(axis=(1, 2))
                right.append(int(np.argmax(overlaps)) == q.targets[0] and overlaps.max() > 0)
            elif q.subset == "no_target":
                no_mask.append(len(res.masks) == 0)
            else:
                two.append(len(res.masks) == 2)
    return {"gIoU": {s: m.giou for s, m in meters.items()}, "right_object": float(np.mean(right)),
            "no_mask": float(np.mean(no_mask)), "two_masks": float(np.mean(two))}


def test_explicit_and_implicit_queries_find_the_object(report):
    print(report)
    assert report["gIoU"]["explicit"] >= EXPLICIT_GIOU
    assert report["gIoU"]["implicit"] >= IMPLICIT_GIOU
    assert report["right_object"] >= RIGHT_OBJECT


def test_two_target_queries_get_two_masks(report):
    assert report["two_masks"] >= TWO_MASKS


def test_no_target_queries_are_declined_without_a_mask(report):
    assert report["no_mask"] >= NO_MASK


def test_a_declined_query_gets_the_models_own_refusal(model):
    # held-out scene 502: purple book, yellow apple, yellow hammer, red bottle, blue knife
    scene = render_scene(split_seed("test", 502), size=SIZE)
    assert [o.name() for o in scene.objects if o.category == "book"] == ["purple book"]
    for mode in ("chat", "fast"):
        declined = model.segment(scene.image, "the black book", mode=mode)
        assert declined.masks.shape == (0, *SIZE) and declined.text == "Sorry, there is no black book in this image."
    kept = model.segment(scene.image, "the purple book", mode="chat")
    book = next(o.mask for o in scene.objects if o.category == "book")
    assert len(kept.masks) == 1 and kept.instances[0].score >= model.presence_gate["threshold"]
    assert (kept.masks[0] & book).sum() / (kept.masks[0] | book).sum() >= 0.7


def test_demo_segments_something_to_cut_with(capsys, tmp_path):
    import json

    from lisa_agent.cli import main

    assert main(["demo", "--json", "--out", str(tmp_path / "overlay.png")]) == 0
    assert (tmp_path / "overlay.png").stat().st_size > 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == "grab something to cut with" and out["masks"]
    from lisa_agent.commands.demo import DEFAULT_SEED

    scene = render_scene(split_seed("test", DEFAULT_SEED), size=(480, 640))
    from lisa_agent.encoders import rle_to_mask

    mask = rle_to_mask(out["masks"][0]["rle"])
    cutters = [o.mask for o in scene.objects if o.category in ("knife", "scissors")]
    assert cutters, "demo scene must hold a knife or scissors"
    best = max(float((mask & c).sum() / (mask | c).sum()) for c in cutters)
    print("demo IoU", best)
    assert best >= DEMO_IOU
