"""The console's web server (aiohttp): the page, its API and the WebSocket (``docs/console.md``).

Routes: ``GET /`` the page and ``GET /static/NAME`` its assets (package data, no CDN); ``GET /api/state``;
``POST /api/instruction`` ``{"text", "mode"}`` -> the result schema plus the console's envelope;
``POST /api/target`` ``{"index"}`` or ``{"point": [x, y]}``; ``POST /api/continuous`` ``{"on"}``;
``GET /api/frame.jpg`` the newest frame; ``GET /ws`` a WebSocket pushing frames (binary JPEG) and
results, state changes and errors (JSON text).

Model calls run in a thread pool (:meth:`ConsoleCore.ask` blocks), never on the event loop, so the page
keeps its live view while a query runs. Bad input gets a JSON error (``{"error": {"code", "message"}}``)
with a 4xx status; nothing a client sends stops the server.

Access: bound to a loopback address, the console answers this machine only (and checks the ``Host``
header, so a web page elsewhere cannot reach it through DNS rebinding). Bound to any other address it
needs a token (``--token``, or one generated and printed at start), checked on every request and
WebSocket: ``Authorization: Bearer TOKEN``, ``?token=TOKEN``, or the cookie the page gets when opened
with ``?token=``. Cross-origin requests (an ``Origin`` other than the console's own) and POSTs that are
not ``application/json`` are refused, so another site cannot drive the robot through the operator's browser
(the rule every HTTP door shares: :func:`~lisa_agent.serving.security.refuse_browser_request`).

Stalled connections are dropped: one that has not sent a complete request head ``header_timeout_s`` after
it opened (or after its last reply) is closed, and a WebSocket client that does not take what is sent to
it (or answer the heartbeat) within ``ws_send_timeout_s`` (``ws_heartbeat_s``) is cut off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from ..errors import Code, InvalidArgumentError, LisaError, NoFrameError, UnknownTargetError, describe_error
from ..serving.framing import json_loads
from ..serving.security import access_token, is_loopback_host, refuse_browser_request
from .answers import Answer, FrameEvent
from .core import MAX_PENDING, ConsoleCore
from .http import (
    CSP,
    SECURITY_HEADERS,
    TOKEN_COOKIE,
    WebSocketClient,
    dumps_json,
    error_response,
)

log = logging.getLogger("lisa_agent.console")

#: The page's files (package data).
STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS = {"index.html": "text/html", "console.js": "text/javascript", "console.css": "text/css",
          "favicon.svg": "image/svg+xml"}
#: Largest request body (bytes): an instruction is at most MAX_INSTRUCTION_CHARS characters.
MAX_BODY_BYTES = 64 * 1024
#: ``localhost`` and loopback addresses: the serving layer's rule (:func:`~lisa_agent.serving.security.is_loopback_host`).
is_loopback = is_loopback_host


class ConsoleServer:
    """The console's HTTP server over a :class:`ConsoleCore`.

    Args:
        core: the console (started or not; :meth:`start` starts it).
        host: address to bind; loopback needs no token, anything else does.
        port: TCP port (0: any free port; :attr:`port` tells which after :meth:`start`).
        token: the access token; None: none on loopback, a generated one elsewhere (:attr:`token`).
        header_timeout_s: a connection that has not sent a complete request head this many seconds after it
            opened (or after its last reply) is closed (slow or idle clients).
        ws_heartbeat_s: WebSocket ping period; a client that does not answer within half of it is dropped.
        ws_send_timeout_s: a WebSocket client that takes nothing sent to it for this long is cut off.
    """

    def __init__(self, core: ConsoleCore, *, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                 header_timeout_s: float = 15.0, ws_heartbeat_s: float = 20.0, ws_send_timeout_s: float = 20.0
                 ) -> None:
        token = access_token(host, port, token)
        for name, value in (("header_timeout_s", header_timeout_s), ("ws_heartbeat_s", ws_heartbeat_s),
                            ("ws_send_timeout_s", ws_send_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise InvalidArgumentError(f"{name} must be a positive number of seconds; got {value!r}")
        self.core = core
        self.host = host
        self.port = port
        self.require_token = token is not None
        self.token = token
        self.header_timeout_s = float(header_timeout_s)
        self.ws_heartbeat_s = float(ws_heartbeat_s)
        self.ws_send_timeout_s = float(ws_send_timeout_s)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=MAX_PENDING + 2,
                                                           thread_name_prefix="lisa-console-model")
        self._clients: set[WebSocketClient] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    # ------------------------------------------------------------------ application
    def app(self) -> web.Application:
        """The aiohttp application (routes and middlewares)."""
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._guard])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/frame.jpg", self._frame)
        app.router.add_post("/api/instruction", self._instruction)
        app.router.add_post("/api/target", self._target)
        app.router.add_post("/api/continuous", self._continuous)
        app.router.add_get("/ws", self._websocket)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED, 413: Code.TOO_LARGE}.get(exc.status,
                                                                                                   Code.BAD_REQUEST)
            return error_response(code, exc.text or exc.reason)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the model's failure or a bug: answer, log, keep serving
            if not isinstance(exc, LisaError):
                log.exception("console: %s %s failed", request.method, request.path)
            info = describe_error(exc)
            return error_response(info.code, info.message, info.advice)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        refusal = refuse_browser_request(request.method, request.headers.get("Host"), request.headers.get("Origin"),
                                         request.headers.get("Content-Type"), check_host=not self.require_token,
                                         hosts=[self.host])
        if refusal is not None:
            return error_response(refusal.code, refusal.message)
        from_query = False
        if self.require_token:
            offered = self._offered_token(request)
            if offered is None or not hmac.compare_digest(offered.encode(), str(self.token).encode()):
                return error_response(Code.UNAUTHORIZED, "this console needs its access token: open the URL printed at "
                              "its start (…/?token=…) or send 'Authorization: Bearer TOKEN'")
            from_query = request.query.get("token") is not None
        response = await handler(request)
        if from_query and self.token is not None and not isinstance(response, web.WebSocketResponse):
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict", path="/")
        return response

    @staticmethod
    def _offered_token(request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        for value in (request.headers.get("X-Lisa-Token"), request.query.get("token"), request.cookies.get(TOKEN_COOKIE)):
            if value:
                return value
        return None

    # ------------------------------------------------------------------ page
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return self._asset("index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        return self._asset(request.match_info["name"])

    def _asset(self, name: str) -> web.StreamResponse:
        kind = ASSETS.get(name)
        if kind is None:
            return error_response(Code.NOT_FOUND, f"no asset {name!r}")
        body = (STATIC_DIR / name).read_bytes()
        headers = {**SECURITY_HEADERS, "Content-Security-Policy": CSP, "Cache-Control": "no-cache"}
        return web.Response(body=body, content_type=kind, charset="utf-8" if kind.startswith("text/") else None,
                            headers=headers)

    # ------------------------------------------------------------------ API
    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()  # larger than MAX_BODY_BYTES: aiohttp answers 413
        try:
            body = json_loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidArgumentError(f"malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidArgumentError(f"the body must be a JSON object; got {type(body).__name__}")
        return body

    @staticmethod
    def _only(body: dict[str, Any], allowed: set[str]) -> None:
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise InvalidArgumentError(f"unknown keys {unknown}; allowed: {sorted(allowed)}")

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.core.state(), dumps=dumps_json, headers=SECURITY_HEADERS)

    async def _frame(self, request: web.Request) -> web.Response:
        latest = self.core.latest_frame()
        if latest is None:
            raise NoFrameError("no frame yet")
        return web.Response(body=latest.jpeg, content_type="image/jpeg", headers=SECURITY_HEADERS)

    async def _instruction(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._only(body, {"text", "mode"})
        if "text" not in body:
            raise InvalidArgumentError('the body needs "text": the instruction, e.g. "grab something to cut with"')
        self.core.check_instruction(body["text"], body.get("mode"))  # refused here, before a worker is taken
        answer: Answer = await asyncio.get_running_loop().run_in_executor(self._pool, self.core.ask, body["text"],
                                                                          body.get("mode"))
        target = self.core.target()
        return web.json_response(answer.to_dict(None if target is None or target["request"] != answer.request
                                                else target["index"]), dumps=dumps_json, headers=SECURITY_HEADERS)

    async def _target(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._only(body, {"index", "point"})
        if "index" in body and "point" in body:
            raise InvalidArgumentError('give "index" or "point", not both')
        if "point" in body:
            point = body["point"]
            if not isinstance(point, list) or len(point) != 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in point):
                raise UnknownTargetError(f"point must be [x, y] in pixels; got {point!r}")
            state = self.core.choose_target(point=(float(point[0]), float(point[1])))
        elif "index" in body:
            state = self.core.choose_target(index=body["index"]) if body["index"] is not None \
                else self.core.choose_target()
        else:
            raise InvalidArgumentError('the body needs "index" (a mask number, or null to clear) or "point": [x, y]')
        state.pop("last_result", None)
        return web.json_response(state, dumps=dumps_json, headers=SECURITY_HEADERS)

    async def _continuous(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._only(body, {"on"})
        if not isinstance(body.get("on"), bool):
            raise InvalidArgumentError('the body needs "on": true or false')
        state = await asyncio.get_running_loop().run_in_executor(self._pool, self.core.set_continuous, body["on"])
        state.pop("last_result", None)
        return web.json_response(state, dumps=dumps_json, headers=SECURITY_HEADERS)

    # ------------------------------------------------------------------ WebSocket
    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=self.ws_heartbeat_s, max_msg_size=MAX_BODY_BYTES)
        transport = request.transport
        await ws.prepare(request)
        client = WebSocketClient(ws, transport, self.ws_send_timeout_s)
        client.push_text(dumps_json({"type": "hello", "state": self.core.state()}))
        latest = self.core.latest_frame()
        if latest is not None:
            client.push_frame(latest.jpeg)
        self._clients.add(client)
        sender = asyncio.get_running_loop().create_task(client.run())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT and msg.data.strip() == '{"type":"ping"}':
                    client.push_text(dumps_json({"type": "pong"}))
                elif msg.type == WSMsgType.ERROR:
                    break
                # anything else a client sends is ignored: the API is HTTP
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(client)
            sender.cancel()
            if not ws.closed:
                await ws.close()
        return ws

    def _on_core(self, kind: str, payload: Any) -> None:
        """Core listener (the core's threads): serialize once, hand to the loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if kind == "frame":
            assert isinstance(payload, FrameEvent)
            data: str | bytes = payload.jpeg
        elif kind == "answer":
            assert isinstance(payload, Answer)
            target = self.core.target()
            index = None if target is None or target["request"] != payload.request else target["index"]
            data = dumps_json({"type": "result", "result": payload.to_dict(index)})
        elif kind == "state":
            data = dumps_json({"type": "state", "state": payload})
        elif kind == "error":
            data = dumps_json({"type": "error", "error": payload})
        else:
            return
        try:
            loop.call_soon_threadsafe(self._broadcast, data)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _broadcast(self, data: str | bytes) -> None:
        for client in list(self._clients):
            if isinstance(data, bytes):
                client.push_frame(data)
            else:
                client.push_text(data)

    # ------------------------------------------------------------------ running
    @property
    def websocket_clients(self) -> int:
        """How many WebSocket clients are connected now."""
        return len(self._clients)

    @property
    def url(self) -> str:
        """The page's address (with the token when one is needed)."""
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.require_token else "")

    async def start(self) -> None:
        """Start the core and serve (returns once listening; :attr:`port` is then the bound port)."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.core.add_listener(self._on_core)
        self.core.start()
        # aiohttp closes a connection still waiting for a complete request head when its keep-alive timer
        # runs out (started when the connection opens, restarted after each reply): the header timeout
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                     keepalive_timeout=self.header_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])

    async def stop(self) -> None:
        """Close every WebSocket and stop serving (the core keeps running; close it yourself)."""
        self.core.remove_listener(self._on_core)
        for client in list(self._clients):
            await client.ws.close(code=1001, message=b"console stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._stopped is not None:
            self._stopped.set()

    async def serve_forever(self, on_started: Callable[[], None] | None = None) -> None:
        """Start (then call ``on_started``), and serve until :meth:`request_stop` (or cancellation)."""
        await self.start()
        if on_started is not None:
            on_started()
        assert self._stopped is not None
        try:
            await self._stopped.wait()
        finally:
            if self._runner is not None:
                await self.stop()

    def request_stop(self) -> None:
        """Ask a server running in another thread (:meth:`serve_forever`, :meth:`start_in_thread`) to stop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: self._stopped.set() if self._stopped else None)

    def start_in_thread(self, timeout: float = 30.0) -> ConsoleServer:
        """Serve from a thread of its own (tests, embedding); returns once listening."""
        started = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                await self.start()
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            assert self._stopped is not None
            await self._stopped.wait()
            await self.stop()

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), name="lisa-console-web", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError(f"the console did not start within {timeout:g} s")
        if failure:
            raise failure[0]
        return self

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started with :meth:`start_in_thread`."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


__all__ = ["ConsoleServer", "is_loopback", "STATIC_DIR"]
