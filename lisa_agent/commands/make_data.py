"""``lisa-agent make-data --out DIR --n N [--seed S] [--split train|val|test] [--size HxW]``.

Writes N tabletop scenes into DIR in the ReasonSeg layout (``tabletop_<seed>.jpg`` + ``.json``; see
:mod:`lisa_agent.data.reasonseg`), with one query per object plus a two-target and a no-target query
per scene. ``--split`` picks the seed range (train [0, 1e7), val [1e7, 2e7), test [2e7, 3e7)), so the
splits never share a scene; scene i uses seed ``offset(split) + S + i``. DIR is written as given:
for ``lisa-agent eval --data ROOT --split val`` write ``--out ROOT/val --split val``.

``--format refcoco`` writes the scenes in the RefCOCO layout instead (LISA's ``refer_seg`` folder under
DIR: ``refs(unc).p``, ``instances.json`` with COCO polygons or ``--segmentation rle``, JPEG images under
``images/mscoco/images/train2014/``; see :mod:`lisa_agent.data.refcoco`): one ref per object, its
``--sentences`` referring expressions ("the red mug", "something to cut with") as the ref's sentences,
the refs' split ``--split``. Run it once per split into the same DIR to get one refs file with all of
them; evaluate with ``lisa-agent eval --data DIR --split refcoco|unc|val``. ``--queries referring``
writes those same queries in the ReasonSeg layout (same seeds, same pixels).

``--video`` writes N synthetic video sequences instead (``--frames F`` each, default 60; see
:mod:`lisa_agent.data.video` for the layout), for ``lisa-agent eval-video``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError

if TYPE_CHECKING:  # pragma: no cover
    from ..data.queries import QuerySample
    from ..data.tabletop import Scene


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
    parser.add_argument("--format", default="jpg", choices=["jpg", "png", "refcoco"],
                        help="jpg / png: the ReasonSeg layout with that image format (default jpg); refcoco: the "
                             "RefCOCO layout under DIR/refer_seg (refs pickle, instances.json, JPEG images)")
    parser.add_argument("--queries", default=None, choices=["mixed", "referring"],
                        help="mixed: one query per object, two-target and no-target ones (ReasonSeg default); "
                             "referring: --sentences referring expressions per object (always with refcoco)")
    parser.add_argument("--sentences", type=int, default=2,
                        help="referring queries: expressions per object (a ref's sentences; 1-10, default 2)")
    parser.add_argument("--dataset", default="refcoco", choices=["refcoco", "refcoco+", "refcocog", "refclef"],
                        help="--format refcoco: the dataset folder to write (splitBy umd for refcocog, else unc)")
    parser.add_argument("--segmentation", default="polygon", choices=["polygon", "rle"],
                        help="--format refcoco: COCO polygons (RefCOCO's form, default) or RLE (refclef's)")
    parser.add_argument("--multi", type=int, default=None, help="mixed queries: two-target queries per scene (default 1)")
    parser.add_argument("--no-target", type=int, default=None,
                        help="mixed queries: no-target queries per scene (default 1)")
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
    from ..data.queries import queries_for_scene, referring_queries
    from ..data.tabletop import render_scene, split_seed

    if args.n < 1:
        raise InvalidArgumentError(f"--n must be >= 1; got {args.n}")
    if args.seed < 0:
        raise InvalidArgumentError(f"--seed must be >= 0; got {args.seed}")
    if not 0.0 <= args.p_implicit <= 1.0:
        raise InvalidArgumentError(f"--p-implicit must be in [0, 1]; got {args.p_implicit}")
    referring = args.format == "refcoco" or args.queries == "referring"
    if args.format == "refcoco" and args.queries == "mixed":
        raise InvalidArgumentError("--format refcoco writes referring queries only (a ref has one target)")
    if referring and (args.multi is not None or args.no_target is not None):
        raise InvalidArgumentError("--multi and --no-target apply to mixed queries, not referring ones")
    if not 1 <= args.sentences <= 10:
        raise InvalidArgumentError(f"--sentences must be in [1, 10]; got {args.sentences}")
    size = parse_size(args.size) if args.size else None
    try:
        split_seed(args.split, args.n - 1, args.seed)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from exc
    counts: Counter[str] = Counter()

    def scenes() -> Iterator[tuple[Scene, list[QuerySample]]]:
        for i in range(args.n):
            scene = render_scene(split_seed(args.split, i, args.seed), size=size)
            if referring:
                queries = referring_queries(scene, sentences=args.sentences, p_implicit=args.p_implicit)
            else:
                queries = queries_for_scene(scene, p_implicit=args.p_implicit, n_multi=_or(args.multi, 1),
                                            n_no_target=_or(args.no_target, 1))
            counts.update(q.subset for q in queries)
            yield scene, queries

    first, last = split_seed(args.split, 0, args.seed), split_seed(args.split, args.n - 1, args.seed)
    if args.format == "refcoco":
        from ..data.refcoco import write_refer_split

        written = write_refer_split(args.out, scenes(), split=args.split, dataset=args.dataset,
                                    segmentation=args.segmentation)
        print(f"wrote {written.images} scenes, {written.refs} refs, {written.sentences} sentences to "
              f"{written.folder} [split {args.split}, seeds {first}..{last}]; evaluate with "
              f"lisa-agent eval --data {args.out} --split '{written.split}'")
        return 0
    from ..data.reasonseg import write_sample

    for scene, queries in scenes():
        write_sample(args.out, f"tabletop_{scene.seed:08d}", scene, queries, image_format=args.format,
                     split=args.split)
    total = sum(counts.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"wrote {args.n} scenes, {total} queries ({detail}) to {args.out} [split {args.split}, seeds {first}..{last}]")
    return 0


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


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
