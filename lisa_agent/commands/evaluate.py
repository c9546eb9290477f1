"""``lisa-agent eval --model ID_OR_DIR --data DIR [--split SPLIT]``: gIoU / cIoU as LISA computes them.

Two layouts:

- ReasonSeg: ``--data`` is a split folder (``x.jpg`` + ``x.json``) or, with ``--split train|val|test``,
  the root holding ``train/``, ``val/``, ``test/`` (ReasonSeg's own layout).
- RefCOCO (referring segmentation, the paper's refCOCO / refCOCO+ / refCOCOg table): ``--split`` is
  LISA's dataset string ``DATASET|SPLITBY|SPLIT`` (``refcoco|unc|val``, ``refcoco+|unc|testA``,
  ``refcocog|umd|test``, ``refclef|unc|val``) and ``--data`` LISA's dataset folder (holding
  ``refer_seg/refcoco/refs(unc).p``, ``instances.json`` and ``refer_seg/images/...``) or the folder that
  holds ``refcoco/`` directly. Every sentence of every ref is one query (see
  :mod:`lisa_agent.data.refcoco`).

Default answers are teacher-forced ("[SEG]." with LISA's prompt forms); ``--answer generated`` lets the
model answer (chat mode). A reasoner checkpoint (``config.json`` model_type ``qwen2_5_vl``: VisionReasoner,
Seg-Zero; :mod:`lisa_agent.reasoner`) always writes its own answer to the query as written (its own template
wraps it): ``--answer generated --prompt raw`` apply, and the report says so. The report (JSON with ``--json``,
else a table) is the same for both layouts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import add_engine_arguments
from ..errors import InvalidArgumentError
from .common import check_writable, load_backend

#: ReasonSeg split folders ``--split`` may name; anything with "|" is a referring split.
REASONSEG_SPLITS = ("train", "val", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--data", required=True,
                        help="ReasonSeg split folder or root; or the RefCOCO-layout folder with --split DATASET|SPLITBY|SPLIT")
    parser.add_argument("--split", default=None, metavar="SPLIT",
                        help="train|val|test: use DATA/SPLIT (ReasonSeg); DATASET|SPLITBY|SPLIT, e.g. refcoco|unc|val: "
                             "that referring split of DATA (RefCOCO layout, as LISA's --val_dataset names it)")
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


def is_referring_split(split: str | None) -> bool:
    """True for LISA's referring dataset strings (``refcoco|unc|val``)."""
    return split is not None and "|" in split


def resolve_data(data: str, split: str | None) -> Path:
    """The ReasonSeg split folder: DATA/SPLIT when ``split`` is given, else DATA."""
    if split is not None and split not in REASONSEG_SPLITS:
        raise InvalidArgumentError(f"unknown --split {split!r}: give train, val or test (ReasonSeg layout) or "
                                   "DATASET|SPLITBY|SPLIT, e.g. refcoco|unc|val (RefCOCO layout)")
    root = Path(data)
    folder = root / split if split else root
    if not folder.is_dir():
        hint = f" (no '{split}' folder under {root})" if split else ""
        raise InvalidArgumentError(f"dataset folder {folder} does not exist{hint}")
    return folder


def run(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import evaluate, format_report

    if args.limit is not None and args.limit < 1:
        raise InvalidArgumentError(f"--limit must be >= 1; got {args.limit}")
    check_writable(args.out, "--out")
    if args.failures_out is not None:
        check_writable(Path(args.failures_out) / "overlay.png", "--failures-out")
    # the data is opened and checked before the (slow) model load
    samples, extra, options = _open_data(args.data, args.split)
    segmenter = load_backend(args)
    answer, prompt = args.answer, args.prompt
    reasoner = segmenter.info().get("backend") == "reasoner"
    if reasoner:  # it answers the query as written, in its own template; a forced "[SEG]." means nothing to it
        answer, prompt = "generated", "raw"
    report = evaluate(segmenter, samples, answer=answer, prompt=prompt, limit=args.limit,
                      failures_out=args.failures_out, n_failures=args.n_failures,
                      max_new_tokens=args.max_new_tokens, progress=args.progress, **options)
    report["model"] = segmenter.info()
    if reasoner and (args.answer, args.prompt) != (answer, prompt):
        report["note"] = "a reasoner writes its own answer to the query as written: --answer generated --prompt raw"
    report.update(extra)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if args.json else format_report(report), file=sys.stdout)
    return 0


def _open_data(data: str, split: str | None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(samples, report fields, evaluate() options) of a ReasonSeg folder or a referring split."""
    if is_referring_split(split):
        from ..data.refcoco import open_refer_split

        assert split is not None
        refer = open_refer_split(data, split)
        extra = {"data": str(refer.dataset.root), "split": str(refer.split), "refs": refer.n_refs}
        return refer.samples(), extra, {"subsets": ()}
    from ..data.reasonseg import iter_samples, list_images

    folder = resolve_data(data, split)
    if not list_images(folder):
        raise InvalidArgumentError(f"no image + json pairs in {folder}")
    return iter_samples(folder), {"data": str(folder)}, {}
