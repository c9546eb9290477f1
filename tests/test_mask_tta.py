"""Mask test-time augmentation (ours): SAM also reads mirrored views of the frame, and the views' mask
and score logits, flipped back, are averaged. The mechanics here, on the tiny random-weight checkpoint;
what it buys the bundled model is measured in its model card, and the bundled model's bars (with the
augmentation its config declares) are asserted in test_tabletop_model.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import random_frame

from lisa_agent import LisaSegmenter
from lisa_agent.cli import main
from lisa_agent.config import MASK_TTA_VIEWS
from lisa_agent.errors import CheckpointError, InvalidArgumentError
from lisa_agent.training.trainer import TrainConfig, Trainer

QUERY = "the red mug"


def _with_tta(seg: LisaSegmenter, mask_tta: str) -> LisaSegmenter:
    """Another engine on the same weights, with ``mask_tta``."""
    return LisaSegmenter(seg.model, seg.tokenizer, template=seg.template.name,
                         use_im_start_end=seg.use_im_start_end, mask_tta=mask_tta)


def test_published_checkpoints_run_without_augmentation(tiny_segmenter):
    assert tiny_segmenter.mask_tta == "off" and tiny_segmenter.info()["mask_tta"] == "off"
    assert tiny_segmenter.encode(random_frame(60, 90, seed=2)).sam_embedding.shape[0] == 1


def test_sam_reads_the_mirrored_frames(tiny_segmenter):
    frame = random_frame(60, 90, seed=3)  # not square: the letterbox pads the bottom of every view
    emb = _with_tta(tiny_segmenter, "flips").encode(frame).sam_embedding
    assert emb.shape[0] == 4
    for k, (rows, cols) in enumerate(MASK_TTA_VIEWS["flips"]):
        view = np.ascontiguousarray(frame[:: -1 if rows else 1, :: -1 if cols else 1])
        expected = tiny_segmenter.encode(view).sam_embedding[0]
        np.testing.assert_allclose(emb[k].numpy(), expected.numpy(), atol=1e-5)


def test_a_mirror_symmetric_frame_gets_the_mean_of_its_mask_and_the_mask_mirrored(tiny_segmenter):
    # every view of a frame that is its own mirror image is the frame itself, so each view decodes to the
    # frame's own logits L; flipped back and averaged they must give (L + L mirrored) / 2, a symmetric mask
    half = random_frame(64, 40, seed=7)
    frame = np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1))
    plain = tiny_segmenter.segment(frame, QUERY, return_logits=True)
    logits = plain.logits[0]
    assert not np.allclose(logits, logits[:, ::-1], atol=1e-3)  # the model alone is not symmetric
    tta = _with_tta(tiny_segmenter, "hflip").segment(frame, QUERY, return_logits=True)
    assert tta.text == plain.text
    np.testing.assert_allclose(tta.logits[0], (logits + logits[:, ::-1]) / 2, atol=1e-4)
    np.testing.assert_array_equal(tta.masks[0], tta.masks[0][:, ::-1])
    assert tta.instances[0].score == pytest.approx(plain.instances[0].score, abs=1e-5)

    quarter = random_frame(32, 40, seed=8)
    top = np.concatenate([quarter, quarter[:, ::-1]], axis=1)
    frame = np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))
    logits = tiny_segmenter.segment(frame, QUERY, return_logits=True).logits[0]
    tta = _with_tta(tiny_segmenter, "flips").segment(frame, QUERY, return_logits=True)
    expected = (logits + logits[:, ::-1] + logits[::-1] + logits[::-1, ::-1]) / 4
    np.testing.assert_allclose(tta.logits[0], expected, atol=1e-4)


def test_every_mode_and_batched_queries_use_the_augmentation(tiny_segmenter):
    frame = random_frame(48, 64, seed=9)
    tta = _with_tta(tiny_segmenter, "hflip")
    fast = tta.segment(frame, QUERY, return_logits=True)
    (batched,) = tta.segment_batch(frame, [QUERY], return_logits=True)
    chat = tta.segment(frame, QUERY, mode="chat", return_logits=True)
    plain = tiny_segmenter.segment(frame, QUERY, return_logits=True)
    np.testing.assert_allclose(batched.logits, fast.logits, atol=1e-5)
    assert not np.allclose(fast.logits, plain.logits, atol=1e-3)
    assert chat.logits.shape[1:] == (48, 64) and len(chat.instances) == chat.text.count("[SEG]")


def test_the_checkpoint_declares_it_and_callers_override_or_are_told_what_is_wrong(tiny_checkpoint, tmp_path):
    folder = tmp_path / "declared"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("lisa_agent", {})["mask_tta"] = "hflip"
    (folder / "config.json").write_text(json.dumps(config))
    assert LisaSegmenter.from_pretrained(folder).mask_tta == "hflip"
    assert LisaSegmenter.from_pretrained(folder, mask_tta="off").mask_tta == "off"
    assert LisaSegmenter.from_pretrained(tiny_checkpoint, mask_tta="flips").mask_tta == "flips"
    with pytest.raises(InvalidArgumentError, match="mask_tta must be one of checkpoint, off, hflip, flips; got 'rotate'"):
        LisaSegmenter.from_pretrained(tiny_checkpoint, mask_tta="rotate")
    config["lisa_agent"]["mask_tta"] = "sideways"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: lisa_agent.mask_tta must be one of .*got 'sideways'"):
        LisaSegmenter.from_pretrained(folder)

    # fine-tuning keeps the source's setting (an inference choice of the checkpoint, like its template)
    config["lisa_agent"]["mask_tta"] = "flips"
    (folder / "config.json").write_text(json.dumps(config))
    seg = LisaSegmenter.from_pretrained(folder, mask_tta="off")
    trainer = Trainer(seg, folder, tmp_path / "tuned", TrainConfig(method="full", steps=1, val_every=0, save_every=0),
                      log=lambda *a: None)
    out = trainer.save()
    assert json.loads((out / "config.json").read_text())["lisa_agent"]["mask_tta"] == "flips"


def test_the_command_line_takes_mask_tta(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    frame = random_frame(60, 90, seed=4)
    Image.fromarray(frame).save(tmp_path / "frame.png")
    args = ["segment", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "frame.png"), "--query", QUERY,
            "--json"]
    assert main([*args, "--mask-tta", "hflip"]) == 0
    area = json.loads(capsys.readouterr().out)["masks"][0]["area"]
    expected = _with_tta(LisaSegmenter.from_pretrained(tiny_checkpoint), "hflip").segment(frame, QUERY)
    assert area == expected.instances[0].area
    with pytest.raises(SystemExit) as exc:
        main([*args, "--mask-tta", "rotate"])
    assert exc.value.code == 2 and "invalid choice: 'rotate'" in capsys.readouterr().err
