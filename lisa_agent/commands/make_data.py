"""``lisa-agent make-data --out DIR --n N [--seed S] [--split train|val|test] [--size HxW]``.

Writes N tabletop scenes into DIR in the ReasonSeg layout (``tabletop_<seed>.jpg`` + ``.json``; see
:mod:`lisa_agent.data.reasonseg`), with one query per object plus a two-target and a no-target query
per scene. ``--split`` picks the seed range (train [0, 1e7), val [1e7, 2e7), test [2e7, 3e7)), so the
splits never share a scene; scene i uses seed ``offset(split) + S + i``. DIR is written as given:
for ``lisa-agent eval --data ROOT --split val`` write ``--out ROOT/val --split val``.

``--video`` writes N synthetic video sequences instead (``--frames F`` each, default 60; see
:mod:`lisa_agent.data.video` for the layout), for ``lisa-agent eval-video``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

from ..errors import InvalidArgumentError


def parse_size(text: str) -> tuple[int, int]:
    """``"480x640"`` -> (480, 640) as (H, W)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not m:
        raise InvalidArgumentError(f"--size must look like HxW, e.g. 480x640; got {text!r}")
    h, w = int(m.group(1)), int(m.group(2))
    if min(h, w) < 32 or max(h, w) > 4096:
        raise InvalidArgumentError(f"--size sides must be in [32, 4096]; got {h}x{w}")
    return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write (created if missing)")
    parser.add_argument("--n", type=int, required=True, help="number of scenes (images)")
    parser.add_argument("--seed", type=int, default=0, help="first seed within the split's range (default 0)")
    parser.add_argument("--split", default="train", choices=["train", "val", "test"],
                        help="seed range to draw from (default %(default)s)")
    parser.add_argument("--size", default=None, metavar="HxW",
                        help="frame size, e.g. 128x128 (default: 480x640, 640x480 or 512x512 per scene)")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"], help="image format (default jpg)")
    parser.add_argument("--multi", type=int, default=1, help="two-target queries per scene (default 1)")
    parser.add_argument("--no-target", type=int, default=1, help="no-target queries per scene (default 1)")
    parser.add_argument("--p-implicit", type=float, default=0.5,
                        help="chance that an object's query is implicit (default %(default)s)")
    parser.add_argument("--video", action="store_true",
                        help="write video sequences (camera pan and zoom, an object slid across the table, a brief "
                             "occlusion, a lighting change; per-frame ground truth) instead of still scenes")
    parser.add_argument("--frames", type=int, default=60, help="--video: frames per sequence (default 60)")
    parser.add_argument("--two-targets-every", type=int, default=0, metavar="K",
                        help="--video: every K-th sequence has two targets that cross (default 0: none)")


def run(args: argparse.Namespace) -> int:
    if args.video:
        return _video(args)
    from ..data.queries import queries_for_scene
    from ..data.reasonseg import write_sample
    from ..data.tabletop import render_scene, split_seed

    if args.n < 1:
        raise InvalidArgumentError(f"--n must be >= 1; got {args.n}")
    if args.seed < 0:
        raise InvalidArgumentError(f"--seed must be >= 0; got {args.seed}")
    if not 0.0 <= args.p_implicit <= 1.0:
        raise InvalidArgumentError(f"--p-implicit must be in [0, 1]; got {args.p_implicit}")
    size = parse_size(args.size) if args.size else None
    try:
        split_seed(args.split, args.n - 1, args.seed)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from exc
    counts: Counter[str] = Counter()
    for i in range(args.n):
        seed = split_seed(args.split, i, args.seed)
        scene = render_scene(seed, size=size)
        queries = queries_for_scene(scene, p_implicit=args.p_implicit, n_multi=args.multi,
                                    n_no_target=args.no_target)
        write_sample(args.out, f"tabletop_{seed:08d}", scene, queries, image_format=args.format, split=args.split)
        counts.update(q.subset for q in queries)
    total = sum(counts.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    first, last = split_seed(args.split, 0, args.seed), split_seed(args.split, args.n - 1, args.seed)
    print(f"wrote {args.n} scenes, {total} queries ({detail}) to {args.out} [split {args.split}, seeds {first}..{last}]")
    return 0


def _video(args: argparse.Namespace) -> int:
    from ..data.video import make_video_split

    if args.n < 1 or args.frames < 2 or args.two_targets_every < 0:
        raise InvalidArgumentError("--n must be >= 1, --frames >= 2 and --two-targets-every >= 0")
    size = parse_size(args.size) if args.size else (240, 320)
    folders = make_video_split(args.out, args.n, split=args.split, seed=args.seed, n_frames=args.frames, size=size,
                               two_targets_every=args.two_targets_every)
    print(f"wrote {len(folders)} sequences of {args.frames} frames ({size[0]}x{size[1]}) to {args.out} "
          f"[split {args.split}]")
    return 0
