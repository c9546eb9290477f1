"""``lisa-agent bag IN --image-topic T --query Q --out OUT``: LISA over a recorded rosbag2."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import add_engine_arguments
from ..errors import InvalidArgumentError
from ..options import add_query_arguments
from .common import check_writable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="input bag folder (sqlite3 or MCAP rosbag2)")
    parser.add_argument("--image-topic", required=True,
                        help="sensor_msgs/Image or CompressedImage topic to segment")
    parser.add_argument("--query", required=True, help="what to segment, e.g. 'something to cut with'")
    parser.add_argument("--out", required=True, help="output bag folder (must not exist)")
    parser.add_argument("--server", default="",
                        help="model server endpoint instead of --model (tcp://host:port, or a Ray Serve deployment's "
                             "http://host:8000/lisa; --model takes one too)")
    parser.add_argument("--prefix", default="/lisa", help="namespace of the written topics (default /lisa)")
    parser.add_argument("--every", type=int, default=1, help="segment every N-th frame (default 1)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many segmented frames")
    parser.add_argument("--storage", choices=["sqlite3", "mcap"], default=None,
                        help="output storage (default: the input's)")
    parser.add_argument("--no-overlay", action="store_true", help="do not write <prefix>/overlay")
    parser.add_argument("--copy-input", action="store_true",
                        help="copy every input topic into the output too, so it plays back on its own")
    add_query_arguments(parser, exclude=("return_logits",))
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..backend import open_backend
    from ..config import engine_config_from_args
    from ..integrations.bagtool import process_bag
    from ..options import query_options_from_args

    # what can fail fast fails before a model loads
    if not Path(args.input).exists():
        raise InvalidArgumentError(f"input bag {args.input} does not exist")
    if Path(args.out).exists():
        raise InvalidArgumentError(f"output {args.out} already exists; choose a new path (rosbag2 never overwrites)")
    check_writable(Path(args.out) / "metadata.yaml", "--out")
    options = query_options_from_args(args)
    config = engine_config_from_args(args)
    backend = open_backend(args.server or config.model, config=config)
    report = process_bag(args.input, args.out, image_topic=args.image_topic, query=args.query, backend=backend,
                         options=options, prefix=args.prefix, overlay=not args.no_overlay, every=args.every,
                         max_frames=args.max_frames, storage=args.storage, copy_input=args.copy_input)
    print(report.summary())
    for line in report.skipped[:20]:
        print(f"  skipped {line}")
    return 0 if report.processed or not report.frames else 1
