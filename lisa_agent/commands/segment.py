"""``lisa-agent segment``: one image, one instruction, masks out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..config import add_engine_arguments
from ..frames import Frame
from ..options import add_query_arguments, query_options_from_args
from ..result import SegmentationResult
from .common import check_writable, load_backend, read_image, write_image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    parser.add_argument("--query", required=True, help='instruction, e.g. "grab something to cut with"')
    parser.add_argument("--out", default=None, help="write an overlay PNG here")
    parser.add_argument("--mask-out", default=None, help="write the label mask PNG here (k+1 for mask k)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_query_arguments(parser, exclude=("return_logits",))


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, "--out")
    check_writable(args.mask_out, "--mask-out")
    image = read_image(args.image)
    seg = load_backend(args)
    frame = Frame(image, frame_id=Path(args.image).name)
    result = seg.segment(frame, args.query, query_options_from_args(args))
    report(result, image, args)
    return 0


def report(result: SegmentationResult, image: np.ndarray, args: argparse.Namespace) -> None:
    """Write --out / --mask-out files and print the result (the result schema as JSON, or a short text)."""
    from ..encoders import image_to_png

    if getattr(args, "out", None):
        write_image(args.out, result.overlay(image))
    if getattr(args, "mask_out", None):
        Path(args.mask_out).write_bytes(image_to_png(result.label_mask()))
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    print(f"answer: {result.text}")
    if result.empty:
        print("no mask (the answer has no [SEG])")
    for k, inst in enumerate(result.instances):
        cx, cy = inst.centroid
        print(f"mask {k}: bbox {list(inst.bbox)}  area {inst.area} px  centroid ({cx:.1f}, {cy:.1f})  "
              f"score {inst.score:.3f}")
    print("timings ms: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings_ms.items()))
    if getattr(args, "out", None):
        print(f"overlay written to {args.out}")
