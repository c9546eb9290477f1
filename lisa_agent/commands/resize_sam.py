"""``lisa-agent resize-sam --model SRC --out DIR --size N``: a copy of a checkpoint whose SAM takes N px
input (a whole multiple of its current size), to fine-tune at the finer grid (see
:mod:`lisa_agent.training.resize_sam`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidArgumentError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder, Hub id or tabletop-tiny")
    parser.add_argument("--out", required=True, help="new folder to write (must not hold a checkpoint)")
    parser.add_argument("--size", type=int, required=True, help="SAM input size in px (a multiple of the current)")


def run(args: argparse.Namespace) -> int:
    from ..engine.checkpoints import copy_vision_tower, read_config, write_checkpoint
    from ..engine.loading import resolve_checkpoint
    from ..engine.modeling.sam import infer_sam_spec
    from ..engine.weights import read_state_dict
    from ..training.resize_sam import SAM_PREFIX, resize_sam_state

    src = Path(resolve_checkpoint(args.model))
    out = Path(args.out)
    if (out / "config.json").exists():
        raise InvalidArgumentError(f"{out} already holds a checkpoint; choose a new folder")
    config = read_config(src)
    state = read_state_dict(src)
    old = infer_sam_spec(state, prefix=SAM_PREFIX).img_size  # from the weights, as the loader reads it
    state = resize_sam_state(state, old, args.size)
    config["sam_image_size"] = args.size
    config.setdefault("lisa_agent", {})["sam_resized_from"] = old
    write_checkpoint(out, config, state, source=src)
    copy_vision_tower(src, out, config)
    print(f"wrote {out}: SAM input {old} -> {args.size} px (image grid x{args.size // old}); fine-tune it at "
          "this size before use")
    return 0
