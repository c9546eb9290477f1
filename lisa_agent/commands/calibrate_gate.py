"""``lisa-agent calibrate-gate --model DIR --data VAL [--write]``: choose a checkpoint's presence-gate
threshold on a validation split (see :mod:`lisa_agent.evaluation.gate`) and optionally write it into
the checkpoint's ``config.json``."""

from __future__ import annotations

import argparse
import json

from ..config import add_engine_arguments
from ..errors import InvalidArgumentError
from .common import load_segmenter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, exclude=("presence_threshold",))  # scores are read with the gate off
    parser.add_argument("--data", required=True, help="ReasonSeg-layout split with no-target queries (ours)")
    parser.add_argument("--min-decline", type=float, default=None,
                        help="keep the most targets while declining at least this share of no-target queries "
                             "(default: best (declined + kept) / 2)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="the first N queries only")
    parser.add_argument("--write", action="store_true", help="write the threshold into MODEL/config.json")
    parser.add_argument("--json", action="store_true", help="print the result (with the full table) as JSON")


def run(args: argparse.Namespace) -> int:
    from ..data.reasonseg import iter_samples, list_images
    from ..engine.checkpoints import read_config, write_config
    from ..engine.loading import resolve_checkpoint
    from ..evaluation.gate import choose_threshold, presence_scores

    if args.min_decline is not None and not 0.0 < args.min_decline <= 1.0:
        raise InvalidArgumentError(f"--min-decline must be in (0, 1]; got {args.min_decline}")
    if not list_images(args.data):
        raise InvalidArgumentError(f"no image + json pairs in {args.data}")
    from ..reasoner.loading import is_reasoner

    if is_reasoner(args.engine_model):
        raise InvalidArgumentError(f"{args.engine_model} is a reasoner (Qwen2.5-VL + SAM 2): calibrate-gate "
                                   "calibrates LISA's presence head; a reasoner has none: it says itself when "
                                   "nothing matches (an empty answer list)")
    folder = resolve_checkpoint(args.engine_model)
    config = read_config(folder)
    if not (config.get("lisa_agent") or {}).get("presence_gate"):
        raise InvalidArgumentError(f"{args.engine_model} has no presence head (config.json declares no "
                                   "lisa_agent.presence_gate); train one with finetune --presence-weight")
    # the gate must not decline while its scores are collected
    seg = load_segmenter(args, model=str(folder), presence_threshold=None)
    try:
        result = choose_threshold(presence_scores(seg, iter_samples(args.data), limit=args.limit), args.min_decline)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
    result["threshold"] = round(result["threshold"], 4)
    if args.write:
        config["lisa_agent"]["presence_gate"]["threshold"] = result["threshold"]
        config_path = write_config(folder, config)
        result["written"] = str(config_path)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"threshold {result['threshold']:.4f} ({result['criterion']}): declines "
              f"{result['declined']:.1%} of {result['n_no_target']} no-target queries, keeps "
              f"{result['kept']:.1%} of {result['n_with_targets']} with targets"
              + (f"; written to {result['written']}" if args.write else ""))
    return 0
