"""``lisa-agent eval-video --model M --data DIR --tracker none|flow|sam --reason-every K [--json]``: mean
IoU of the masks through synthetic video sequences (``lisa-agent make-data --video``) and the cost per
frame; ``--tracker none --reason-every 1`` is LISA on every frame (the reference)."""

from __future__ import annotations

import argparse
import json

from ..config import add_engine_arguments
from ..errors import InvalidArgumentError
from ..options import (
    add_query_arguments,
    add_track_arguments,
    query_options_from_args,
    track_options_from_args,
)
from .common import load_backend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder of video sequences (make-data --video)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="the first N sequences only")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_track_arguments(parser)
    add_query_arguments(parser, exclude=("return_logits", "answer"))
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..data.video import list_sequences
    from ..evaluation.video import evaluate_video

    track, query = track_options_from_args(args), query_options_from_args(args)
    sequences = list_sequences(args.data)[: args.limit]
    if not sequences:
        raise InvalidArgumentError(f"no video sequences (*/sequence.json) in {args.data}; write some with "
                                   "lisa-agent make-data --video")
    report = evaluate_video(load_backend(args), sequences, track, query=query)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"tracker {report['tracker']}, reason every {report['reason_every']}: mean IoU {report['mean_iou']:.3f}, "
              f"{report['ms_per_frame']:.1f} ms/frame, {report['lisa_calls']} LISA calls over {report['frames']} frames")
    return 0
