"""``lisa-agent eval-video --model M --data DIR --tracker none|flow|sam --reason-every K [--json]``: mean
IoU of the masks through synthetic video sequences (``lisa-agent make-data --video``) and the cost per
frame; ``--tracker none --reason-every 1`` is LISA on every frame (the reference)."""

from __future__ import annotations

import argparse
import json

from ..config import add_engine_arguments
from ..errors import InvalidArgumentError
from .common import load_segmenter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder of video sequences (make-data --video)")
    parser.add_argument("--tracker", default="flow", choices=["none", "flow", "sam"],
                        help="what carries the masks between reasoning steps (default %(default)s)")
    parser.add_argument("--reason-every", type=int, default=10, metavar="K",
                        help="run LISA at least every K frames (default %(default)s; 1: every frame)")
    parser.add_argument("--min-confidence", type=float, default=0.5,
                        help="run LISA when a mask's tracking confidence falls below this (default %(default)s)")
    parser.add_argument("--mode", default="fast", choices=["fast", "chat"], help="how LISA answers")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="the first N sequences only")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..data.video import list_sequences
    from ..evaluation.video import evaluate_video

    if args.reason_every < 1 or not 0.0 <= args.min_confidence <= 1.0:
        raise InvalidArgumentError("--reason-every must be >= 1 and --min-confidence in [0, 1]")
    sequences = list_sequences(args.data)[: args.limit]
    if not sequences:
        raise InvalidArgumentError(f"no video sequences (*/sequence.json) in {args.data}; write some with "
                                   "lisa-agent make-data --video")
    report = evaluate_video(load_segmenter(args), sequences, tracker=args.tracker, reason_every=args.reason_every,
                            min_confidence=args.min_confidence, mode=args.mode, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"tracker {report['tracker']}, reason every {report['reason_every']}: mean IoU {report['mean_iou']:.3f}, "
              f"{report['ms_per_frame']:.1f} ms/frame, {report['lisa_calls']} LISA calls over {report['frames']} frames")
    return 0
