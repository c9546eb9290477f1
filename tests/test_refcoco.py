"""The RefCOCO layout: the restricted unpickler, COCO masks, the split reader against the ReasonSeg layout of
the same queries, ``eval --split refcoco|unc|val`` with tabletop-tiny, and errors that name what is missing."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lisa_agent.cli import main
from lisa_agent.data.coco_masks import decode_segmentation, mask_to_polygons, mask_to_segmentation
from lisa_agent.data.plain_pickle import load_plain_pickle
from lisa_agent.data.reasonseg import iter_samples, lisa_eval_prompt
from lisa_agent.data.refcoco import ReferDataset, ReferSplit, open_refer_split, split_matches
from lisa_agent.data.tabletop import render_scene, split_seed
from lisa_agent.errors import DatasetError, UnsafePickleError
from lisa_agent.evaluation.metrics import intersection_union

N_SCENES = 3
SIZE = "96x128"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> tuple[Path, Path]:
    """The same val scenes and referring queries twice: RefCOCO layout (+ a train split) and ReasonSeg layout."""
    root = tmp_path_factory.mktemp("layouts")
    refcoco, reasonseg = root / "refcoco_data", root / "reasonseg_data"
    common = ["--n", str(N_SCENES), "--size", SIZE, "--split", "val"]
    assert main(["make-data", "--format", "refcoco", "--out", str(refcoco), *common]) == 0
    assert main(["make-data", "--format", "refcoco", "--out", str(refcoco), "--n", "2", "--size", SIZE,
                 "--split", "train"]) == 0
    assert main(["make-data", "--queries", "referring", "--out", str(reasonseg / "val"), *common]) == 0
    return refcoco, reasonseg


# ------------------------------------------------------------------ the restricted unpickler


class _RunsCode:
    """What a crafted refs file holds: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_unpickler_refuses_a_pickle_that_calls_a_function(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "payload": _RunsCode(marker)}], protocol=protocol))
    with pytest.raises(UnsafePickleError) as info:
        load_plain_pickle(path)
    assert info.value.code == "unsafe_pickle"
    assert "system" in str(info.value) and "refused" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()  # nothing ran
    # the same bytes through pickle.load would have run it: the test's crafted file is real
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_unpickler_refuses_classes_and_persistent_ids(tmp_path):
    path = tmp_path / "p.p"
    path.write_bytes(pickle.dumps([Path("x")], protocol=2))  # a class, even a harmless one
    with pytest.raises(UnsafePickleError, match="pathlib"):
        load_plain_pickle(path)
    path.write_bytes(b"(lp0\nPsomething\na.")  # protocol 0 persistent id
    with pytest.raises(UnsafePickleError, match="persistent"):
        load_plain_pickle(path)


def _py2_pickle(value) -> bytes:  # noqa: ANN001
    """``value`` as Python 2's ``pickle.dump(value, f)`` (protocol 0) writes it: byte strings as STRING."""
    if isinstance(value, dict):
        return b"(" + b"".join(_py2_pickle(k) + _py2_pickle(v) for k, v in value.items()) + b"d"
    if isinstance(value, list):
        return b"(" + b"".join(_py2_pickle(v) for v in value) + b"l"
    if isinstance(value, set):
        return b"c__builtin__\nset\n(" + _py2_pickle(sorted(value)) + b"tR"
    if isinstance(value, str):
        return b"S" + repr(value).encode() + b"\n"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(value)
    return (b"I%d\n" % value) if isinstance(value, int) else (b"F" + repr(value).encode() + b"\n")


#: One ref as the real refcoco refs(unc).p holds it (values from its first train ref, tokens shortened).
REAL_REF = {"sent_ids": [0, 1, 2], "file_name": "COCO_train2014_000000581857_16.jpg", "ann_id": 1719310,
            "ref_id": 0, "image_id": 581857, "split": "train", "category_id": 1,
            "sentences": [{"tokens": ["the", "lady", "with", "the", "blue", "shirt"], "raw": "THE LADY WITH THE BLUE SHIRT",
                           "sent_id": 0, "sent": "the lady with the blue shirt"},
                          {"tokens": ["lady", "w", "back", "to", "us"], "raw": "lady w back to us", "sent_id": 1,
                           "sent": "lady w back to us"},
                          {"tokens": ["blue", "shirt"], "raw": "blue shirt", "sent_id": 2, "sent": "blue shirt"}]}


def test_unpickler_reads_the_real_files_shape(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(_py2_pickle([REAL_REF, {**REAL_REF, "ref_id": 1, "tags": {"a", "b"}}]) + b".")
    refs = load_plain_pickle(path)
    assert refs[0] == REAL_REF and refs[1]["tags"] == {"a", "b"}
    assert [s["sent"] for s in refs[0]["sentences"]] == ["the lady with the blue shirt", "lady w back to us",
                                                         "blue shirt"]
    path.write_bytes(pickle.dumps([REAL_REF], protocol=2))  # what our writer writes
    assert load_plain_pickle(path) == [REAL_REF]


def test_a_crafted_refs_file_fails_eval_with_one_line_and_runs_nothing(tmp_path, capsys):
    folder = tmp_path / "refer_seg" / "refcoco"
    folder.mkdir(parents=True)
    marker = tmp_path / "ran"
    (folder / "refs(unc).p").write_bytes(pickle.dumps([_RunsCode(marker)], protocol=2))
    (folder / "instances.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    rc = main(["eval", "--data", str(tmp_path), "--split", "refcoco|unc|val"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "refused" in err and "refs(unc).p" in err
    assert not marker.exists()


# ------------------------------------------------------------------ COCO masks


def test_polygons_and_rle_give_the_masks_back_exactly():
    for i in range(6):
        scene = render_scene(split_seed("val", i), size=(96, 128) if i % 2 else None)
        for obj in scene.objects:
            for fmt in ("polygon", "rle"):
                seg = mask_to_segmentation(obj.mask, fmt)
                assert np.array_equal(decode_segmentation(seg, *obj.mask.shape), obj.mask.astype(np.uint8))
    # two regions touching at one corner: one outline, still exact
    m = np.zeros((6, 6), bool)
    m[1:3, 1:3] = m[3:5, 3:5] = True
    assert len(mask_to_polygons(m)) == 1
    assert np.array_equal(decode_segmentation(mask_to_segmentation(m), 6, 6), m.astype(np.uint8))
    ring = np.ones((7, 7), bool)
    ring[3, 3] = False
    with pytest.raises(ValueError, match="holes"):
        mask_to_segmentation(ring, "polygon")
    assert np.array_equal(decode_segmentation(mask_to_segmentation(ring, "rle"), 7, 7), ring.astype(np.uint8))


def _lisa_intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """LISA's intersectionAndUnionGPU(pred, gt, K=2, ignore_index=255), class 1, written from its code."""
    output, target = torch.from_numpy(pred.astype(np.int64)).view(-1).float(), torch.from_numpy(gt.astype(np.int64)).view(-1).float()
    output[target == 255] = 255
    inter = output[output == target]
    area_i = torch.histc(inter, bins=2, min=0, max=1)
    area_o, area_t = torch.histc(output, bins=2, min=0, max=1), torch.histc(target, bins=2, min=0, max=1)
    return int(area_i[1]), int((area_o + area_t - area_i)[1])


def test_overlapping_parts_are_summed_and_scored_as_lisa_scores_them():
    # two polygons of one annotation overlap: LISA sums the decoded parts, so the overlap holds 2, which its
    # scoring (histc over classes 0..1) treats as background
    seg = [[1, 1, 5, 1, 5, 5, 1, 5], [3, 3, 7, 3, 7, 7, 3, 7]]
    gt = decode_segmentation(seg, 8, 8)
    assert gt.max() == 2 and (gt == 2).sum() == 4 and (gt == 1).sum() == 24
    rng = np.random.default_rng(0)
    for _ in range(5):
        pred = rng.random((8, 8)) < 0.5
        assert intersection_union(pred, gt) == _lisa_intersection_union(pred, gt)


# ------------------------------------------------------------------ split strings


def test_split_strings_and_refer_selection_rules():
    assert ReferSplit.parse("refcoco+|unc|testA") == ReferSplit("refcoco+", "unc", "testA")
    assert str(ReferSplit.parse("refcocog|umd|test")) == "refcocog|umd|test"
    for bad, words in (("refcoco|val", "ReasonSeg form"), ("refcoco|unc|val|x", "DATASET|SPLITBY|SPLIT"), ("grefcoco|unc|val", "unknown referring dataset"),
                       ("refcoco|unc|dev", "unknown split 'dev'"), ("refcoco||val", "DATASET|SPLITBY|SPLIT")):
        with pytest.raises(DatasetError, match=words.replace("|", r"\|")):
            ReferSplit.parse(bad)
    assert split_matches("testA", "testA") and split_matches("testAB", "testA") and split_matches("testB", "test")
    assert not split_matches("testB", "testA") and not split_matches("train", "val")
    assert split_matches("testAB", "testAB") and not split_matches("testA", "testAB")


# ------------------------------------------------------------------ the reader against the ReasonSeg layout


def _queries(samples) -> dict[tuple[bytes, str], np.ndarray]:  # noqa: ANN001
    out = {}
    for s in samples:
        for q in s.queries:
            out[s.image.tobytes(), lisa_eval_prompt(q.text, q.is_sentence)] = q.gt
    return out


def test_both_refcoco_layouts_read_the_queries_and_masks_of_the_reasonseg_layout(layouts):
    refcoco, reasonseg = layouts
    theirs = _queries(iter_samples(reasonseg / "val"))
    for data in (refcoco, refcoco / "refer_seg"):  # LISA's README layout, and the folder LISA's validation reads
        split = open_refer_split(data, "refcoco|unc|val")
        assert split.n_refs == sum(len(render_scene(split_seed("val", i), size=(96, 128)).objects)
                                   for i in range(N_SCENES))
        ours = _queries(split.samples())
        assert len(ours) == len(theirs) == split.n_queries
        assert ours.keys() == theirs.keys()  # same pixels, same prompts ("What is ... in this image? ...")
        for key, gt in ours.items():
            assert np.array_equal(gt, theirs[key])
    assert all(q.subset == "val" for s in open_refer_split(refcoco, "refcoco|unc|val").samples() for q in s.queries)
    # the train split written into the same folder is there too, and only its refs are selected
    ds = ReferDataset.open(refcoco, "refcoco", "unc")
    assert ds.split_names() == ["train", "val"] and {r["split"] for r in ds.refs_of("train")} == {"train"}


def test_make_data_replaces_a_split_and_keeps_the_others(tmp_path):
    out = str(tmp_path)
    assert main(["make-data", "--format", "refcoco", "--out", out, "--n", "2", "--size", "64x80", "--split", "val"]) == 0
    assert main(["make-data", "--format", "refcoco", "--out", out, "--n", "1", "--size", "64x80", "--split", "test",
                 "--segmentation", "rle", "--sentences", "1"]) == 0
    assert main(["make-data", "--format", "refcoco", "--out", out, "--n", "1", "--size", "64x80", "--split", "val"]) == 0
    ds = ReferDataset.open(tmp_path, "refcoco", "unc")
    assert {int(r["image_id"]) for r in ds.refs_of("val")} == {split_seed("val", 0)}
    assert {int(r["image_id"]) for r in ds.refs_of("test")} == {split_seed("test", 0)}
    assert set(ds.images) == {split_seed("val", 0), split_seed("test", 0)}
    assert all(len(r["sentences"]) == 1 for r in ds.refs_of("test"))
    assert all(isinstance(ds.anns[int(r["ann_id"])]["segmentation"][0], dict) for r in ds.refs_of("test"))


# ------------------------------------------------------------------ eval with tabletop-tiny


def test_eval_refcoco_split_equals_the_reasonseg_layout_of_the_same_queries(layouts, tmp_path, capsys):
    refcoco, reasonseg = layouts
    assert main(["eval", "--data", str(refcoco), "--split", "refcoco|unc|val", "--json",
                 "--out", str(tmp_path / "refcoco.json")]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(["eval", "--data", str(reasonseg), "--split", "val", "--json"]) == 0
    rs = json.loads(capsys.readouterr().out)
    assert ref["model"]["model"] == "tabletop-tiny" and ref["answer"] == "forced"
    assert ref["n"] == rs["n"] > 0 and ref["images"] == rs["images"] == N_SCENES
    assert abs(ref["cIoU"] - rs["cIoU"]) <= 1e-6 and abs(ref["gIoU"] - rs["gIoU"]) <= 1e-6
    assert (ref["intersection"], ref["union"]) == (rs["intersection"], rs["union"]) and ref["union"] > 0
    assert ref["intersection"] / ref["union"] == pytest.approx(ref["cIoU"], abs=1e-4)
    # one report shape: the split as the one subset, with its counts
    assert ref["split"] == "refcoco|unc|val" and ref["refs"] > 0 and ref["data"].endswith("refer_seg")
    assert list(ref["subsets"]) == ["val"] and ref["subsets"]["val"]["n"] == ref["n"]
    assert ref["subsets"]["val"]["mode"] == "fast"
    assert json.loads((tmp_path / "refcoco.json").read_text())["n"] == ref["n"]
    assert main(["eval", "--data", str(refcoco), "--split", "refcoco|unc|val", "--limit", "3"]) == 0
    table = capsys.readouterr().out
    assert "split refcoco|unc|val" in table and " refs" in table and table.splitlines()[1].startswith("val")


def test_eval_names_what_is_missing(layouts, tmp_path, capsys):
    refcoco, _ = layouts

    def one_line(*argv: str) -> str:
        assert main(["eval", *argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return err

    assert "unknown referring dataset 'refcocox'" in one_line("--data", str(refcoco), "--split", "refcocox|unc|val")
    assert "unknown --split 'dev'" in one_line("--data", str(refcoco), "--split", "dev")
    err = one_line("--data", str(refcoco), "--split", "refcoco|google|val")
    assert "missing" in err and "refs(google).p" in err and "refs(unc).p" in err  # says what the folder has
    err = one_line("--data", str(refcoco), "--split", "refcoco|unc|testA")
    assert "no refs in split 'testA'" in err and "train, val" in err
    assert "no refcoco+/ folder" in one_line("--data", str(refcoco), "--split", "refcoco+|unc|val")
    broken = tmp_path / "broken"
    shutil.copytree(refcoco, broken)
    image = broken / "refer_seg/images/mscoco/images/train2014" / f"COCO_train2014_{split_seed('val', 1):012d}.jpg"
    image.unlink()
    assert f"missing image {image} (1 of the {N_SCENES} images" in one_line("--data", str(broken), "--split",
                                                                           "refcoco|unc|val")
    (broken / "refer_seg/refcoco/instances.json").unlink()
    assert "instances.json" in one_line("--data", str(broken), "--split", "refcoco|unc|val")

