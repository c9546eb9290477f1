"""The console's HTTP pieces that are not routes: JSON error replies in the library's vocabulary, the security
headers every reply carries, and one WebSocket client's sender (newest frame only, a bounded backlog, cut off
when it stops reading). The access rule (port, token, bind address) checked before anything slow starts is
every HTTP door's, :func:`lisa_agent.serving.security.check_access` (re-exported here)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from typing import Any

from aiohttp import web

from ..errors import code_info
from ..serving.gate import reset_connection
from ..serving.security import MIN_TOKEN_CHARS, check_access  # the access rule every HTTP door shares

log = logging.getLogger("lisa_agent.console")

__all__ = ["CSP", "MIN_TOKEN_CHARS", "SECURITY_HEADERS", "TOKEN_COOKIE", "WebSocketClient", "check_access",
           "dumps_json", "error_response"]

#: Text messages kept for a WebSocket client that reads slowly (older ones are dropped).
WS_BACKLOG = 64
TOKEN_COOKIE = "lisa_console_token"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
CSP = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; style-src 'self'; "
        "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def error_response(code: str, message: str, advice: str | None = None) -> web.Response:
    """The API's error reply: ``{"error": {"code", "message", "advice"}}`` with the code's HTTP status."""
    info = code_info(code)
    return web.json_response({"error": {"code": code, "message": " ".join(str(message).split())[:2000],
                                        "advice": info.advice if advice is None else advice}},
                             status=info.status, headers=SECURITY_HEADERS)


def dumps_json(payload: Any) -> str:
    return json.dumps(payload, allow_nan=False, separators=(",", ":"))


class WebSocketClient:
    """One WebSocket client: its own sender task, the newest frame only, a bounded backlog of JSON messages.
    A send that the client does not take within ``send_timeout_s`` (it stopped reading: the socket's buffers
    are full) aborts the connection."""

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None,
                 send_timeout_s: float) -> None:
        self.ws = ws
        self.transport = transport
        self.send_timeout_s = send_timeout_s
        self.texts: collections.deque[str] = collections.deque(maxlen=WS_BACKLOG)
        self.frame: bytes | None = None
        self.wake = asyncio.Event()

    async def _send(self, data: str | bytes) -> None:
        send = self.ws.send_str(data) if isinstance(data, str) else self.ws.send_bytes(data)
        try:
            await asyncio.wait_for(send, self.send_timeout_s)
        except asyncio.TimeoutError:
            log.info("console: a WebSocket client took nothing for %.3g s; dropping it", self.send_timeout_s)
            if self.transport is not None:
                reset_connection(self.transport)  # close() would wait for the full buffer to drain, i.e. for ever
            raise ConnectionError("WebSocket client stalled") from None

    def push_text(self, text: str) -> None:
        self.texts.append(text)
        self.wake.set()

    def push_frame(self, jpeg: bytes) -> None:
        self.frame = jpeg  # a slow client skips frames; it never builds a backlog of them
        self.wake.set()

    async def run(self) -> None:
        try:
            while not self.ws.closed:
                await self.wake.wait()
                self.wake.clear()
                while self.texts and not self.ws.closed:
                    await self._send(self.texts.popleft())
                if self.frame is not None and not self.ws.closed:
                    frame, self.frame = self.frame, None
                    await self._send(frame)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass  # the client went away (possibly mid-frame): its handler cleans up
