"""``lisa-agent resize-sam``: SAM's input size multiplied, position terms resampled, the rest untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lisa_agent import LisaSegmenter
from lisa_agent.engine.weights import read_state_dict
from lisa_agent.errors import InvalidArgumentError
from lisa_agent.training.resize_sam import ENCODER_PREFIX, resize_sam_state, stretch_rel_pos


def test_stretched_table_reads_the_old_one_at_offsets_scaled_by_k():
    old = torch.randn(15, 4)  # S = 8: offsets -7..7
    new = stretch_rel_pos(old, 2)
    assert new.shape == (31, 4)
    for d in range(-7, 8):  # an offset of 2d new cells is d old cells
        assert torch.allclose(new[15 + 2 * d], old[7 + d])
    # odd offsets sit halfway between their neighbours; the ends are held
    assert torch.allclose(new[15 + 1], (old[7] + old[8]) / 2)
    assert torch.allclose(new[30], old[14]) and torch.allclose(new[0], old[0])
    assert torch.allclose(stretch_rel_pos(old, 1), old)


def test_resize_state_resamples_only_the_position_terms():
    pos = torch.full((1, 8, 8, 6), 0.25)
    pos[..., 0] = torch.arange(8.0).view(1, 8, 1)  # a ramp down the rows
    other = torch.randn(3, 3)
    state = {ENCODER_PREFIX + "pos_embed": pos,
             ENCODER_PREFIX + "blocks.0.attn.rel_pos_h": torch.randn(7, 2),  # window 4
             ENCODER_PREFIX + "blocks.1.attn.rel_pos_w": torch.randn(15, 2),  # global, grid 8
             "model.visual_model.mask_decoder.w": other}
    out = resize_sam_state(state, 128, 256)
    assert out[ENCODER_PREFIX + "pos_embed"].shape == (1, 16, 16, 6)
    assert torch.allclose(out[ENCODER_PREFIX + "pos_embed"][..., 1:], torch.tensor(0.25))  # constants stay
    ramp = out[ENCODER_PREFIX + "pos_embed"][0, :, 0, 0]
    assert bool((ramp[1:] >= ramp[:-1] - 1e-6).all()) and ramp[0] < 0.5 and ramp[-1] > 6.5  # still a ramp
    assert out[ENCODER_PREFIX + "blocks.0.attn.rel_pos_h"].shape == (15, 2)  # window 4 -> 8
    assert out[ENCODER_PREFIX + "blocks.1.attn.rel_pos_w"].shape == (31, 2)  # grid 8 -> 16
    assert out["model.visual_model.mask_decoder.w"] is other
    assert state[ENCODER_PREFIX + "pos_embed"].shape == (1, 8, 8, 6)  # the input is not modified
    with pytest.raises(InvalidArgumentError, match="whole multiple"):
        resize_sam_state(state, 128, 200)
    with pytest.raises(InvalidArgumentError, match="whole multiple"):
        resize_sam_state(state, 128, 64)
    with pytest.raises(InvalidArgumentError, match="no SAM image encoder"):
        resize_sam_state({"model.embed_tokens.weight": other}, 128, 256)


def test_resize_sam_command_writes_a_finer_checkpoint_that_loads_answers_alike_and_trains(
        tiny_checkpoint, tmp_path, capsys):
    from lisa_agent.cli import main
    from lisa_agent.training.batches import synthetic_scenes
    from lisa_agent.training.trainer import TrainConfig, Trainer

    out = tmp_path / "sam256"
    assert main(["resize-sam", "--model", str(tiny_checkpoint), "--out", str(out), "--size", "256"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["sam_image_size"] == 256 and config["lisa_agent"]["sam_resized_from"] == 128
    src = LisaSegmenter.from_pretrained(tiny_checkpoint, dtype="fp32", device="cpu")
    big = LisaSegmenter.from_pretrained(out, dtype="fp32", device="cpu")
    s, b = src.model.sam_spec, big.model.sam_spec
    assert (b.img_size, b.window_size, b.global_attn_indexes) == (256, 2 * s.window_size, s.global_attn_indexes)
    # everything but SAM's position terms is the source's
    a, c = read_state_dict(tiny_checkpoint), read_state_dict(out)
    changed = sorted(k for k in a if a[k].shape != c[k].shape or not torch.equal(a[k], c[k]))
    assert changed and all(k.startswith(ENCODER_PREFIX) and k.endswith(("pos_embed", "rel_pos_h", "rel_pos_w"))
                           for k in changed)
    frame = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    r_src, r_big = src.segment(frame, "the mug", mode="chat"), big.segment(frame, "the mug", mode="chat")
    assert r_big.text == r_src.text  # the language side is untouched
    assert r_big.masks.shape[1:] == (120, 160)
    low_res, _, _ = big.model.decode_masks(torch.zeros(1, big.model.text_hidden_fcs[0][0].in_features),
                                           big.encode(frame).sam_embedding)
    assert low_res.shape[-2:] == (64, 64)  # 4 x the 16 x 16 grid (the source: 32 x 32)
    # it fine-tunes at the new size and stays there
    cfg = TrainConfig(method="full", steps=1, lr=1e-3, warmup=1, scenes_per_batch=1, val_every=0, save_every=0)
    trainer = Trainer(big, out, tmp_path / "tuned", cfg, log=lambda *a: None)
    trainer.fit(synthetic_scenes(seed=0, sizes=((96, 128),)), steps=1, progress=False)
    trainer.save()
    assert LisaSegmenter.from_pretrained(tmp_path / "tuned").model.sam_spec.img_size == 256
    # refusals, named
    capsys.readouterr()
    assert main(["resize-sam", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--size", "200"]) == 1
    assert "whole multiple of the current 128 px" in capsys.readouterr().err
    assert main(["resize-sam", "--model", str(tiny_checkpoint), "--out", str(out), "--size", "256"]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err

