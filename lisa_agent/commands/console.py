"""``lisa-agent console``: the teleoperation web console (and optionally a Foxglove live view and an MCAP recording).

::

    lisa-agent console --source synthetic                      # offline: a rendered tabletop, the bundled model
    lisa-agent console --source camera:0 --model xinlai/LISA-7B-v1 --device cuda
    lisa-agent console --source video:run.mp4 --server tcp://gpu-box:5557 --foxglove-port 8765 --record run.mcap
    lisa-agent console --source synthetic --bind 0.0.0.0       # other machines: needs the printed token

See docs/console.md for the page, the API, the token and Foxglove.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from ..config import add_engine_arguments
from ..console import CONSOLE_QUERY_DEFAULTS
from ..errors import DependencyError, InvalidArgumentError
from ..options import add_query_arguments, add_track_arguments
from .common import frame_size, port_number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="synthetic",
                        help="frames: synthetic[:N] (a slowly changing rendered tabletop scene, offline; N the test "
                             "scene, default 2), camera:N (OpenCV camera N), video:FILE (looped), ros:TOPIC "
                             "(sensor_msgs Image, or CompressedImage for a topic ending in /compressed; needs rclpy) or "
                             "server:tcp://HOST:PORT (the synthetic scene answered by the model behind lisa-agent "
                             "serve, or server:http://HOST:8000/lisa behind serve --engine ray; --model is then unused) (default: synthetic)")
    parser.add_argument("--server", default=None, metavar="ENDPOINT",
                        help="use the model behind lisa-agent serve at ENDPOINT (tcp://HOST:PORT; http://HOST:8000/lisa for serve --engine ray) with any source "
                             "instead of loading --model")
    parser.add_argument("--server-timeout", type=float, default=60.0,
                        help="seconds to wait for the model server per request (default 60)")
    parser.add_argument("--port", type=port_number, default=8080, help="web page and API port (default 8080; 0: any free)")
    parser.add_argument("--bind", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; any other address needs "
                             "the access token)")
    parser.add_argument("--token", default=os.environ.get("LISA_CONSOLE_TOKEN") or None,
                        help="access token (at least 12 characters), required on every request; default: "
                             "$LISA_CONSOLE_TOKEN, else none on loopback and a new one printed at start for any "
                             "other --bind")
    parser.add_argument("--foxglove-port", type=port_number, default=None, metavar="PORT",
                        help="also serve a Foxglove WebSocket live view on PORT (0: any free port; default: off)")
    parser.add_argument("--foxglove-bind", default="127.0.0.1",
                        help="address of the Foxglove server (default 127.0.0.1; its protocol has no authentication: "
                             "any other address needs --insecure)")
    parser.add_argument("--foxglove-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web app allowed to open the Foxglove live view besides https://app.foxglove.dev, as "
                             "scheme://host[:port] (e.g. a self-hosted Lichtblick); repeatable. Pages of any other "
                             "site are refused; apps that send no Origin (the desktop apps) are allowed")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --foxglove-bind (no authentication: trusted networks only)")
    parser.add_argument("--record", default=None, metavar="FILE",
                        help="record the session (frames, masks, answers, targets, instructions) to this MCAP file")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of the synthetic source (default 10)")
    parser.add_argument("--size", type=frame_size, default=(480, 640), help="synthetic frame size HxW (default 480x640)")
    add_query_arguments(parser, exclude=("return_logits", "answer"), defaults=CONSOLE_QUERY_DEFAULTS)
    add_track_arguments(parser)
    add_engine_arguments(parser)


def _endpoint(args: argparse.Namespace, kind: str, arg: str) -> str | None:
    if args.server and kind == "server" and args.server != arg:
        raise InvalidArgumentError(f"--server {args.server} and --source server:{arg} name two model servers")
    return args.server or (arg if kind == "server" else None)


def run(args: argparse.Namespace) -> int:
    from ..backend import is_server_address, open_backend
    from ..config import engine_config_from_args
    from ..console.core import ConsoleCore
    from ..console.sources import open_source, parse_source
    from ..options import query_options_from_args, track_options_from_args
    from ..serving.security import check_access
    from .common import check_writable

    kind, arg = parse_source(args.source)  # a bad --source fails before any model loads
    endpoint = _endpoint(args, kind, arg)
    check_writable(args.record, "--record")
    query, track = query_options_from_args(args), track_options_from_args(args)
    config = engine_config_from_args(args)
    try:
        from ..console.web import ConsoleServer
        if args.foxglove_port is not None or args.record:
            from ..integrations.foxglove import FoxglovePublisher, check_foxglove_bind
    except ImportError as exc:
        raise DependencyError(f"the console needs its extra: pip install 'lisa-agent[console]' ({exc})") from None
    # everything that can be refused is refused before a model loads (minutes for a 7B model)
    check_access(args.bind, args.port, args.token, listen=True)
    if args.foxglove_port is not None:
        from ..serving.security import check_listen

        check_foxglove_bind(args.foxglove_port, args.foxglove_bind, insecure=args.insecure)
        check_listen(args.foxglove_bind, args.foxglove_port, "--foxglove-bind")

    address = endpoint or config.model
    try:
        backend = open_backend(address, config=config, timeout=args.server_timeout)
    except ImportError as exc:
        raise DependencyError(f"a model server needs pip install 'lisa-agent[server]' ({exc})") from None
    model_name = f"model server {address}" if is_server_address(address) else f"model {address}"
    source = open_source(args.source, fps=args.fps, size=args.size)
    core = ConsoleCore(backend, source, query=query, track=track, model_name=model_name)
    server = ConsoleServer(core, host=args.bind, port=args.port, token=args.token)
    foxglove = None
    try:
        if args.foxglove_port is not None or args.record:
            foxglove = FoxglovePublisher(port=args.foxglove_port, host=args.foxglove_bind, record=args.record,
                                         on_instruction=lambda text: core.ask(text), origins=args.foxglove_origin,
                                         insecure=args.insecure)
            core.add_listener(foxglove.console_listener)

        def started() -> None:
            print(f"lisa-agent console: {source.describe()}; {model_name}", flush=True)
            print(f"open {server.url}", flush=True)
            if server.require_token:
                print(f"access token: {server.token} (every request needs it; from another machine use this "
                      f"machine's address in the URL)", flush=True)
            if foxglove is not None and foxglove.port is not None:
                print(f"Foxglove: ws://{args.foxglove_bind}:{foxglove.port} (publish {{\"data\": \"...\"}} on "
                      "/lisa/instruction to ask)", flush=True)
            if foxglove is not None and foxglove.recording is not None:
                print(f"recording to {foxglove.recording}", flush=True)

        async def serve() -> None:
            # SIGTERM (a service manager, `docker stop`, `kill`) stops the console as Ctrl-C does: the
            # recording is finished and closed, the model server connection closed
            def on_sigterm() -> None:
                print("received SIGTERM: stopping", file=sys.stderr, flush=True)
                server.request_stop()

            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
            except (NotImplementedError, RuntimeError):  # no signal handlers on this platform / thread
                pass
            await server.serve_forever(on_started=started)

        asyncio.run(serve())
    finally:
        core.close()
        if foxglove is not None:
            foxglove.close()
            if foxglove.recording is not None:
                print(f"recorded {foxglove.recording}", file=sys.stderr, flush=True)
        close = getattr(backend, "close", None)
        if endpoint and callable(close):
            close()
    return 0
