"""``lisa-agent mcp``: LISA as an MCP server (tools ``look``, ``segment_objects``, ``explain_objects``, ``track``).

::

    lisa-agent mcp --source synthetic                                  # stdio: what desktop hosts launch
    lisa-agent mcp --source camera:0 --model xinlai/LISA-7B-v1 --device cuda
    lisa-agent mcp --source ros:/camera/color/image_raw --server tcp://gpu-box:5557
    lisa-agent mcp --source synthetic --transport http --port 8090     # http://127.0.0.1:8090/mcp
    lisa-agent mcp --source none --transport http --bind 0.0.0.0       # other machines: needs the printed token

With stdio, stdout carries the protocol only: everything else goes to stderr. See docs/mcp.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from ..config import add_engine_arguments
from ..errors import DependencyError, InvalidArgumentError
from ..options import add_query_arguments, add_track_arguments
from .common import frame_size, port_number

#: ``--transport`` choices.
TRANSPORTS = ("stdio", "http")
#: The HTTP transport's default port.
DEFAULT_PORT = 8090


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="synthetic",
                        help="frames: synthetic[:N] (a slowly changing rendered tabletop scene, offline), camera:N "
                             "(OpenCV camera N), video:FILE (looped), ros:TOPIC (sensor_msgs Image; needs rclpy), "
                             "server:tcp://HOST:PORT (the synthetic scene answered by a model server) or none (no "
                             "camera: only images passed to the tools) (default: synthetic)")
    parser.add_argument("--server", default=None, metavar="ENDPOINT",
                        help="use the model behind lisa-agent serve at ENDPOINT (tcp://HOST:PORT; http://HOST:8000/lisa "
                             "for serve --engine ray) instead of loading --model")
    parser.add_argument("--server-timeout", type=float, default=60.0,
                        help="seconds to wait for the model server per request (default 60)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="stdio",
                        help="stdio (default: what desktop MCP hosts launch) or http (streamable HTTP at "
                             "http://BIND:PORT/mcp)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help=f"HTTP port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument("--bind", default="127.0.0.1",
                        help="HTTP address (default 127.0.0.1: this machine only; any other address needs the access "
                             "token)")
    parser.add_argument("--token", default=os.environ.get("LISA_MCP_TOKEN") or None,
                        help="HTTP access token (at least 12 characters), required on every request as 'Authorization: "
                             "Bearer TOKEN'; default: $LISA_MCP_TOKEN, else none on loopback and a new one printed at "
                             "start for any other --bind")
    parser.add_argument("--image-folder", action="append", default=[], metavar="DIR",
                        help="a folder whose image files the tools may read (repeatable; default: none, so no files)")
    parser.add_argument("--image-host", action="append", default=[], metavar="HOST",
                        help="a host whose image URLs the tools may fetch (repeatable; default: none, so no URLs)")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of the synthetic source (default 10)")
    parser.add_argument("--size", type=frame_size, default=(480, 640),
                        help="synthetic frame size HxW (default 480x640)")
    add_query_arguments(parser, exclude=("return_logits", "answer"))
    add_track_arguments(parser)
    add_engine_arguments(parser)


def _endpoint(args: argparse.Namespace) -> str | None:
    """The model server to use (``--server``, or the one a ``server:`` source names), or None."""
    if args.source.strip().lower() == "none":
        return args.server
    from ..console.sources import parse_source

    kind, arg = parse_source(args.source)  # a bad --source fails before any model loads
    if args.server and kind == "server" and args.server != arg:
        raise InvalidArgumentError(f"--server {args.server} and --source server:{arg} name two model servers")
    return args.server or (arg if kind == "server" else None)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..backend import is_server_address, open_backend
    from ..config import engine_config_from_args
    from ..options import INTERACTIVE_MODES, query_options_from_args, track_options_from_args
    from ..serving.security import check_access

    endpoint = _endpoint(args)
    query, track = query_options_from_args(args), track_options_from_args(args)
    if query.mode not in INTERACTIVE_MODES:
        raise InvalidArgumentError(f"--mode must be one of {', '.join(INTERACTIVE_MODES)} for the tools; got "
                                   f"{query.mode!r}")
    config = engine_config_from_args(args)
    try:
        from ..integrations.mcp import build_server
        from ..integrations.mcp_http import MCPHttpServer
        from ..integrations.tool_session import ToolSession
    except ImportError as exc:
        raise DependencyError(f"lisa-agent mcp needs its extra: pip install 'lisa-agent[mcp]' ({exc})") from None
    # everything that can be refused is refused before a model loads (minutes for a 7B model)
    if args.transport == "http":
        check_access(args.bind, args.port, args.token, listen=True)
    address = endpoint or config.model
    model_name = f"model server {address}" if is_server_address(address) else f"model {address}"
    with contextlib.redirect_stdout(sys.stderr):  # stdio: stdout is the protocol's alone
        try:
            backend = open_backend(address, config=config, timeout=args.server_timeout)
        except ImportError as exc:
            raise DependencyError(f"a model server needs pip install 'lisa-agent[server]' ({exc})") from None
        source = None
        if args.source.strip().lower() != "none":
            from ..console.sources import open_source

            source = open_source(args.source, fps=args.fps, size=args.size)
    session = ToolSession(backend, source, query=query, track=track, image_folders=args.image_folder,
                          image_hosts=args.image_host, model_name=model_name).start()
    server = build_server(session)
    try:
        _say(f"lisa-agent mcp: {session.source_name}; {model_name}; transport {args.transport}")
        if args.transport == "stdio":
            server.run("stdio")
        else:
            http = MCPHttpServer(server, host=args.bind, port=args.port, token=args.token)

            def started() -> None:
                print(f"MCP endpoint {http.url}", flush=True)
                if http.require_token:
                    print(f"access token: {http.token} (send 'Authorization: Bearer TOKEN' on every request)",
                          flush=True)

            async def serve() -> None:
                with contextlib.suppress(NotImplementedError, RuntimeError):  # SIGTERM stops it as Ctrl-C does
                    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, http.request_stop)
                await http.serve(on_started=started)

            asyncio.run(serve())
    finally:
        session.close()
        close = getattr(backend, "close", None)
        if endpoint and callable(close):
            close()
    return 0
