"""The lisa-agent command line: make-tiny, segment (text and --json), bench --json, errors."""

from __future__ import annotations

import json

import numpy as np
from helpers import random_frame
from PIL import Image

from lisa_agent.cli import main


def test_segment_json_matches_the_engine(tiny_checkpoint, tiny_segmenter, tmp_path, capsys):
    frame = random_frame(60, 90, seed=4)
    Image.fromarray(frame).save(tmp_path / "frame.png")
    rc = main(["segment", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "frame.png"),
               "--query", "the red mug", "--json", "--out", str(tmp_path / "o.png"),
               "--mask-out", str(tmp_path / "m.png")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "masks", "timings_ms"}
    engine = tiny_segmenter.segment(frame, "the red mug")
    assert out["text"] == engine.text == "Sure, [SEG]."
    (m,) = out["masks"]
    assert m["bbox"] == list(engine.instances[0].bbox) and m["area"] == engine.instances[0].area
    assert m["rle"]["size"] == [60, 90] and isinstance(m["rle"]["counts"], str)
    assert len(m["centroid"]) == 2 and isinstance(m["score"], float)
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (60, 90, 3)
    labels = np.asarray(Image.open(tmp_path / "m.png"))
    np.testing.assert_array_equal(labels == 1, engine.masks[0])


def test_segment_reports_unreadable_image(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    rc = main(["segment", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "bad.jpg"), "--query", "x"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "bad.jpg' is not a readable image" in err and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_model_is_reported(tmp_path, capsys):
    Image.fromarray(random_frame(20, 20)).save(tmp_path / "f.png")
    rc = main(["segment", "--model", "nobody/nothing", "--image", str(tmp_path / "f.png"), "--query", "x"])
    assert rc == 1 and "nobody/nothing" in capsys.readouterr().err


def test_make_tiny_then_bench_json(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "tiny")]) == 0
    assert "RANDOM-WEIGHT" in capsys.readouterr().out
    rc = main(["bench", "--model", str(tmp_path / "tiny"), "--runs", "2", "--warmup", "0", "--new-tokens", "4",
               "--image-size", "64x80", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["modes"]) >= {"fast", "chat", "reference"}
    for mode in ("fast", "chat", "reference"):
        assert report["modes"][mode]["median_ms"] > 0 and "llm" in report["modes"][mode]["stages_ms"]
    assert set(report["ratios"]) == {"reference_over_chat", "chat_over_fast", "fast_over_fast_encoded"}
    # a query on a frame already encoded (the handle from encode()) skips the encoders
    assert report["modes"]["fast_encoded"]["stages_ms"]["sam_encoder"] == 0
    assert report["device"].startswith("cpu")
