"""``lisa-agent serve``: load a model once and serve it over ZeroMQ until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading

from ..config import add_engine_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--bind", default="tcp://127.0.0.1:5557",
                        help="endpoint to bind (default %(default)s; tcp://127.0.0.1:* picks a free port)")
    parser.add_argument("--max-queue", type=int, default=16, metavar="N",
                        help="requests waiting for the model at most; more are answered queue_full (default %(default)s)")
    parser.add_argument("--max-side", type=int, default=4096, help="largest image side accepted (default %(default)s)")
    parser.add_argument("--max-frame-mb", type=float, default=64.0,
                        help="largest frame accepted, in MiB (default %(default)s)")
    parser.add_argument("--max-pending-replies-mb", type=float, default=64.0, metavar="MB",
                        help="replies held for a client that does not read them, at most; its oldest are dropped "
                             "beyond (default %(default)s)")
    parser.add_argument("--curve-secret", default=None, metavar="FILE",
                        help="server .key_secret certificate: turn CurveZMQ encryption + authentication on")
    parser.add_argument("--curve-allow", default=None, metavar="DIR",
                        help="directory of allow-listed client .key certificates (with --curve-secret)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback bind without CurveZMQ (trusted networks only)")
    parser.add_argument("--latest-only", action="store_true",
                        help="a client's newer frame always supersedes its queued older frames")
    parser.add_argument("--no-batch", action="store_true", help="run queued queries on one frame one by one")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                        help="debug logs one line per request (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..config import engine_config_from_args
    from ..errors import InvalidArgumentError
    from ..serving import security
    from ..serving.protocol import Limits
    from ..serving.server import LisaServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("lisa_agent.serving")
    config = engine_config_from_args(args)
    if (args.curve_secret is None) != (args.curve_allow is None):
        raise InvalidArgumentError("--curve-secret and --curve-allow go together")
    # Check what can fail fast before spending minutes loading a model.
    security.check_bind(args.bind, curve=args.curve_secret is not None, insecure=args.insecure)
    if args.curve_secret is not None:
        security.load_keypair(args.curve_secret)
        security.check_allow_dir(args.curve_allow)
    if args.max_queue < 1:
        raise InvalidArgumentError(f"--max-queue must be at least 1; got {args.max_queue}")
    if args.max_side < 8:
        raise InvalidArgumentError(f"--max-side must be at least 8; got {args.max_side}")
    for flag, value in (("--max-frame-mb", args.max_frame_mb), ("--max-pending-replies-mb", args.max_pending_replies_mb)):
        if not math.isfinite(value) or value <= 0 or value > 1024 * 1024:
            raise InvalidArgumentError(f"{flag} must be a positive number of MiB (at most 1048576); got {value}")

    from ..segmenter import LisaSegmenter

    log.info("loading %s", config.describe())
    segmenter = LisaSegmenter.from_config(config)
    limits = Limits(max_frame_bytes=int(args.max_frame_mb * 1024 * 1024), max_side=args.max_side)
    server = LisaServer(segmenter, args.bind, max_queue=args.max_queue, limits=limits,
                        curve_secret=args.curve_secret, curve_allow=args.curve_allow, insecure=args.insecure,
                        latest_only=args.latest_only, batch=not args.no_batch,
                        max_pending_reply_bytes=int(args.max_pending_replies_mb * 1024 * 1024))
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        while not stopping.wait(0.5):
            if server.wait(0):  # the server stopped by itself (socket loop failure)
                log.error("server stopped unexpectedly")
                return 1
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("stopped")
    return 0
