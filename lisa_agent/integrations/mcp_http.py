"""The MCP server over streamable HTTP, behind the access rule every HTTP door of lisa-agent shares.

Bound to a loopback address, the server answers this machine only and checks the ``Host`` header (DNS
rebinding); bound to any other address it needs an access token (given, or generated and printed at start:
:func:`lisa_agent.serving.security.check_access`, the console's rule), sent on every request as
``Authorization: Bearer TOKEN``. Requests from web pages of other sites are refused (``Origin``), as POSTs that
are not JSON (:func:`lisa_agent.serving.security.refuse_browser_request`). A refusal is a JSON reply
``{"error": {"code", "message", "advice"}}`` with the code's HTTP status (401 ``unauthorized``, 403
``forbidden_host`` / ``cross_origin``, 415).

The MCP endpoint is ``http://HOST:PORT/mcp``. :class:`MCPHttpServer` runs uvicorn on a socket it binds itself,
so port 0 (any free port) tells the chosen port at once (:attr:`MCPHttpServer.port`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from ..errors import Code, code_info
from ..serving.security import access_token, refuse_browser_request
from .tool_session import MAX_INLINE_IMAGE_BYTES

__all__ = ["MCP_PATH", "MCPHttpServer"]

#: Where the MCP endpoint is served.
MCP_PATH = "/mcp"
#: Largest request body: an inline image at its limit, base64-encoded, and the JSON around it.
MAX_BODY_BYTES = MAX_INLINE_IMAGE_BYTES * 4 // 3 + 64 * 1024

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AccessGuard:
    """ASGI middleware: the browser guard, then the token (where one is required), before the MCP app.

    Args:
        app: the MCP server's Starlette app.
        token: the access token every request must carry (``Authorization: Bearer TOKEN``), or None (loopback).
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = refuse_browser_request(str(scope.get("method", "GET")), headers.get("host"), headers.get("origin"),
                                         headers.get("content-type"), check_host=self.token is None)
        if refusal is not None:
            await _refuse(send, refusal.code, refusal.message)
            return
        if self.token is not None:
            scheme, _, offered = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(offered.strip().encode(), self.token.encode()):
                await _refuse(send, Code.UNAUTHORIZED, "this MCP server needs its access token: send "
                                                       "'Authorization: Bearer TOKEN' (the token printed at its start)")
                return
        await self.app(scope, receive, send)


async def _refuse(send: Send, code: str, message: str) -> None:
    info = code_info(code)
    body = json.dumps({"error": {"code": code, "message": message, "advice": info.advice}}).encode()
    await send({"type": "http.response.start", "status": info.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


class MCPHttpServer:
    """``server`` on streamable HTTP at ``http://HOST:PORT/mcp``.

    Args:
        server: the MCP server (:func:`lisa_agent.integrations.mcp.build_server`).
        host: address to bind; loopback needs no token, anything else does.
        port: TCP port (0: any free port; :attr:`port` tells which).
        token: the access token; None: none on loopback, a generated one elsewhere (:attr:`token`).

    Raises:
        InvalidArgumentError: a bad port or a weak token (before anything binds).
    """

    def __init__(self, server: MCPServer, *, host: str = "127.0.0.1", port: int = 8090,
                 token: str | None = None) -> None:
        self.token = access_token(host, port, token)
        self.require_token = self.token is not None
        self.server = server
        self.host = host
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        self._socket = socket.socket(family, kind, proto)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind(address)
        except OSError:
            self._socket.close()
            raise
        self.port: int = self._socket.getsockname()[1]
        self._uvicorn: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The MCP endpoint's URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{MCP_PATH}"

    def app(self) -> ASGIApp:
        """The guarded ASGI app (the SDK's own Host check is off: the guard applies the library's rule)."""
        inner = self.server.streamable_http_app(
            streamable_http_path=MCP_PATH, max_request_body_size=MAX_BODY_BYTES, host=self.host,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
        return AccessGuard(inner, self.token if self.require_token else None)

    async def serve(self, on_started: Callable[[], None] | None = None) -> None:
        """Serve until :meth:`request_stop` (or the task is cancelled); ``on_started`` once it listens."""
        import uvicorn

        config = uvicorn.Config(self.app(), log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(config)
        self._socket.listen(128)
        if on_started is not None:
            loop = asyncio.get_running_loop()

            async def announce() -> None:
                while not self._uvicorn.started:
                    await asyncio.sleep(0.01)
                on_started()

            announcer = loop.create_task(announce())
        try:
            await self._uvicorn.serve(sockets=[self._socket])
        finally:
            if on_started is not None:
                announcer.cancel()

    def request_stop(self) -> None:
        """Ask the server to stop (from any thread)."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    def start_in_thread(self) -> MCPHttpServer:
        """Serve in a thread of its own (tests, notebooks); returns once it listens."""
        started = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve(started.set)), name="lisa-mcp-http",
                                        daemon=True)
        self._thread.start()
        if not started.wait(60.0):
            raise RuntimeError("the MCP HTTP server did not start within 60 s")
        return self

    def stop_thread(self) -> None:
        """Stop a server started with :meth:`start_in_thread`."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(30.0)
            self._thread = None
        self._socket.close()
