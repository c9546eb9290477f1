"""Fine-tuning on referring data: LISA's referring samples from the RefCOCO layout, sources mixed at
LISA-style sampling rates, and a short ``finetune`` run on RefCOCO + ReasonSeg layouts that lowers the loss
and saves a checkpoint that loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lisa_agent.cli import main
from lisa_agent.data.refcoco import ReferDataset, open_refer_split

SIZE = "96x128"


@pytest.fixture(scope="module")
def refcoco(tmp_path_factory) -> Path:
    """A synthetic RefCOCO-layout folder with a train split (3 scenes) and a val split (1 scene)."""
    root = tmp_path_factory.mktemp("refcoco")
    assert main(["make-data", "--format", "refcoco", "--out", str(root), "--n", "3", "--size", SIZE,
                 "--split", "train"]) == 0
    assert main(["make-data", "--format", "refcoco", "--out", str(root), "--n", "1", "--size", SIZE,
                 "--split", "val"]) == 0
    return root



def test_refer_source_draws_train_samples_as_lisa_does(refcoco):
    from lisa_agent.training.batches import ANSWER_TEMPLATES, SHORT_QUESTION_TEMPLATES, ReferSource

    source = ReferSource(str(refcoco))  # finds refcoco under refer_seg/ by itself
    assert source.datasets == ["refcoco"]
    ds = ReferDataset.open(refcoco, "refcoco", "unc")
    train = ds.by_image(ds.refs_of("train"))
    by_image = {ds.load_image(i).tobytes(): (i, refs) for i, refs in train.items()}
    scenes = source.scenes(seed=3)
    for _ in range(12):
        sample = next(scenes)
        image_id, refs = by_image[sample.image.tobytes()]  # a train image, read whole
        sentences = {s["sent"]: int(r["ann_id"]) for r in refs for s in r["sentences"]}
        assert 1 <= len(sample.examples) <= 3
        for ex in sample.examples:
            matches = [(t, s) for t in SHORT_QUESTION_TEMPLATES for s in sentences
                       if ex.prompt_text == t.format(class_name=s)]
            assert len(matches) == 1, ex.prompt_text
            assert ex.answer in ANSWER_TEMPLATES
            assert np.array_equal(ex.masks, ds.mask(sentences[matches[0][1]])[None] > 0)


def test_mixed_scenes_draw_each_source_at_its_rate():
    from itertools import repeat

    from lisa_agent.training.batches import TrainingImage, mixed_scenes

    a, b = TrainingImage(np.zeros((2, 2, 3), np.uint8), []), TrainingImage(np.ones((2, 2, 3), np.uint8), [])
    only_a = mixed_scenes([repeat(a), repeat(b)], [1, 0], seed=1)
    assert all(next(only_a) is a for _ in range(50))
    draws = mixed_scenes([repeat(a), repeat(b)], [3, 1], seed=1)
    share = sum(next(draws) is a for _ in range(2000)) / 2000
    assert 0.72 < share < 0.78
    with pytest.raises(ValueError):
        next(mixed_scenes([repeat(a)], [1, 1]))


def test_finetune_refuses_bad_mixtures_before_loading(refcoco, tmp_path, capsys):
    base = ["finetune", "--model", "tabletop-tiny", "--out", str(tmp_path / "o"), "--steps", "1"]
    assert main([*base, "--data", f"refer_seg:{refcoco}||synthetic", "--sample-rates", "1,2,3"]) == 1
    assert "one per --data source" in capsys.readouterr().err
    assert main([*base, "--data", f"refer_seg:{tmp_path / 'none'}"]) == 1
    assert "no referring dataset" in capsys.readouterr().err
    assert main([*base, "--data", f"refer_seg:{refcoco}", "--refer-seg-data", "refcocog"]) == 1
    assert "no refcocog/ folder" in capsys.readouterr().err
    assert main([*base, "--data", "synthetic", "--val-data", str(refcoco), "--val-split", "refcoco|unc|testB"]) == 1
    assert "no refs in split 'testB'" in capsys.readouterr().err


def _fixed_loss(model, batch_scenes) -> float:  # noqa: ANN001
    from lisa_agent import LisaSegmenter
    from lisa_agent.training.batches import collate
    from lisa_agent.training.trainer import TrainConfig, Trainer

    seg = LisaSegmenter.from_pretrained(model, dtype="fp32", device="cpu")
    trainer = Trainer(seg, Path("unused"), Path("unused"), TrainConfig(method="full"), log=lambda *a: None)
    trainer.model.eval()
    batch = collate(batch_scenes, seg.tokenizer, seg.template.name, seg.use_im_start_end, seg.sam_size,
                    seg.clip_size, seg.seg_token_id)
    with torch.no_grad():
        return trainer.loss(batch)[0].item()


def test_finetune_on_refcoco_and_reasonseg_lowers_the_loss_and_saves_a_checkpoint_that_loads(refcoco, tmp_path,
                                                                                              capsys):
    from lisa_agent import LisaSegmenter
    from lisa_agent.training.batches import ReferSource, folder_scenes

    reasonseg = tmp_path / "reasonseg_train"
    assert main(["make-data", "--out", str(reasonseg), "--n", "2", "--size", SIZE, "--split", "train",
                 "--seed", "7"]) == 0
    capsys.readouterr()
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", "tabletop-tiny", "--data", f"refer_seg:{refcoco}||reason_seg:{reasonseg}",
               "--sample-rates", "3,1", "--out", str(out), "--lora", "--steps", "12", "--warmup", "1", "--lr", "1e-3",
               "--scenes-per-batch", "1", "--save-every", "0", "--no-progress", "--val-data", str(refcoco),
               "--val-split", "refcoco|unc|val", "--val-every", "0"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 12
    n_val = open_refer_split(refcoco, "refcoco|unc|val").n_queries
    assert summary["val"]["n"] == summary["val"]["val"]["n"] == n_val and 0.0 <= summary["val"]["gIoU"] <= 1.0
    refer, folder = ReferSource(str(refcoco)).scenes(seed=11), folder_scenes(str(reasonseg), seed=11)
    fixed = [next(refer), next(refer), next(folder)]  # images and queries of the training mixture
    before, after = _fixed_loss("tabletop-tiny", fixed), _fixed_loss(out, fixed)
    assert after < before, (before, after)
    tuned = LisaSegmenter.from_pretrained(out)
    sample = next(open_refer_split(refcoco, "refcoco|unc|train").samples())
    result = tuned.segment(sample.image, sample.queries[0].prompt, mode="fast", answer="[SEG].")
    assert result.masks.shape[1:] == sample.image.shape[:2]
