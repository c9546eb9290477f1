"""Every transformers that pyproject.toml allows gives the same answers.

A transformers forward swallows a keyword it does not know (``**kwargs``): handing the KV cache over under
the wrong name makes the model decode without it, silently (5.17 answered "Sure, [SEG] mug mug mug ..."
where 5.25 says "Sure, the knife [SEG] ."). Here chat runs on the bundled tabletop-tiny with the lowest
allowed transformers (installed beside the venv by scripts/test.sh from tests/transformers-lowest.txt, in a
subprocess) and with the installed one, and the answers and masks must agree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import iou

from lisa_agent.engine.build import MIN_TRANSFORMERS, check_transformers
from lisa_agent.engine.generation import cache_keyword, decoder_pass
from lisa_agent.engine.loading import BUNDLED_MODELS, load_vision_tower
from lisa_agent.errors import CheckpointError, DependencyError

ROOT = Path(__file__).resolve().parents[1]
LOWEST_SPEC = ROOT / "tests" / "transformers-lowest.txt"
#: where scripts/test.sh installs the lowest allowed transformers: beside the venv that runs the tests
#: (LISA_TRANSFORMERS_LOWEST overrides it)
LOWEST_DIR = Path(os.environ.get("LISA_TRANSFORMERS_LOWEST", Path(sys.prefix) / "transformers-lowest"))

#: chat on three held-out scenes, static and dynamic cache; what each process writes for the comparison
CHAT_SCRIPT = r"""
import json, sys
import numpy as np, transformers
from lisa_agent import LisaSegmenter
from lisa_agent.data.tabletop import render_scene, split_seed

seg = LisaSegmenter.from_pretrained("tabletop-tiny")
answers, masks = [], {}
for static in (True, False):
    seg.set_optimizations(static_cache=static, cuda_graphs=False, overlap=False)
    for k in range(3):
        scene = render_scene(split_seed("test", 500 + k), size=(240, 320))
        for query in ("grab something to cut with", "the mug"):
            r = seg.segment(scene.image, query, mode="chat", max_new_tokens=24)
            key = f"{int(static)}-{k}-{query}"
            answers.append({"key": key, "text": r.text, "ids": r.output_ids})
            masks[key] = r.masks
np.savez(sys.argv[1], **masks)
print(json.dumps({"transformers": transformers.__version__, "answers": answers}))
"""


def _chat(out: Path, pythonpath: str | None) -> tuple[dict, dict]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CHAT_SCRIPT, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out) as masks:
        return report, {k: masks[k] for k in masks.files}


def _lowest_dir() -> Path:
    """The folder holding the lowest allowed transformers; a missing one fails under CI and skips elsewhere."""
    if not (LOWEST_DIR / "transformers").is_dir():
        message = (f"the lowest allowed transformers is not installed in {LOWEST_DIR} (scripts/test.sh installs "
                   f"{LOWEST_SPEC.name} there with pip install --no-deps --target)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return LOWEST_DIR


def test_the_lowest_pinned_transformers_is_the_one_refused_below_and_the_one_tested():
    from packaging.version import Version

    pinned = re.search(r'"transformers>=([0-9.]+),<6"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None and Version(pinned.group(1)) == Version(MIN_TRANSFORMERS)
    assert f"transformers=={MIN_TRANSFORMERS}\n" in LOWEST_SPEC.read_text()


def test_a_transformers_older_than_the_pin_is_refused_by_name():
    with pytest.raises(DependencyError, match=rf"transformers 5\.5\.4 is installed; .*transformers>={MIN_TRANSFORMERS},<6"):
        check_transformers("5.5.4")
    check_transformers(MIN_TRANSFORMERS)
    check_transformers("5.99.0")


def test_the_kv_cache_goes_under_the_keyword_the_decoder_takes(tiny_segmenter):
    def old(inputs_embeds=None, past_key_values=None, use_cache=None, **kwargs): ...  # noqa: ANN001, ANN202, ANN003

    def new(inputs_embeds=None, cache=None, use_cache=None, **kwargs): ...  # noqa: ANN001, ANN202, ANN003

    def neither(inputs_embeds=None, **kwargs): ...  # noqa: ANN001, ANN202, ANN003

    assert (cache_keyword(old), cache_keyword(new)) == ("past_key_values", "cache")
    with pytest.raises(DependencyError, match="no keyword we know"):
        cache_keyword(neither)
    from transformers import DynamicCache

    llm = tiny_segmenter.model.llm  # the installed transformers really fills the cache it is given
    cache = DynamicCache(config=llm.config)
    with torch.no_grad():
        decoder_pass(llm.model, torch.zeros(1, 5, llm.config.hidden_size), cache)
    assert cache.get_seq_length() == 5


def test_a_vision_tower_missing_weights_is_refused_not_randomly_filled(tmp_path):
    from safetensors.torch import load_file, save_file

    tower = tmp_path / "vision_tower"
    shutil.copytree(BUNDLED_MODELS["tabletop-tiny"] / "vision_tower", tower)
    weights = load_file(tower / "model.safetensors")
    dropped = next(k for k in sorted(weights) if "layers.1.mlp.fc1.weight" in k)
    del weights[dropped]
    save_file(weights, tower / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks 1 weights .*layers\.1\.mlp\.fc1\.weight"):
        load_vision_tower(str(tower), None, torch.float32)


@pytest.mark.slow
def test_chat_with_the_lowest_allowed_transformers_equals_the_installed_one(tmp_path):
    lowest = _lowest_dir()
    theirs, their_masks = _chat(tmp_path / "lowest.npz", str(lowest))
    assert theirs["transformers"] == MIN_TRANSFORMERS, f"{lowest} holds transformers {theirs['transformers']}"
    ours, our_masks = _chat(tmp_path / "installed.npz", None)
    assert ours["transformers"] != theirs["transformers"]
    assert any("knife [SEG]" in a["text"] for a in ours["answers"])  # the model's own answer, not garbage
    assert [(a["key"], a["text"], a["ids"]) for a in theirs["answers"]] == \
        [(a["key"], a["text"], a["ids"]) for a in ours["answers"]]
    assert sum(len(m) for m in our_masks.values()) >= 3
    for key, masks in our_masks.items():
        assert len(their_masks[key]) == len(masks)
        for a, b in zip(masks, their_masks[key], strict=True):
            assert iou(a, b) >= 0.99, key

