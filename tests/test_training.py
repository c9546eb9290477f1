"""Training: LISA's losses, a few real optimizer steps, checkpoints the loader reads, LoRA merge, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import random_frame

from lisa_agent import LisaSegmenter
from lisa_agent.training.batches import synthetic_scenes
from lisa_agent.training.losses import dice, sigmoid_bce
from lisa_agent.training.trainer import TrainConfig, Trainer


def test_bce_and_dice_by_hand():
    logits = torch.tensor([[[0.0, 2.0], [-2.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    p = torch.sigmoid(logits)
    expected_bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert sigmoid_bce(logits, target).item() == pytest.approx(expected_bce.item(), rel=1e-6)  # one mask
    expected_dice = 1 - (2 * (p * target).sum() / 1000 + 1e-6) / ((p.sum() + target.sum()) / 1000 + 1e-6)
    assert dice(logits, target).item() == pytest.approx(expected_dice.item(), rel=1e-5)
    # ignored pixels do not count
    valid = torch.tensor([[[True, True], [False, False]]])
    assert sigmoid_bce(logits, target, valid).item() == pytest.approx(
        -(torch.log(p[0, 0, 0]) + torch.log(p[0, 0, 1])).item() / 2, rel=1e-6)
    perfect = torch.tensor([[[20.0, 20.0], [-20.0, -20.0]]])
    assert dice(perfect, target).item() == pytest.approx(0.0, abs=1e-4)


def _trainer(checkpoint, out, method, steps=4, lr=1e-3, freeze_vision=False):
    seg = LisaSegmenter.from_pretrained(checkpoint)
    cfg = TrainConfig(method=method, steps=steps, lr=lr, warmup=1, scenes_per_batch=1, val_every=0, save_every=0,
                      freeze_vision=freeze_vision)
    return Trainer(seg, checkpoint, out, cfg, log=lambda *a: None)


def _scenes():
    return synthetic_scenes("train", 0, ((96, 128),))


def test_full_training_steps_and_the_checkpoint_round_trip(tiny_checkpoint, tmp_path):
    trainer = _trainer(tiny_checkpoint, tmp_path / "out", "full", steps=3)
    before = trainer.model.text_hidden_fcs[0][2].weight.detach().clone()
    history = trainer.fit(_scenes(), progress=False)
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    assert {"ce", "bce", "dice"} <= set(history[0])
    assert not torch.equal(before, trainer.model.text_hidden_fcs[0][2].weight)
    out = trainer.save()
    assert (out / "pytorch_model.bin.index.json").is_file() and (out / "vision_tower" / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["lisa_agent"]["trained_steps"] == 3
    frame = random_frame(64, 80, seed=2)
    mine = trainer.inference_segmenter().segment(frame, "the red mug", return_logits=True)
    loaded = LisaSegmenter.from_pretrained(out).segment(frame, "the red mug", return_logits=True)
    np.testing.assert_allclose(loaded.logits, mine.logits, atol=1e-4)


def test_lora_trains_only_the_recipe_and_merges_exactly(tiny_checkpoint, tmp_path):
    trainer = _trainer(tiny_checkpoint, tmp_path / "lora", "lora", steps=2, lr=5e-2)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and "q_proj" in n for n in trainable)
    assert any("lora_B" in n and "v_proj" in n for n in trainable)
    assert "llm.lm_head.weight" in trainable and "llm.model.embed_tokens.weight" in trainable
    assert any(n.startswith("sam.mask_decoder.") for n in trainable)
    assert any(n.startswith("text_hidden_fcs.") for n in trainable)
    assert not any(n.startswith(("sam.image_encoder.", "sam.prompt_encoder.", "vision.", "mm_projector."))
                   for n in trainable)
    assert not any(n.startswith("llm.") and ("k_proj" in n or ".mlp." in n) for n in trainable)
    trainer.fit(_scenes(), progress=False)
    # LoRA B starts at zero; after steps with a large lr the adapters are non-trivial
    assert any(p.abs().max() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)
    out = trainer.save()
    frame = random_frame(64, 80, seed=3)
    mine = trainer.inference_segmenter().segment(frame, "the red mug", return_logits=True)
    merged = LisaSegmenter.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    theirs = merged.segment(frame, "the red mug", return_logits=True)
    np.testing.assert_allclose(theirs.seg_embeddings, mine.seg_embeddings, atol=1e-4)
    np.testing.assert_allclose(theirs.logits, mine.logits, atol=1e-3)


def test_freeze_vision_keeps_the_clip_tower_and_trains_the_rest(tiny_checkpoint, tmp_path):
    trainer = _trainer(tiny_checkpoint, tmp_path / "fz", "full", steps=2, lr=5e-2, freeze_vision=True)
    tower = {k: v.clone() for k, v in trainer.model.vision.state_dict().items()}
    projector = trainer.model.mm_projector.weight.detach().clone()
    trainer.fit(_scenes(), progress=False)
    assert all(torch.equal(tower[k], v) for k, v in trainer.model.vision.state_dict().items())
    assert not torch.equal(projector, trainer.model.mm_projector.weight)


def test_resume_continues_the_step_count(tiny_checkpoint, tmp_path):
    first = _trainer(tiny_checkpoint, tmp_path / "r", "full", steps=2)
    first.fit(_scenes(), progress=False)
    first.save()
    second = _trainer(tiny_checkpoint, tmp_path / "r", "full", steps=3)
    second.resume(tmp_path / "r" / "trainer_state.pt")
    assert second.step == 2
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    second.fit(_scenes(), progress=False)
    assert second.step == 3 and len(second.history) == 3


def test_finetune_command(tiny_checkpoint, tmp_path, capsys):
    from lisa_agent.cli import main

    data = tmp_path / "data"
    assert main(["make-data", "--out", str(data), "--n", "2", "--size", "96x128", "--split", "val"]) == 0
    capsys.readouterr()
    rc = main(["finetune", "--model", str(tiny_checkpoint), "--data", str(data), "--out", str(tmp_path / "ft"),
               "--lora", "--steps", "2", "--warmup", "1", "--scenes-per-batch", "1", "--no-progress",
               "--val-data", str(data), "--val-every", "0"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and "gIoU" in summary["val"]
    assert LisaSegmenter.from_pretrained(tmp_path / "ft").info()["seg_token_id"] >= 0


def test_named_answers_put_the_target_name_before_each_seg():
    from lisa_agent.training.batches import named_answer

    assert named_answer("Sure, [SEG].", ["red mug"]) == "Sure, the red mug [SEG]."
    assert (named_answer("Sure, [SEG] and [SEG].", ["knife", "green apple"])
            == "Sure, the knife [SEG] and the green apple [SEG].")
    assert named_answer("Sure, [SEG]. It has a sharp blade.", ["knife"]) == "Sure, the knife [SEG]. It has a sharp blade."
    with pytest.raises(ValueError):
        named_answer("Sure, [SEG].", ["a", "b"])
    scene = next(synthetic_scenes("train", 0, ((96, 128),), named_prob=1.0))
    for ex in scene.examples:
        assert ex.answer.count("[SEG]") == len(ex.masks)
        if len(ex.masks):
            assert "the " in ex.answer.split("[SEG]")[0]


def test_named_colour_needed_names_the_colour_only_when_the_category_repeats():
    from lisa_agent.data.queries import short_name
    from lisa_agent.data.tabletop import render_scene, split_seed

    # find a training scene with two objects of one category and check both naming modes on it
    for index in range(200):
        scene = render_scene(split_seed("train", index, 0), size=(96, 128))
        cats = [o.category for o in scene.objects]
        if len(set(cats)) < len(cats):
            break
    else:
        pytest.fail("no scene with a repeated category in 200 seeds")
    for i, obj in enumerate(scene.objects):
        expected = obj.name() if cats.count(obj.category) > 1 else obj.category
        assert short_name(scene, i) == expected
    seen_plain = 0
    for named_colour in ("needed", "always"):
        first = next(synthetic_scenes("train", 3, ((96, 128),), named_prob=1.0, named_colour=named_colour))
        for ex in first.examples:
            for part in ex.answer.split("[SEG]")[:-1]:
                name = part.rsplit("the ", 1)[-1].split()
                if named_colour == "always":
                    assert len(name) == 2, ex.answer
                else:
                    seen_plain += len(name) == 1
    assert seen_plain > 0  # "needed" drops the colour of categories that appear once
    with pytest.raises(ValueError, match="named_colour"):
        next(synthetic_scenes("train", 0, named_colour="sometimes"))


def test_presence_curriculum_follows_the_step_of_each_scene():
    it = synthetic_scenes("train", 1, ((96, 128),), no_target=0, presence=3, presence_curriculum=(2,),
                          scenes_per_step=2)
    early = [next(it) for _ in range(4)]  # steps 0-1: only book / ball
    late = [next(it) for _ in range(40)]  # step 2 on: any category or use

    def asked(scs):
        return [e.prompt_text for s in scs for e in s.examples if e.prompt_text.startswith("Is there")]

    assert asked(early) and all(q in ("Is there a book in this image?", "Is there a ball in this image?")
                                for q in asked(early))
    assert any("book" not in q and "ball" not in q for q in asked(late))


def test_finetune_rejects_a_bad_presence_curriculum(tiny_checkpoint, tmp_path, capsys):
    from lisa_agent.cli import main

    assert main(["finetune", "--model", str(tiny_checkpoint), "--data", "synthetic", "--out", str(tmp_path / "x"),
                 "--presence-curriculum", "600,300"]) != 0
    assert "--presence-curriculum" in capsys.readouterr().err


def test_describe_and_presence_questions_train_without_masks():
    scene = next(synthetic_scenes("train", 1, ((96, 128),), describe=2, presence=3))
    described = [ex for ex in scene.examples if ex.answer.startswith("There is ")]
    asked = [ex for ex in scene.examples if ex.prompt_text.startswith("Is there ")]
    assert len(described) == 2 and len(asked) == 3
    assert all(ex.masks.shape == (0, 96, 128) and "[SEG]" not in ex.answer for ex in described + asked)
