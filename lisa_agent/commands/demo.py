"""``lisa-agent demo``: the bundled tabletop model on a rendered tabletop scene, fully offline."""

from __future__ import annotations

import argparse

from ..config import add_engine_arguments
from ..options import add_query_arguments, query_options_from_args
from .common import check_writable, load_backend, write_image

DEFAULT_QUERY = "grab something to cut with"
DEFAULT_SEED = 2
#: The demo's query options where they differ from the library's: the model writes its answer, naming what it
#: segments (the bundled model is also weaker with the forced answer).
DEMO_QUERY_DEFAULTS = {"mode": "chat"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query", default=DEFAULT_QUERY, help=f'instruction (default "{DEFAULT_QUERY}")')
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"scene number in the held-out test range (default {DEFAULT_SEED}: a scene the bundled "
                             "model gets right; others show its failures too, see its model card)")
    parser.add_argument("--size", default="480x640", help="frame size HxW (default 480x640)")
    parser.add_argument("--out", default="overlay.png", help="overlay PNG to write (default overlay.png)")
    parser.add_argument("--image-out", default=None, help="also write the plain rendered frame here")
    parser.add_argument("--json", action="store_true", help="print the segment --json object")
    add_query_arguments(parser, exclude=("return_logits", "answer"), defaults=DEMO_QUERY_DEFAULTS)
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..data.tabletop import render_scene, split_seed
    from ..errors import InvalidArgumentError
    from ..frames import Frame
    from .segment import report

    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise InvalidArgumentError(f"--size must look like 480x640, got {args.size!r}") from None
    check_writable(args.out, "--out")
    check_writable(args.image_out, "--image-out")
    scene = render_scene(split_seed("test", args.seed), size=(h, w))
    seg = load_backend(args)
    frame = Frame(scene.image, frame_id=f"tabletop test scene {args.seed}")
    result = seg.segment(frame, args.query, query_options_from_args(args))
    if args.image_out:
        write_image(args.image_out, scene.image)
    objects = ", ".join(o.name() for o in scene.objects)
    if not args.json:
        print(f"scene: test scene {args.seed} ({h}x{w}) with {objects}")
        print(f"query: {args.query}")
    report(result, scene.image, args)
    return 0
