"""The TRAINED tiny reasoner (``lisa_agent/assets/tabletop-reasoner-tiny``, a VisionReasoner-shaped Qwen2.5-VL
trained on the synthetic tabletop world: see its MODEL_CARD.md) loaded as a user loads it, ``open_backend(folder,
sam_model=...)``, and asked about held-out TEST scenes (``split_seed("test", i)``, never trained on) through the
real path: the 840 x 840 resize, the VisionReasoner instruction, greedy generation, the parser, SAM 2.

SAM 2 here is the random-weight tiny one (``make_tiny_sam2``): its masks mean nothing, so the checks are on what
the reasoner wrote (``result.reasoning``, ``result.prompts``). What the model card measured it can do, and so what
is checked: well-formed answers (one object, box and point read), and a think that names the right object (the
knife for "grab something to cut with" where the knife is the only cutting tool, and for "Segment the knife.").
It does NOT localise reliably (see the card: box IoU near chance), so no box or point is asserted. Random weights
fail these checks (measured once by pointing ``ASSET`` at an untrained ``make_tabletop_reasoner`` folder: all three
tests fail)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lisa_agent.backend import open_backend
from lisa_agent.data.tabletop import render_scene, split_seed
from lisa_agent.reasoner.segmenter import ReasonerSegmenter

ASSET = Path(__file__).resolve().parents[1] / "lisa_agent" / "assets" / "tabletop-reasoner-tiny"
#: The first held-out test scenes (drawn at 480 x 640) whose only cutting tool is the knife.
SCENES = 8
#: Generation budget (a trained answer is ~50 tokens).
TOKENS = 96
#: How many of the SCENES answers must name the knife in their think (thresholds a margin below the card's).
MIN_NAMED_IMPLICIT = 6
MIN_NAMED_EXPLICIT = 7


def knife_scenes(n: int) -> list:
    """The first ``n`` test-split scenes (480 x 640) with one knife and no scissors."""
    out, i = [], 0
    while len(out) < n:
        scene = render_scene(split_seed("test", i), size=(480, 640))
        cats = [o.category for o in scene.objects]
        if cats.count("knife") == 1 and "scissors" not in cats:
            out.append(scene)
        i += 1
    return out


@pytest.fixture(scope="module")
def reasoner(tmp_path_factory):
    from lisa_agent.reasoner.tiny import make_tiny_sam2

    sam = make_tiny_sam2(tmp_path_factory.mktemp("sam2") / "sam2-tiny")
    return open_backend(str(ASSET), sam_model=str(sam), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def answers(reasoner):
    """{query: [(scene, result), ...]} for the two queries over the held-out knife scenes."""
    scenes = knife_scenes(SCENES)
    return {q: [(s, reasoner.segment(s.image, q, max_new_tokens=TOKENS)) for s in scenes]
            for q in ("grab something to cut with", "Segment the knife.")}


def test_the_shipped_checkpoint_is_a_small_vision_reasoner(reasoner):
    assert isinstance(reasoner, ReasonerSegmenter)
    assert reasoner.style.name == "vision_reasoner" and reasoner.size == 840
    assert sum(f.stat().st_size for f in ASSET.iterdir()) < 12_000_000


def test_answers_are_well_formed_on_held_out_scenes(answers):
    for query, results in answers.items():
        for scene, result in results:
            info = result.reasoning
            assert info.status == "ok", (query, info.status, info.answer)  # one object read, nothing dropped
            assert len(result.prompts) == 1 and len(result.prompts[0][0].points) == 1
            x1, y1, x2, y2 = result.prompts[0][0].box
            h, w = scene.size
            assert 0 <= x1 <= x2 < w and 0 <= y1 <= y2 < h
            assert result.masks.shape == (1, h, w)


def test_the_think_names_the_knife(answers):
    implicit = sum("knife" in r.reasoning.think for _, r in answers["grab something to cut with"])
    explicit = sum("knife" in r.reasoning.think for _, r in answers["Segment the knife."])
    assert implicit >= MIN_NAMED_IMPLICIT, f"'grab something to cut with': the knife named in {implicit} of {SCENES}"
    assert explicit >= MIN_NAMED_EXPLICIT, f"'Segment the knife.': the knife named in {explicit} of {SCENES}"


def test_a_training_step_lowers_the_loss_and_the_shared_prefix_changes_nothing(tmp_path):
    """``lisa_agent.reasoner.train`` on a small untrained tabletop reasoner: the loss of one scene's queries (the
    inputs ``ReasonerSegmenter.reason`` builds, the answer's tokens only) computed with the queries' common prefix
    run once equals the loss of full passes, and a few AdamW steps on that batch lower it."""
    import torch

    from lisa_agent.reasoner.tiny import TABLETOP_SHAPE, make_tabletop_reasoner
    from lisa_agent.reasoner.train import (
        batch_loss,
        check_shared_prefix,
        load_for_training,
        scene_batch,
        scene_queries,
    )

    small = {**TABLETOP_SHAPE, "text": {**TABLETOP_SHAPE["text"], "hidden_size": 64, "intermediate_size": 128,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2},
             "vision": {**TABLETOP_SHAPE["vision"], "depth": 1, "hidden_size": 32, "intermediate_size": 64,
                        "fullatt_block_indexes": [0]}}
    seg = load_for_training(make_tabletop_reasoner(tmp_path / "init", seed=0, shape=small))
    scene = render_scene(split_seed("train", 0), size=(240, 320))
    batch = scene_batch(seg, scene, scene_queries(scene, np.random.default_rng(0), 0.5))
    assert check_shared_prefix(seg.model, batch) < 1e-4
    optimizer = torch.optim.AdamW(seg.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, _ = batch_loss(seg.model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert max(losses[-3:]) < 0.75 * losses[0], losses
