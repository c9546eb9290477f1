"""The ``lisa-agent`` command line. Each subcommand lives in ``lisa_agent/commands/<name>.py``.

A command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``lisa-agent --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import LisaError

#: command name -> module under lisa_agent.commands
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "segment": "segment",
    "bench": "bench",
    "make-tiny": "make_tiny",
    "make-data": "make_data",
    "finetune": "finetune",
    "pretrain-vision": "pretrain_vision",
    "eval": "evaluate",
    "calibrate-gate": "calibrate_gate",
    "resize-sam": "resize_sam",
    "serve": "serve",
    "bag": "bag",
}

_HELP: dict[str, str] = {
    "demo": "segment a rendered tabletop scene with the bundled model (offline)",
    "segment": "segment one image with a LISA checkpoint",
    "bench": "per-stage timings of fast, chat and reference modes",
    "make-tiny": "write a tiny random-weight LISA checkpoint in the published layout",
    "make-data": "write a synthetic tabletop split in the ReasonSeg layout",
    "finetune": "train or fine-tune a LISA checkpoint",
    "pretrain-vision": "pre-train a small checkpoint's vision tower on the tabletop world",
    "eval": "gIoU / cIoU on a ReasonSeg-layout split",
    "calibrate-gate": "choose the presence gate's threshold on a validation split",
    "resize-sam": "copy a checkpoint with SAM's input size multiplied (finer image grid), to fine-tune",
    "serve": "serve a model over ZeroMQ",
    "bag": "run LISA over a rosbag2 and write results into a new bag",
}


def _load(name: str):  # noqa: ANN202
    return importlib.import_module(f"lisa_agent.commands.{COMMANDS[name]}")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lisa-agent", description="LISA reasoning segmentation for robots and agents")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name in COMMANDS:
        p = sub.add_parser(name, help=_HELP[name], description=_HELP[name])
        if name == chosen:  # only the chosen command's module is imported
            try:
                _load(name).add_arguments(p)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.startswith("lisa_agent.commands"):
                    raise SystemExit(f"lisa-agent {name}: this command is not available in this build") from exc
                raise
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(_load(args.command).run(args) or 0)
    except LisaError as exc:
        print(f"lisa-agent {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
