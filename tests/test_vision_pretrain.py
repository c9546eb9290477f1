"""Vision pre-training: patch targets follow the CLIP crop, training lowers the loss, the checkpoint
keeps the published layout with the new tower and the other weights unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lisa_agent import LisaSegmenter
from lisa_agent.data.tabletop import render_scene, split_seed
from lisa_agent.training.vision_pretrain import LABELS, TowerShape, VisionPretrainConfig, patch_targets

pytestmark = pytest.mark.slow  # trains a vision tower

@pytest.mark.parametrize("size", [(240, 320), (320, 240), (224, 224)])
def test_patch_targets_are_the_cover_of_each_label_inside_the_clip_crop(size):
    scene = render_scene(split_seed("train", 7), size=size)
    t = patch_targets(scene, 112, 8)
    assert t.shape == (64, len(LABELS)) and t.dtype == np.float32
    assert t.min() >= 0 and t.max() <= 1
    h, w = size
    short = min(h, w)
    top, left = (h - short) // 2, (w - short) // 2
    for obj in scene.objects:
        j = LABELS.index(obj.category)
        inside = obj.mask[top: top + short, left: left + short]
        cell = short / 8
        # the patch holding most of the object is covered by it in the targets too
        ys, xs = np.nonzero(inside)
        if len(ys) < 0.5 * obj.mask.sum():
            continue
        row = min(7, int(np.median(ys) / cell))
        col = min(7, int(np.median(xs) / cell))
        assert t[row * 8 + col, j] > 0, (obj.name(), row, col)
        assert t[:, LABELS.index(obj.colour)].max() > 0
    absent = [c for c in LABELS[:12] if c not in {o.category for o in scene.objects}]
    assert all(t[:, LABELS.index(c)].max() == 0 for c in absent)


def test_pretrain_vision_lowers_the_loss_and_saves_a_loadable_checkpoint(tiny_checkpoint, tmp_path, capsys):
    from lisa_agent.cli import main

    before = LisaSegmenter.from_pretrained(tiny_checkpoint, dtype="fp32", device="cpu")
    rc = main(["pretrain-vision", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "pv"), "--steps", "60",
               "--scenes", "24", "--batch", "8", "--lr", "3e-3"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["probe"]) == {"accuracy", "all_absent", "recall"}
    after = LisaSegmenter.from_pretrained(tmp_path / "pv", dtype="fp32", device="cpu")
    sb, sa = before.model.state_dict(), after.model.state_dict()
    changed = {k for k in sb if not torch.equal(sb[k], sa[k])}
    assert changed and all(k.startswith(("vision.", "mm_projector.")) for k in changed), sorted(changed)[:5]


def test_pretrainer_fits_the_patch_targets(tiny_checkpoint):
    from lisa_agent.training.vision_pretrain import VisionPretrainer

    seg = LisaSegmenter.from_pretrained(tiny_checkpoint, dtype="fp32", device="cpu")
    torch.manual_seed(0)
    pre = VisionPretrainer(seg.model, VisionPretrainConfig(steps=80, batch=8, lr=3e-3, scenes=16), log=lambda _: None)
    history = pre.fit()
    assert np.mean(history[-10:]) < 0.6 * np.mean(history[:10])


def test_pretrain_vision_rejects_bad_arguments(tiny_checkpoint, tmp_path, capsys):
    from lisa_agent.cli import main

    assert main(["pretrain-vision", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x"),
                 "--steps", "0"]) != 0
    assert "--steps" in capsys.readouterr().err


def test_new_tower_replaces_clip_and_projector_and_keeps_the_rest(tiny_checkpoint, tmp_path, capsys):
    from lisa_agent.cli import main

    before = LisaSegmenter.from_pretrained(tiny_checkpoint, dtype="fp32", device="cpu")
    rc = main(["pretrain-vision", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "nt"), "--steps", "4",
               "--scenes", "8", "--batch", "4", "--new-tower", "84/28/48/3/2"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["image_tokens"] == 9
    config = json.loads((tmp_path / "nt" / "config.json").read_text())
    assert config["mm_hidden_size"] == 48
    proc = json.loads((tmp_path / "nt" / "vision_tower" / "preprocessor_config.json").read_text())
    assert proc["crop_size"] == {"height": 84, "width": 84} and proc["size"] == {"shortest_edge": 84}
    after = LisaSegmenter.from_pretrained(tmp_path / "nt", dtype="fp32", device="cpu")
    assert after.clip_size == 84 and after.model.vision.hidden_size == 48
    assert after.model.mm_projector.weight.shape == (before.model.mm_projector.out_features, 48)
    sb, sa = before.model.state_dict(), after.model.state_dict()
    kept = [k for k in sb if not k.startswith(("vision.", "mm_projector."))]
    assert kept and all(torch.equal(sb[k], sa[k]) for k in kept)
    frame = render_scene(split_seed("test", 3), size=(96, 128)).image
    result = after.segment(frame, "the red mug", mode="fast")
    assert result.masks.shape[1:] == (96, 128)


@pytest.mark.parametrize("text", ["224/28/192", "224/30/192/4", "224/28/190/4/4", "224/28/192/1", "a/b/c/d", "0/1/2/3"])
def test_tower_shape_rejects_bad_specs_with_the_reason(text):
    with pytest.raises(ValueError, match="tower|patch|heads|layers"):
        TowerShape.parse(text)


def test_pretrain_vision_names_a_bad_new_tower(tiny_checkpoint, tmp_path, capsys):
    from lisa_agent.cli import main

    assert main(["pretrain-vision", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x"),
                 "--new-tower", "100/28/48/3"]) != 0
    assert "--new-tower" in capsys.readouterr().err
