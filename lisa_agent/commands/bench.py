"""``lisa-agent bench``: per-stage medians of fast, chat and reference, and their ratios."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..config import add_engine_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default=None, choices=["tiny", "7b", "13b", "reasoner-tiny", "reasoner-7b"],
                        help="time random weights of this architecture instead of --model (7b/13b: LISA on a GPU; "
                             "reasoner-tiny / reasoner-7b: a VisionReasoner-shaped Qwen2.5-VL with SAM 2, the 7B on "
                             "a GPU)")
    parser.add_argument("--mode", action="append", choices=["fast", "chat", "reference"],
                        help="LISA's modes to time (repeatable; default all three); a reasoner's bench always "
                             "times prefill, generate (--new-tokens) and sam")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--reference-runs", type=int, default=None, help="runs for the slow reference mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated in chat/reference (default 32) or by a reasoner (default 64)")
    parser.add_argument("--image-size", default="480x640", help="HxW of the synthetic frame")
    parser.add_argument("--compare", action="store_true",
                        help="also time with each optimization that applies here turned off (CUDA graphs, the SAM "
                             "stream overlap, the static cache), in one run: each lever's effect as a ratio (a reasoner: every lever that runs here on, "
                             "then off one at a time)")
    add_engine_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3,
                        help="with --compare: the settings take turns this many times, each with a share of the runs")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..benchmarks.engine import compare, load_for_bench, run_bench
    from ..config import engine_config_from_args
    from ..errors import InvalidArgumentError
    from ..reasoner.loading import is_reasoner

    config = engine_config_from_args(args)
    if args.shape in ("7b", "13b", "reasoner-7b") and not config.device.startswith("cuda") \
            and not (config.device == "auto" and torch.cuda.is_available()):
        raise InvalidArgumentError(f"--shape {args.shape} is meant for a GPU: pass --device cuda")
    try:
        h, w = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        raise InvalidArgumentError(f"--image-size must look like 480x640, got {args.image_size!r}") from None
    torch.manual_seed(0)
    if (args.shape or "").startswith("reasoner") or (args.shape is None and is_reasoner(config.model)):
        return _run_reasoner(args, config, (h, w))
    seg, shape = load_for_bench(config, args.shape)
    bench = {"runs": args.runs, "warmup": args.warmup, "image_hw": (h, w),
             "new_tokens": 32 if args.new_tokens is None else args.new_tokens,
             "modes": tuple(args.mode or ("fast", "chat", "reference")), "reference_runs": args.reference_runs}
    return _report(args, shape, lambda: compare(seg, rounds=args.rounds, **bench), lambda: run_bench(seg, **bench))


def _run_reasoner(args: argparse.Namespace, config: object, image_hw: tuple[int, int]) -> int:
    """The reasoner's bench (:mod:`lisa_agent.benchmarks.reasoner`), printed as LISA's is."""
    from ..benchmarks.reasoner import compare_reasoner, load_reasoner_for_bench, run_reasoner_bench, summary
    from ..errors import InvalidArgumentError

    if args.mode:
        raise InvalidArgumentError("--mode picks LISA's modes; a reasoner's bench always times prefill, generate and "
                                   "sam")
    seg, shape = load_reasoner_for_bench(config, args.shape)  # type: ignore[arg-type]
    bench = {"runs": args.runs, "warmup": args.warmup, "image_hw": image_hw,
             "new_tokens": 64 if args.new_tokens is None else args.new_tokens}
    return _report(args, shape, lambda: compare_reasoner(seg, rounds=args.rounds, **bench),
                   lambda: run_reasoner_bench(seg, **bench), footer=summary)


def _report(args: argparse.Namespace, shape: str, compare_: Callable[[], dict[str, Any]],
            bench: Callable[[], dict[str, Any]], footer: Callable[[dict[str, Any]], str] | None = None) -> int:
    """Run ``compare_`` (with ``--compare``) or ``bench``, name the shape in each report and print them: JSON with
    ``--json``, else each report's table (and ``footer``'s line) and the levers' ratios."""
    from ..benchmarks.engine import format_table

    def table(report: dict[str, Any]) -> str:
        return format_table(report) + (f"\n{footer(report)}" if footer else "")

    if not args.compare:
        report = bench()
        report["shape"] = shape
        print(json.dumps(report) if args.json else table(report))
        return 0
    result = compare_()
    for run_ in result["runs"]:
        run_["report"]["shape"] = shape
    if args.json:
        print(json.dumps(result))
        return 0
    for run_ in result["runs"]:
        print(f"--- off: {', '.join(run_['levers_off']) or 'nothing (as configured)'}")
        print(table(run_["report"]))
    for step, ratios in result["ratios"].items():
        print(f"{step}: " + ", ".join(f"{mode} {r:.2f}x" for mode, r in ratios.items()))
    return 0
