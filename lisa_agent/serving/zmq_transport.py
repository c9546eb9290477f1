"""The clients' ZeroMQ transport: the ZeroMQ guide's "Lazy Pirate" pattern on a DEALER socket.

Send, poll for the reply up to ``timeout`` seconds, and when nothing comes close the socket (linger 0), open a
fresh one and resend, ``retries`` times; then raise :class:`~lisa_agent.errors.ServerUnavailableError`. Every
request waits at most ``timeout * (retries + 1)`` seconds. Replies are matched by request id, so a late reply
to an earlier request can never be mistaken for the current one (it is dropped). :class:`DealerSocket` blocks;
:class:`AsyncDealerSocket` is its asyncio twin. The server's error replies are raised as local exceptions
(:func:`~lisa_agent.errors.error_from_dict`).
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import ServerUnavailableError, error_from_dict
from .framing import answers, parse_reply

Reply = tuple[dict[str, Any], list[bytes]]


def match_reply(request_id: str, frames: list[bytes]) -> Reply | None:
    """The reply and its frames if ``frames`` answer ``request_id`` (else None: a stale reply); raises the
    server's error as a local exception."""
    if frames and frames[0] == b"":
        frames = frames[1:]
    reply = parse_reply(frames)
    if not answers(reply, request_id):
        return None  # a late reply to an earlier request
    if not reply.get("ok"):
        raise error_from_dict(reply.get("error"))
    return reply, frames


class _Dealer:
    """A DEALER socket to ``endpoint``, made on first use and again after each reset.

    Args:
        endpoint: ``tcp://HOST:PORT`` (``ipc://``, ...).
        server_key / client_keys: CurveZMQ keys (the server's public key, this client's (public, secret)
            pair), both or neither.
    """

    def __init__(self, endpoint: str, server_key: bytes | None = None,
                 client_keys: tuple[bytes, bytes] | None = None) -> None:
        self.endpoint = endpoint
        self._server_key = server_key
        self._client_keys = client_keys
        self._ctx: Any = self._context()
        self._sock: Any = None

    @staticmethod
    def _context() -> Any:
        raise NotImplementedError

    def _open(self) -> Any:
        import zmq

        if self._sock is None:
            self._sock = sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self._server_key is not None and self._client_keys is not None:
                sock.curve_serverkey = self._server_key
                sock.curve_publickey, sock.curve_secretkey = self._client_keys
            sock.connect(self.endpoint)
        return self._sock

    def reset(self) -> None:
        """Close the socket (the next request opens a fresh one). Idempotent."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _unavailable(self, op: str, timeout: float, retries: int) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"no reply from the LISA server at {self.endpoint} to {op!r} after {retries + 1} attempt(s) of "
            f"{timeout:g} s: is `lisa-agent serve` running there (and, with CurveZMQ, is this client's key "
            "allow-listed)?")


class DealerSocket(_Dealer):
    """Lazy Pirate requests on a DEALER socket, blocking; the sockets come from the process's ZeroMQ context."""

    @staticmethod
    def _context() -> Any:
        import zmq

        return zmq.Context.instance()

    def close(self) -> None:
        self.reset()

    def request(self, request_id: str, op: str, frames: list[bytes], timeout: float, retries: int) -> Reply:
        """Send a request's frames and return its reply (see the module docstring)."""
        import zmq

        for _attempt in range(retries + 1):
            sock = self._open()
            try:
                sock.send_multipart([b"", *frames], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass  # nothing to send to: wait out the timeout like a lost reply
            end = time.monotonic() + timeout
            while (remaining := end - time.monotonic()) > 0:
                if not sock.poll(remaining * 1000.0, zmq.POLLIN):
                    break
                matched = match_reply(request_id, sock.recv_multipart())
                if matched is not None:
                    return matched
            self.reset()  # Lazy Pirate: the socket may be stuck; a fresh one reconnects cleanly
        raise self._unavailable(op, timeout, retries)


class AsyncDealerSocket(_Dealer):
    """The asyncio twin of :class:`DealerSocket`, on a ``zmq.asyncio`` context of its own (ended by :meth:`close`)."""

    @staticmethod
    def _context() -> Any:
        import zmq.asyncio

        return zmq.asyncio.Context()

    def close(self) -> None:
        self.reset()
        if not self._ctx.closed:
            self._ctx.term()

    async def request(self, request_id: str, op: str, frames: list[bytes], timeout: float, retries: int) -> Reply:
        """Send a request's frames and return its reply (see the module docstring)."""
        import zmq

        for _attempt in range(retries + 1):
            sock = self._open()
            try:
                await sock.send_multipart([b"", *frames], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
            end = time.monotonic() + timeout
            while (remaining := end - time.monotonic()) > 0:
                if not await sock.poll(remaining * 1000.0, zmq.POLLIN):
                    break
                matched = match_reply(request_id, await sock.recv_multipart())
                if matched is not None:
                    return matched
            self.reset()
        raise self._unavailable(op, timeout, retries)
