"""The ReasonSeg layout: LISA's reading rules on a hand-written file, and our generated files read back."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from lisa_agent.cli import main
from lisa_agent.data.queries import queries_for_scene
from lisa_agent.data.reasonseg import (
    DatasetError,
    iter_samples,
    lisa_eval_prompt,
    list_images,
    read_annotation,
    read_sample,
    write_sample,
)
from lisa_agent.data.tabletop import render_scene


def _write_image(path, h=40, w=50):
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 200  # red in RGB
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return img


def _real_style(tmp_path):
    """A json as ReasonSeg ships it: a big target, an ignore region inside it, a tiny target inside that, a flag."""
    _write_image(tmp_path / "abc.jpg")
    doc = {
        "text": ["What could I use to cut the paper?", "something to cut with"],
        "is_sentence": True,
        "shapes": [
            {"label": "flag", "points": [[0, 0], [49, 0], [49, 39], [0, 39]]},
            {"label": "target", "points": [[2.7, 2.2], [30.9, 2.0], [30.5, 30.8], [2.0, 30.0]]},
            {"label": "ignore_blurry", "points": [[10, 10], [20, 10], [20, 20], [10, 20]]},
            {"label": "target", "points": [[14, 14], [16, 14], [16, 16], [14, 16]]},
        ],
        "imagePath": "abc.jpg",
    }
    (tmp_path / "abc.json").write_text(json.dumps(doc))
    return tmp_path / "abc.jpg"


def test_prompt_forms():
    assert lisa_eval_prompt("Grab something to cut with.", True) == "Grab something to cut with. Please output segmentation mask."
    assert lisa_eval_prompt(" the red mug ", False) == "What is the red mug in this image? Please output segmentation mask."


def test_real_reasonseg_json_is_read_as_lisa_reads_it(tmp_path):
    path = _real_style(tmp_path)
    mask, texts, is_sentence = read_annotation(path.with_suffix(".json"), 40, 50)
    assert mask.dtype == np.uint8 and mask.shape == (40, 50)
    assert set(np.unique(mask)) == {0, 1, 255}
    assert mask[39, 49] == 0 and mask[35, 5] == 0  # the flag shape is skipped
    assert mask[5, 5] == 1 and mask[2, 2] == 1  # points cast to int32; the outline counts
    assert mask[12, 12] == 255  # smaller ignore polygon painted over the larger target
    assert mask[15, 15] == 1  # smallest target painted last, over the ignore region
    assert (mask == 255).sum() == 11 * 11 - 3 * 3
    assert texts[1] == "something to cut with" and is_sentence is True

    sample = read_sample(path)
    assert sample.image.shape == (40, 50, 3) and sample.image[0, 0, 0] > 150  # RGB, not BGR
    assert len(sample.queries) == 1  # LISA's validation uses the first text only
    q = sample.queries[0]
    assert q.text == "What could I use to cut the paper?" and q.subset == "long"
    assert np.array_equal(q.gt, mask)
    assert q.target_masks.shape == (1, 40, 50) and np.array_equal(q.target_masks[0], mask == 1)
    assert q.prompt == "What could I use to cut the paper? Please output segmentation mask."
    assert sample.object_masks is None
    assert [x.text for x in read_sample(path, all_texts=True).queries] == [
        "What could I use to cut the paper?", "something to cut with"]


def test_cp1252_json_and_errors(tmp_path):
    _write_image(tmp_path / "x.jpg")
    doc = '{"text": ["the caf\xe9 mug"], "is_sentence": false, "shapes": []}'
    (tmp_path / "x.json").write_bytes(doc.encode("cp1252"))
    q = read_sample(tmp_path / "x.jpg").queries[0]
    assert q.text == "the caf\xe9 mug" and q.subset == "short" and not q.gt.any()
    (tmp_path / "x.json").write_text('{"shapes": []}')
    with pytest.raises(DatasetError, match="not a ReasonSeg annotation"):
        read_sample(tmp_path / "x.jpg")
    with pytest.raises(DatasetError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image"):
        next(iter_samples(tmp_path / "empty"))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_generated_scene_round_trip(tmp_path, fmt):
    scene = render_scene(10_000_001, size=(96, 128))
    queries = queries_for_scene(scene, n_multi=1, n_no_target=1)
    json_path = write_sample(tmp_path, "s1", scene, queries, image_format=fmt, split="val")
    sample = read_sample(json_path.with_suffix(f".{fmt}"))
    if fmt == "png":
        assert np.array_equal(sample.image, scene.image)
    else:
        assert np.abs(sample.image.astype(int) - scene.image).mean() < 6
    assert np.array_equal(sample.object_masks, scene.masks)
    assert sample.object_names == [f"{o.colour} {o.category}" for o in scene.objects]
    assert len(sample.queries) == len(queries)
    for got, want in zip(sample.queries, queries, strict=True):
        assert (got.text, got.is_sentence, got.subset, got.targets, got.answer) == (
            want.text, want.is_sentence, want.subset, want.targets, want.answer)
        assert np.array_equal(got.target_masks, want.masks)
        assert np.array_equal(got.gt, want.gt_mask)
    # LISA's own reader sees an ordinary ReasonSeg sample: the first single-target query
    mask, texts, is_sentence = read_annotation(json_path, *scene.size)
    head = queries[0]
    assert texts == [head.text] and is_sentence == head.is_sentence
    assert np.array_equal(mask, head.gt_mask)


def test_make_data_command_writes_a_readable_split(tmp_path, capsys):
    out = tmp_path / "val"
    assert main(["make-data", "--out", str(out), "--n", "3", "--split", "val", "--size", "64x80", "--seed", "5"]) == 0
    assert "wrote 3 scenes" in capsys.readouterr().out
    images = list_images(out)
    assert [p.name for p in images] == [f"tabletop_{10_000_005 + i:08d}.jpg" for i in range(3)]
    samples = list(iter_samples(out))
    for p, s in zip(images, samples, strict=True):
        seed = int(p.stem.split("_")[1])
        scene = render_scene(seed, size=(64, 80))
        assert s.image.shape == (64, 80, 3)
        assert np.array_equal(s.object_masks, scene.masks)
        subsets = [q.subset for q in s.queries]
        assert subsets.count("multi") == 1 and subsets.count("no_target") == 1
        assert len(s.queries) == len(scene.objects) + 2
    assert main(["make-data", "--out", str(out), "--n", "2", "--size", "banana"]) == 1
    assert "HxW" in capsys.readouterr().err
