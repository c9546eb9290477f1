"""Evaluation over a ReasonSeg-layout split: scripted segmenters with known answers, then the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lisa_agent.cli import main
from lisa_agent.data.queries import queries_for_scene
from lisa_agent.data.reasonseg import iter_samples, lisa_eval_prompt, write_sample
from lisa_agent.data.tabletop import render_scene, split_seed
from lisa_agent.evaluation.evaluate import evaluate, forced_answer
from lisa_agent.result import SegmentationResult

N_SCENES = 4


@pytest.fixture(scope="module")
def split_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tabletop")
    for i in range(N_SCENES):
        scene = render_scene(split_seed("val", i), size=(64, 80))
        write_sample(root / "val", f"s{i}", scene, queries_for_scene(scene), image_format="png", split="val")
    return root


def _n_queries(folder: Path) -> int:
    return sum(len(s.queries) for s in iter_samples(folder))


class Scripted:
    """A segmenter that answers from a table of prompt -> masks, recording every call."""

    def __init__(self, folder: Path, policy: str = "oracle"):
        self.table = {}
        for s in iter_samples(folder):
            for q in s.queries:
                others = [k for k in range(len(s.object_masks)) if k not in q.targets]
                wrong = s.object_masks[others[:1]] if others else np.zeros((0, *q.gt.shape), bool)
                self.table[s.image.tobytes(), lisa_eval_prompt(q.text, q.is_sentence)] = (q.target_masks, wrong)
        self.policy = policy
        self.calls: list[tuple[str, str, str | None]] = []

    def segment(self, image, query, *, mode="fast", answer=None, max_new_tokens=32):
        self.calls.append((query, mode, answer))
        right, wrong = self.table[image.tobytes(), query]
        masks = {"oracle": right, "wrong": wrong if len(right) else right,
                 "always_one": right[:1] if len(right) else wrong}[self.policy]
        if mode == "fast":  # one mask per forced [SEG], as the engine does
            n = answer.count("[SEG]")
            masks = np.concatenate([masks, np.zeros((n, *image.shape[:2]), bool)])[:n]
        text = "Sure, " + " and ".join(["[SEG]"] * len(masks)) + "." if len(masks) else "Sorry, nothing here."
        return SegmentationResult.from_masks(masks, [1.0] * len(masks), text=text, query=query, mode=mode)


def test_oracle_scores_one_everywhere(split_root):
    folder = split_root / "val"
    seg = Scripted(folder)
    report = evaluate(seg, iter_samples(folder))
    n = _n_queries(folder)
    assert report["n"] == n == len(seg.calls)
    assert report["gIoU"] == pytest.approx(1.0, abs=1e-4) and report["cIoU"] == 1.0
    assert set(report["subsets"]) >= {"explicit", "implicit", "multi", "no_target"}
    assert sum(e["n"] for e in report["subsets"].values()) == n
    assert report["subsets"]["multi"]["n"] == N_SCENES and report["subsets"]["no_target"]["n"] == N_SCENES
    assert report["right_object_rate"] == 1.0 and report["no_mask_rate"] == 1.0
    assert report["two_masks_rate"] == 1.0
    assert report["images"] == N_SCENES
    # forced: LISA's "[SEG]." for one target, two [SEG] for two, chat for no-target queries
    modes = {(m, a) for _, m, a in seg.calls}
    assert modes == {("fast", "[SEG]."), ("fast", "[SEG] and [SEG]."), ("chat", None)}
    assert all(q.endswith("Please output segmentation mask.") for q, _, _ in seg.calls)
    assert report["subsets"]["no_target"]["mode"] == "chat" and report["subsets"]["explicit"]["mode"] == "fast"


def test_wrong_object_is_caught(split_root):
    folder = split_root / "val"
    report = evaluate(Scripted(folder, "wrong"), iter_samples(folder), answer="generated")
    assert report["right_object_rate"] == 0.0
    assert report["subsets"]["explicit"]["gIoU"] == 0.0 and report["subsets"]["implicit"]["cIoU"] == 0.0
    assert report["no_mask_rate"] == 1.0  # no-target queries still get no mask


def test_generated_mode_counts_masks(split_root):
    folder = split_root / "val"
    seg = Scripted(folder, "always_one")
    report = evaluate(seg, iter_samples(folder), answer="generated")
    assert {m for _, m, _ in seg.calls} == {"chat"}
    assert report["two_masks_rate"] == 0.0  # one mask for two targets
    assert report["subsets"]["multi"]["gIoU"] == pytest.approx(0.5, abs=1e-4)  # first right, second missing
    assert report["no_mask_rate"] == 0.0  # it segments something that is not there
    assert report["subsets"]["no_target"]["gIoU"] == 0.0
    assert report["one_mask_rate"] == 1.0 and report["right_object_rate"] == 1.0


def test_limit_and_failure_overlays(split_root, tmp_path):
    folder = split_root / "val"
    report = evaluate(Scripted(folder, "wrong"), iter_samples(folder), limit=5, failures_out=tmp_path / "f",
                      n_failures=3, prompt="lisa")
    assert report["n"] == 5 and report["images"] == 1
    files = sorted((tmp_path / "f").glob("*.png"))
    assert len(files) == 3 == len(report["failures"])
    index = json.loads((tmp_path / "f" / "index.json").read_text())
    assert [e["iou"] for e in index] == sorted(e["iou"] for e in index)
    assert all(e["iou"] == 0.0 for e in index)


def test_forced_answer():
    assert forced_answer(1) == "[SEG]." and forced_answer(0) == "[SEG]." and forced_answer(2) == "[SEG] and [SEG]."


def test_engine_runs_the_split(split_root, tiny_segmenter):
    """The real engine (random tiny weights): structure, counts and value ranges, not quality."""
    folder = split_root / "val"
    report = evaluate(tiny_segmenter, iter_samples(folder), answer="generated", max_new_tokens=4, limit=6)
    assert report["n"] == 6
    assert 0.0 <= report["gIoU"] <= 1.0 and 0.0 <= report["cIoU"] <= 1.0


def test_eval_command_end_to_end(split_root, tiny_checkpoint, tmp_path, capsys):
    code = main(["eval", "--model", str(tiny_checkpoint), "--data", str(split_root), "--split", "val", "--json",
                 "--failures-out", str(tmp_path / "fail"), "--n-failures", "2", "--out", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == _n_queries(split_root / "val")
    for name in ("explicit", "implicit", "multi", "no_target"):
        entry = report["subsets"][name]
        assert set(entry) >= {"gIoU", "cIoU", "n"}
    assert report["subsets"]["multi"]["two_masks_rate"] == 1.0  # forced: two [SEG], two masks
    assert 0.0 <= report["gIoU"] <= 1.0
    assert report["model"]["seg_token_id"] > 0 and report["answer"] == "forced"
    assert len(list((tmp_path / "fail").glob("*.png"))) == 2
    assert json.loads((tmp_path / "r.json").read_text())["n"] == report["n"]
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", str(split_root), "--split", "test"]) == 1
    assert "does not exist" in capsys.readouterr().err
