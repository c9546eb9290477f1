"""``lisa-agent eval --model ID_OR_DIR --data DIR``: gIoU / cIoU on a ReasonSeg-layout split, as LISA computes them.

``--data`` is a split folder (``x.jpg`` + ``x.json``) or, with ``--split``, the root holding
``train/``, ``val/``, ``test/`` (ReasonSeg's own layout). Default answers are teacher-forced
("[SEG]." with LISA's prompt forms); ``--answer generated`` lets the model answer (chat mode).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import add_engine_arguments
from ..errors import InvalidArgumentError
from .common import check_writable, load_segmenter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--data", required=True, help="split folder, or the dataset root with --split")
    parser.add_argument("--split", default=None, choices=["train", "val", "test"], help="use DATA/SPLIT")
    parser.add_argument("--answer", default="forced", choices=["forced", "generated"],
                        help="forced: teacher-forced '[SEG].' as LISA evaluates (default); generated: chat mode")
    parser.add_argument("--prompt", default="lisa", choices=["lisa", "raw"],
                        help="lisa: LISA's evaluation prompt forms (default); raw: the query text as is")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N queries only")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON result to FILE")
    parser.add_argument("--failures-out", default=None, metavar="DIR",
                        help="write overlays of the lowest-IoU queries (prediction vs ground truth) to DIR")
    parser.add_argument("--n-failures", type=int, default=8, help="how many failure overlays (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation limit in chat mode")
    parser.add_argument("--progress", action="store_true", help="progress bar on stderr")


def resolve_data(data: str, split: str | None) -> Path:
    """The split folder: DATA/SPLIT when ``split`` is given, else DATA."""
    root = Path(data)
    folder = root / split if split else root
    if not folder.is_dir():
        hint = f" (no '{split}' folder under {root})" if split else ""
        raise InvalidArgumentError(f"dataset folder {folder} does not exist{hint}")
    return folder


def run(args: argparse.Namespace) -> int:
    from ..data.reasonseg import iter_samples, list_images
    from ..evaluation.evaluate import evaluate, format_report

    if args.limit is not None and args.limit < 1:
        raise InvalidArgumentError(f"--limit must be >= 1; got {args.limit}")
    check_writable(args.out, "--out")
    if args.failures_out is not None:
        check_writable(Path(args.failures_out) / "overlay.png", "--failures-out")
    folder = resolve_data(args.data, args.split)
    if not list_images(folder):  # fail on a bad folder before loading the model
        raise InvalidArgumentError(f"no image + json pairs in {folder}")
    segmenter = load_segmenter(args)
    report = evaluate(segmenter, iter_samples(folder), answer=args.answer, prompt=args.prompt, limit=args.limit,
                      failures_out=args.failures_out, n_failures=args.n_failures,
                      max_new_tokens=args.max_new_tokens, progress=args.progress)
    report["model"] = segmenter.info()
    report["data"] = str(folder)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if args.json else format_report(report), file=sys.stdout)
    return 0
