"""The presence gate: training the mask decoder's score output to say whether a [SEG]'s target is in
the frame, and declining (no mask, an answer without [SEG]) when it says no. The behaviour of the
trained bundled model is asserted in test_tabletop_model.py; here the mechanics, on the tiny
random-weight checkpoint (its score head is set by hand so the gate's decision is known)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import random_frame

from lisa_agent import LisaSegmenter
from lisa_agent.errors import InvalidArgumentError
from lisa_agent.training.batches import Example, TrainingImage, collate, synthetic_scenes
from lisa_agent.training.trainer import TrainConfig, Trainer


def test_absent_seg_queries_ask_for_absent_things_and_train_the_presence_head_only():
    scenes = synthetic_scenes("train", 4, ((96, 128),), absent_seg=3, named_prob=0.75)
    absent = [ex for _ in range(6) for ex in next(scenes).examples if ex.present is not None]
    assert len(absent) >= 15  # up to 3 per scene (none when nothing can be absent)
    for ex in absent:
        assert ex.present == (False,) and not ex.text_loss
        assert ex.answer.count("[SEG]") == 1 and ex.masks.shape == (1, 96, 128) and not ex.masks.any()
    named = [ex.answer for ex in absent if ex.answer.startswith("Sure, the ")]
    assert named and len(named) < len(absent)  # both named answers and LISA's templates
    plain = next(synthetic_scenes("train", 4, ((96, 128),)))
    assert all(ex.present is None and ex.text_loss for ex in plain.examples)


def test_collate_rejects_presence_flags_that_do_not_match_the_answer(tiny_segmenter):
    seg = tiny_segmenter
    image = random_frame(64, 80, seed=1)
    bad = Example(0, "the hammer", "Sure, [SEG].", np.zeros((1, 64, 80), bool), present=(False, True))
    with pytest.raises(ValueError, match="presence flags"):
        collate([TrainingImage(image, [bad])], seg.tokenizer, seg.template.name, seg.use_im_start_end, seg.sam_size,
                seg.clip_size, seg.seg_token_id)


def _trainer(checkpoint, out, presence_weight):
    seg = LisaSegmenter.from_pretrained(checkpoint)
    cfg = TrainConfig(method="full", steps=2, lr=1e-3, warmup=1, scenes_per_batch=1, val_every=0, save_every=0,
                      presence_weight=presence_weight)
    return Trainer(seg, checkpoint, out, cfg, log=lambda *a: None)


def test_an_absent_seg_adds_only_the_presence_loss(tiny_checkpoint, tmp_path):
    trainer = _trainer(tiny_checkpoint, tmp_path / "p", presence_weight=1.0)
    trainer.model.eval()  # no dropout: the two losses must be comparable
    seg = trainer.seg
    image = random_frame(96, 128, seed=5)
    mask = np.zeros((1, 96, 128), bool)
    mask[0, 20:60, 30:90] = True
    present = Example(0, "the red mug", "Sure, [SEG].", mask)
    absent = Example(0, "something to drive a nail with", "Sure, the hammer [SEG].",
                     np.zeros((1, 96, 128), bool), present=(False,), text_loss=False)

    def loss(examples):
        batch = collate([TrainingImage(image, examples)], seg.tokenizer, seg.template.name, seg.use_im_start_end,
                        seg.sam_size, seg.clip_size, seg.seg_token_id)
        with torch.no_grad():
            return trainer.loss(batch)

    _, alone = loss([present])
    _, both = loss([present, absent])
    # the absent query's text is not learned and its empty mask is not a mask target
    for key in ("ce", "bce", "dice"):
        assert both[key] == pytest.approx(alone[key], rel=1e-4, abs=1e-6)
    # its score joins the presence BCE (target 0) next to the present one's (target 1)
    with torch.no_grad():
        batch = collate([TrainingImage(image, [present, absent])], seg.tokenizer, seg.template.name, seg.use_im_start_end,
                        seg.sam_size, seg.clip_size, seg.seg_token_id)
        ids = batch.ids
        embeds, merged = trainer.model.embed_with_image(ids, trainer.model.encode_clip(batch.clip_pixels))
        hidden = trainer.model.llm.model(inputs_embeds=embeds).last_hidden_state
        states = [hidden[b, int(merged[b, j]) - 1] for b in range(2) for j in range(batch.answer_start[b],
                  batch.lengths[b]) if int(ids[b, j]) == seg.seg_token_id]
        _, score, _ = trainer.model.decode_masks(torch.stack(states), trainer.model.encode_sam(batch.sam_pixels))
        p = score[:, 0].sigmoid()
    expected = -(torch.log(p[0]) + torch.log(1 - p[1])) / 2
    assert both["presence"] == pytest.approx(expected.item(), rel=1e-4)
    assert both["loss"] == pytest.approx(both["ce"] + 2 * both["bce"] + 0.5 * both["dice"] + both["presence"],
                                         rel=1e-5)
    # LISA's recipe (weight 0) has no presence term
    trainer.cfg.presence_weight = 0.0
    _, lisa = loss([present, absent])
    assert "presence" not in lisa
    assert lisa["loss"] == pytest.approx(alone["ce"] + 2 * alone["bce"] + 0.5 * alone["dice"], rel=1e-4)


def test_saving_after_presence_training_declares_the_gate(tiny_checkpoint, tmp_path):
    trainer = _trainer(tiny_checkpoint, tmp_path / "gated", presence_weight=1.0)
    trainer.fit(synthetic_scenes("train", 0, ((96, 128),), absent_seg=2), progress=False)
    assert "presence" in trainer.history[-1]
    out = trainer.save()
    gate = json.loads((out / "config.json").read_text())["lisa_agent"]["presence_gate"]
    assert gate == {"threshold": 0.5, "decline_prefix": "Sorry,"}
    assert LisaSegmenter.from_pretrained(out).info()["presence_threshold"] == 0.5
    assert LisaSegmenter.from_pretrained(out, presence_threshold=0.8).info()["presence_threshold"] == 0.8
    assert LisaSegmenter.from_pretrained(out, presence_threshold=None).info()["presence_threshold"] is None
    plain = _trainer(tiny_checkpoint, tmp_path / "plain", presence_weight=0.0)
    assert "presence_gate" not in json.loads((plain.save() / "config.json").read_text())["lisa_agent"]


def _with_gate(source, folder):
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config["lisa_agent"] = {"presence_gate": {"threshold": 0.5, "decline_prefix": "Sorry,"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def gated_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny random-weight checkpoint with a presence gate declared in its config.json."""
    return _with_gate(tiny_checkpoint, tmp_path_factory.mktemp("gated") / "lisa-tiny-gated")


@pytest.fixture(scope="module")
def gated_trained(tmp_path_factory):
    """The bundled trained model with its gate declared afresh (its greedy answers do contain [SEG])."""
    from lisa_agent.engine.loading import resolve_checkpoint

    return _with_gate(resolve_checkpoint("tabletop-tiny"), tmp_path_factory.mktemp("gated") / "tabletop-gated")


def _set_presence(seg: LisaSegmenter, logit: float) -> None:
    """Make the score head say ``sigmoid(logit)`` for every [SEG]."""
    last = seg.model.sam.mask_decoder.iou_prediction_head.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(logit)
    seg.clear_cache()


@pytest.mark.parametrize("mode", ["chat", "fast"])
def test_the_gate_declines_when_the_target_is_absent_and_keeps_the_mask_when_present(gated_trained, mode):
    from lisa_agent.data.tabletop import render_scene, split_seed

    seg = LisaSegmenter.from_pretrained(gated_trained)
    frame = render_scene(split_seed("test", 3), size=(64, 80)).image
    ask = {"mode": mode, "answer": "Sure, [SEG]."} if mode == "fast" else {"mode": mode, "max_new_tokens": 12}
    _set_presence(seg, 4.0)  # present
    kept = seg.segment(frame, "the red mug", **ask)
    assert "[SEG]" in kept.text and len(kept.masks) >= 1 and kept.instances[0].score == pytest.approx(float(torch.tensor(4.0).sigmoid()))
    assert "decline" not in kept.timings_ms
    _set_presence(seg, -4.0)  # absent
    declined = seg.segment(frame, "the red mug", **ask)
    assert declined.masks.shape == (0, 64, 80) and declined.instances == []
    assert declined.text.startswith("Sorry,") and "[SEG]" not in declined.text
    assert seg.seg_token_id not in declined.output_ids and declined.timings_ms["decline"] > 0
    # a threshold below the score keeps the mask again
    seg.presence_gate["threshold"] = 0.01
    assert len(seg.segment(frame, "the red mug", **ask).masks) >= 1


def test_without_a_gate_scores_are_the_decoders_raw_output(gated_checkpoint):
    seg = LisaSegmenter.from_pretrained(gated_checkpoint, presence_threshold=None)
    _set_presence(seg, -4.0)
    result = seg.segment(random_frame(64, 80, seed=7), "the red mug", answer="Sure, [SEG].")
    assert len(result.masks) == 1 and result.instances[0].score == pytest.approx(-4.0)


def test_presence_threshold_errors(tiny_checkpoint, gated_checkpoint):
    with pytest.raises(InvalidArgumentError, match="no presence head"):
        LisaSegmenter.from_pretrained(tiny_checkpoint, presence_threshold=0.5)
    for bad in (0.0, 1.0, 1.5, "high", True):
        with pytest.raises(InvalidArgumentError, match="presence.threshold"):
            LisaSegmenter.from_pretrained(gated_checkpoint, presence_threshold=bad)
    seg = LisaSegmenter.from_pretrained(tiny_checkpoint)
    with pytest.raises(InvalidArgumentError, match="decline_prefix"):
        LisaSegmenter(seg.model, seg.tokenizer, presence_gate={"threshold": 0.5, "decline_prefix": "[SEG]"})


def test_finetune_refuses_absent_seg_queries_without_a_presence_loss(tiny_checkpoint, tmp_path, capsys):
    from lisa_agent.cli import main

    assert main(["finetune", "--model", str(tiny_checkpoint), "--data", "synthetic", "--out", str(tmp_path / "x"),
                 "--absent-seg-per-scene", "2"]) != 0
    assert "--presence-weight" in capsys.readouterr().err


def test_dense_targets_put_each_objects_category_and_colour_where_sam_sees_it():
    from lisa_agent.data.tabletop import render_scene, split_seed
    from lisa_agent.engine.preprocess import sam_preprocess
    from lisa_agent.training.batches import dense_label_names
    from lisa_agent.training.trainer import dense_targets

    scene_iter = synthetic_scenes("train", 6, ((240, 320),))
    item = next(scene_iter)
    scene = render_scene(split_seed("train", 0, 6), size=(240, 320))
    assert np.array_equal(item.image, scene.image) and len(item.object_masks) == len(scene.objects)
    resized = sam_preprocess(scene.image, 256).resized_hw  # (192, 256): the long side fills 256
    target = dense_targets(item.object_masks, item.object_labels, resized, 256, (16, 16))
    names = dense_label_names()
    assert target.shape == (len(names), 16, 16) and float(target.min()) >= 0 and float(target.max()) <= 1
    assert float(target[:, 12:].sum()) == 0.0  # the letterbox padding (rows 192..255) holds nothing
    present = {o.category for o in scene.objects} | {f"colour:{o.colour}" for o in scene.objects}
    for i, name in enumerate(names):
        assert (float(target[i].sum()) > 0) == (name in present), name
    for obj in scene.objects:
        channel = target[names.index(obj.category)]
        # the category's mass sums to the object's area in cells (16 x 16 letterbox pixels each)
        same = sum(int(o.mask.sum()) for o in scene.objects if o.category == obj.category)
        assert float(channel.sum()) == pytest.approx(same * (256 / 320) ** 2 / 256, rel=0.05)
        if sum(o.category == obj.category for o in scene.objects) == 1:
            ys, xs = np.nonzero(obj.mask)
            gy, gx = np.nonzero(channel.numpy() > 0)
            w = channel.numpy()[gy, gx]
            cy, cx = (gy + 0.5) @ w / w.sum(), (gx + 0.5) @ w / w.sum()
            assert abs(cy - ys.mean() * 0.8 / 16) < 0.5 and abs(cx - xs.mean() * 0.8 / 16) < 0.5


def test_the_dense_auxiliary_loss_trains_sam_and_its_head_is_not_saved(tiny_checkpoint, tmp_path):
    seg = LisaSegmenter.from_pretrained(tiny_checkpoint)
    cfg = TrainConfig(method="full", steps=2, lr=1e-3, warmup=1, scenes_per_batch=1, val_every=0, save_every=0,
                      sam_aux_weight=1.0)
    trainer = Trainer(seg, tiny_checkpoint, tmp_path / "aux", cfg, log=lambda *a: None)
    head = trainer.aux_head.weight.detach().clone()
    trainer.fit(synthetic_scenes("train", 0, ((96, 128),)), progress=False)
    assert "sam_aux" in trainer.history[-1] and not torch.equal(head, trainer.aux_head.weight)
    out = trainer.save()
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert not any("aux" in key for key in index)
    resumed = Trainer(LisaSegmenter.from_pretrained(tiny_checkpoint), tiny_checkpoint, out,
                      TrainConfig(method="full", steps=3, warmup=1, scenes_per_batch=1, val_every=0, save_every=0,
                                  sam_aux_weight=1.0), log=lambda *a: None)
    resumed.resume(out / "trainer_state.pt")
    assert torch.equal(resumed.aux_head.weight, trainer.aux_head.weight)


def test_choose_threshold_by_hand():
    from lisa_agent.evaluation.gate import choose_threshold, gate_rates

    scores = [("no_target", 0.1), ("no_target", 0.2), ("no_target", None), ("no_target", 0.7),
              ("explicit", 0.9), ("implicit", 0.8), ("explicit", 0.3), ("multi", 0.6)]
    assert gate_rates(scores, 0.5) == {"threshold": 0.5, "declined": 0.75, "kept": 0.75}
    best = choose_threshold(scores)  # between 0.2 and 0.3: 3 of 4 declined, all 4 kept
    assert best["threshold"] == pytest.approx(0.25) and (best["declined"], best["kept"]) == (0.75, 1.0)
    strict = choose_threshold(scores, min_decline=1.0)  # 0.7 must be declined: between 0.7 and 0.8
    assert strict["threshold"] == pytest.approx(0.75) and (strict["declined"], strict["kept"]) == (1.0, 0.5)
    with pytest.raises(ValueError, match="no threshold declines"):
        choose_threshold([("no_target", None), ("explicit", 0.2), ("no_target", 0.9999999)], min_decline=1.0)
    with pytest.raises(ValueError, match="both"):
        choose_threshold([("explicit", 0.5)])


def test_calibrate_gate_writes_the_threshold_it_reports(gated_trained, tiny_checkpoint, tmp_path, capsys):
    from lisa_agent.cli import main

    data = tmp_path / "val"
    assert main(["make-data", "--out", str(data), "--n", "2", "--size", "120x160", "--split", "val"]) == 0
    capsys.readouterr()
    folder = tmp_path / "model"
    shutil.copytree(gated_trained, folder)
    assert main(["calibrate-gate", "--model", str(folder), "--data", str(data), "--write", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_no_target"] == 2 and result["n_with_targets"] >= 8
    written = json.loads((folder / "config.json").read_text())["lisa_agent"]["presence_gate"]["threshold"]
    assert written == result["threshold"] and 0 < written < 1
    best = max((r["declined"] + r["kept"]) / 2 for r in result["table"])
    assert (result["declined"] + result["kept"]) / 2 == best
    assert LisaSegmenter.from_pretrained(folder).info()["presence_threshold"] == written
    # checkpoints without a presence head are refused, naming the reason
    assert main(["calibrate-gate", "--model", str(tiny_checkpoint), "--data", str(data)]) == 1
    assert "no presence head" in capsys.readouterr().err


def test_presence_threshold_flag_of_the_model_commands():
    from lisa_agent.cli import build_parser
    from lisa_agent.config import engine_config_from_args

    argv = ["eval", "--model", "m", "--data", "d", "--presence-threshold", "off"]
    assert engine_config_from_args(build_parser(argv).parse_args(argv)).presence_threshold is None
    argv[-1] = "0.3"
    assert engine_config_from_args(build_parser(argv).parse_args(argv)).presence_threshold == 0.3
    argv[-1] = "high"
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(argv)


def test_freeze_llm_keeps_the_answers_and_trains_the_mask_side(tiny_checkpoint, tmp_path):
    seg = LisaSegmenter.from_pretrained(tiny_checkpoint)
    cfg = TrainConfig(method="full", steps=2, lr=5e-2, warmup=1, scenes_per_batch=1, val_every=0, save_every=0,
                      presence_weight=1.0, freeze_llm=True)
    trainer = Trainer(seg, tiny_checkpoint, tmp_path / "fl", cfg, log=lambda *a: None)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if n.startswith(("llm.", "mm_projector.", "vision."))}
    decoder = trainer.model.sam.mask_decoder.iou_prediction_head.layers[-1].weight.detach().clone()
    fcs = trainer.model.text_hidden_fcs[0][2].weight.detach().clone()
    trainer.fit(synthetic_scenes("train", 0, ((96, 128),), absent_seg=1), progress=False)
    params = dict(trainer.model.named_parameters())
    assert frozen and all(torch.equal(v, params[n]) for n, v in frozen.items())
    assert not torch.equal(decoder, trainer.model.sam.mask_decoder.iou_prediction_head.layers[-1].weight)
    assert not torch.equal(fcs, trainer.model.text_hidden_fcs[0][2].weight)
