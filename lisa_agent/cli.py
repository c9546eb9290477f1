"""The ``lisa-agent`` command line. Each subcommand lives in ``lisa_agent/commands/<name>.py``.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; its one-line help is
in :data:`COMMANDS` here, so ``lisa-agent --help`` imports no command module. Modules are imported
only when their command runs. Every command that loads a model takes the flags of
:class:`lisa_agent.config.EngineConfig` (:func:`lisa_agent.config.add_engine_arguments`).

Every failure is one line on stderr (``lisa-agent COMMAND: error: ...``) and an exit code:

====  =====================================================================================
0     success
1     the command could not do its work: bad input, model or data (the line says what)
2     bad usage: unknown flag or value (argparse's message)
3     an unexpected internal error (a bug: the line names it; ``LISA_AGENT_TRACEBACK=1`` shows where)
130   interrupted (Ctrl-C)
====  =====================================================================================
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from .errors import LisaError
from .noise import quiet_library_noise

#: command name -> (module under lisa_agent.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "segment a rendered tabletop scene with the bundled model (offline)"),
    "segment": ("segment", "segment one image with a LISA checkpoint"),
    "bench": ("bench", "per-stage timings of fast, chat and reference modes"),
    "make-tiny": ("make_tiny", "write a tiny random-weight LISA checkpoint in the published layout"),
    "make-data": ("make_data", "write a synthetic tabletop split in the ReasonSeg or RefCOCO layout"),
    "finetune": ("finetune", "train or fine-tune a LISA checkpoint"),
    "pretrain-vision": ("pretrain_vision", "pre-train a small checkpoint's vision tower on the tabletop world"),
    "eval": ("evaluate", "gIoU / cIoU on a ReasonSeg split or a referring split (refcoco|unc|val)"),
    "eval-video": ("eval_video", "mask IoU and cost per frame through video sequences, with a tracker between reasoning steps"),
    "calibrate-gate": ("calibrate_gate", "choose the presence gate's threshold on a validation split"),
    "resize-sam": ("resize_sam", "copy a checkpoint with SAM's input size multiplied (finer image grid), to fine-tune"),
    "serve": ("serve", "serve a model over ZeroMQ, or over HTTP on Ray Serve replicas (docs/protocol.md, docs/ray.md)"),
    "bag": ("bag", "run LISA over a rosbag2 (sqlite3 or MCAP) and write results into a new bag"),
    "console": ("console", "teleoperation web console: live frames, instructions, masks, target (docs/console.md)"),
    "mcp": ("mcp", "MCP server: any MCP host (desktop assistants, IDE agents) sees the camera and gets masks (docs/mcp.md)"),
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"lisa_agent.commands.{COMMANDS[name][0]}")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lisa-agent", description="LISA reasoning segmentation for robots and agents")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
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
    quiet_library_noise()
    try:
        return int(_load(args.command).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (LisaError, OSError) as exc:  # OSError: a file or folder the command was pointed at
        print(f"lisa-agent {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get("LISA_AGENT_TRACEBACK"):
            raise
        print(f"lisa-agent {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(a bug; LISA_AGENT_TRACEBACK=1 shows where)", file=sys.stderr)
        return 3


def _one_line(exc: BaseException, limit: int = 2000) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
