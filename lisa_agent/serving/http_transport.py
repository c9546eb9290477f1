"""The wire protocol over HTTP: the form the Ray Serve deployment speaks (``lisa-agent serve --engine ray``).

A request is one ``POST`` to the deployment's route (``http://HOST:8000/lisa``) whose JSON body holds
the ZeroMQ message's frames: the protocol header as an object, and the other frames (the image, the
depth) base64-encoded, in order::

    {"header": {"v": 2, "id": "7", "op": "segment", "query": "the cup", "image": {...}, ...},
     "frames": ["<base64 of frame 1: the image bytes>", "<base64 of frame 2: the depth bytes>"]}

``info`` and ``health`` have no ``frames`` (or ``[]``). The server turns the body back into the
ZeroMQ message's frames (:func:`decode_http_request`) and validates them with
:func:`~lisa_agent.serving.protocol.parse_request`, so a malformed request gets the same typed error
over HTTP as over ZeroMQ.

A reply's body is the ZeroMQ reply's frame 0, the protocol reply object, plus ``frames`` (base64)
when the ZeroMQ reply has more frames (the logits of ``return_logits``; a ``logits`` descriptor's
``"frame": 1`` is ``frames[0]``)::

    {"v": 2, "id": "7", "ok": true, "result": {...}}
    {"v": 2, "id": "7", "ok": false, "error": {"code": "invalid_image", "message": "..."}}

The HTTP status follows the outcome (:func:`http_status`: 200, 400, 409, 413, 500, 503, 504), for
proxies and dashboards; clients read the body. A reply that is not a protocol reply comes from
Ray Serve itself, not from the deployment: ``500`` when the replica running the request died,
``503`` with "backpressure" when every replica and Serve's queue are full, ``404`` for a route
where nothing is deployed.

Headers the client sends: ``x-session-id`` (the client's stream name: Ray Serve's session affinity
keeps a stream on one replica) and ``x-request-id`` (the request id; Serve's logs show it).

:class:`HttpExchange` is the client side of one connection (standard library ``http.client``,
kept alive between requests); :func:`request_over_http` is the clients' request on it, with their timeout and
retries. Nothing here imports Ray, ZeroMQ or torch.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from ..errors import (
    Code,
    InvalidArgumentError,
    ProtocolError,
    RemoteError,
    ServerBusyError,
    ServerUnavailableError,
    code_info,
    error_from_dict,
)
from .framing import Limits, answers, json_loads, parse_header

#: the clients' logger (their retries are logged here, whichever transport)
log = logging.getLogger("lisa_agent.serving.client")

#: Ray Serve's session-affinity header (its default; a cluster may rename it with
#: ``RAY_SERVE_SESSION_ID_HEADER_KEY``): the client's stream name.
SESSION_HEADER = "x-session-id"
#: Ray Serve logs a request under this id; the client sends the protocol request id.
REQUEST_ID_HEADER = "x-request-id"
CONTENT_TYPE = "application/json"
BODY_KEYS = frozenset({"header", "frames"})
#: frames after the header a request may carry (image, depth)
MAX_REQUEST_FRAMES = 2
#: HTTP statuses Ray Serve answers for a deployment that could not (a replica died mid-request, a
#: request timeout, a gateway in between failing): the request is sent again
RETRY_STATUSES = frozenset({408, 500, 502, 503, 504})


def is_http_endpoint(endpoint: str) -> bool:
    """True for ``http://`` and ``https://`` endpoints (the Ray Serve deployment), False for ZeroMQ ones."""
    return isinstance(endpoint, str) and endpoint.lower().startswith(("http://", "https://"))


def http_status(code: str | None) -> int:
    """The HTTP status of a reply: 200 for success (``code`` None), else by error code (500 for engine
    and unknown codes)."""
    return 200 if code is None else code_info(code).status


def max_body_bytes(limits: Limits) -> int:
    """The largest request body a server reads: two frames of ``limits.max_frame_bytes`` in base64 and
    a header of ``limits.max_header_bytes`` written with JSON escapes (6 bytes a character at most)."""
    return 2 * (4 * ((limits.max_frame_bytes + 2) // 3)) + 6 * limits.max_header_bytes + 4096


# ------------------------------------------------------------------------------------- requests


def _too_large(size: int | str, limits: Limits) -> ProtocolError:
    return ProtocolError(Code.TOO_LARGE, f"request body is {size} bytes; the limit is {max_body_bytes(limits)} "
                                         f"(frames of at most {limits.max_frame_bytes} bytes, base64-encoded)")


async def read_body(chunks: AsyncIterable[bytes], content_length: str | None, limits: Limits | None = None) -> bytes:
    """Server side: a request's body, read from ``chunks`` (the body as it streams in) no further than
    :func:`max_body_bytes`: a declared ``Content-Length`` over the limit is refused (``too_large``) before a
    byte is read, and a body streamed without one (chunked) as soon as it passes the limit."""
    limits = limits or Limits()
    limit = max_body_bytes(limits)
    if content_length is not None:
        text = content_length.strip()
        if not text.isdigit():
            raise ProtocolError(Code.BAD_REQUEST, f"Content-Length {content_length[:40]!r} is not a byte count")
        if int(text) > limit:
            raise _too_large(text, limits)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise _too_large(f"more than {limit}", limits)
    return bytes(body)


def encode_http_request(frames: Sequence[bytes]) -> bytes:
    """Client side: the JSON body of a request message (``frames[0]`` the header JSON, the rest raw)."""
    encoded = b",".join(b'"' + base64.b64encode(bytes(f)) + b'"' for f in frames[1:])
    return b'{"header":' + bytes(frames[0]) + b',"frames":[' + encoded + b"]}"


def decode_http_request(body: bytes, limits: Limits | None = None) -> list[bytes]:
    """Server side: the ZeroMQ frames of a request body (header JSON first, then the decoded frames),
    ready for :func:`~lisa_agent.serving.protocol.parse_request`.

    Raises :class:`~lisa_agent.serving.protocol.ProtocolError`: ``too_large`` for a body over
    :func:`max_body_bytes`, ``bad_request`` for a body that is not ``{"header": {...}, "frames": [...]}``
    or frames that are not base64, and the header's own errors (``unsupported_version``, ...) with
    its id, exactly as :func:`~lisa_agent.serving.protocol.parse_header` raises them.
    """
    limits = limits or Limits()
    if len(body) > max_body_bytes(limits):
        raise _too_large(len(body), limits)
    try:
        doc = json_loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(Code.BAD_REQUEST, f"request body is not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(Code.BAD_REQUEST, 'request body must be a JSON object {"header": {...}, "frames": '
                                              f'["<base64>", ...]}}; got {type(doc).__name__}')
    unknown = sorted(set(doc) - BODY_KEYS)
    if unknown or "header" not in doc:
        raise ProtocolError(Code.BAD_REQUEST, f'request body must have "header" (and "frames"); got keys '
                                              f"{sorted(doc)}")
    head = json.dumps(doc["header"], separators=(",", ":")).encode("utf-8")  # ASCII: escapes kept as escapes
    rid = parse_header(head, limits)["id"]  # the header's own typed errors, and a valid id for the ones below
    encoded = doc.get("frames", [])
    if encoded is None:
        encoded = []
    if not isinstance(encoded, list) or not all(isinstance(f, str) for f in encoded):
        raise ProtocolError(Code.BAD_REQUEST, 'request "frames" must be a list of base64 strings', rid)
    if len(encoded) > MAX_REQUEST_FRAMES:
        raise ProtocolError(Code.BAD_REQUEST, f"a request has at most {MAX_REQUEST_FRAMES} frames after the header "
                                              f"(image, depth); got {len(encoded)}", rid)
    frames = [head]
    for k, text in enumerate(encoded):
        try:
            frames.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise ProtocolError(Code.BAD_REQUEST, f"frames[{k}] is not base64 (RFC 4648, standard alphabet, "
                                                  "padded)", rid) from None
    return frames


# --------------------------------------------------------------------------------------- replies


def encode_http_reply(frames: Sequence[bytes]) -> bytes:
    """Server side: the JSON body of a reply message (:func:`~lisa_agent.serving.protocol.encode_reply`'s
    frames): frame 0 with any further frames added as base64 ``frames``."""
    head = bytes(frames[0])
    if len(frames) == 1:
        return head
    encoded = b",".join(b'"' + base64.b64encode(bytes(f)) + b'"' for f in frames[1:])
    return head[:-1] + b',"frames":[' + encoded + b"]}"


def decode_http_reply(body: bytes) -> tuple[dict[str, Any], list[bytes]] | None:
    """Client side: (reply object, reply frames) of a body the LISA deployment sent, the frames as the
    ZeroMQ client gets them (``frames[k]`` is frame k; ``frames[0]`` the body); None when the body is
    not a protocol reply (Ray Serve answered for the deployment: a dead replica, backpressure, a wrong
    route). Raises :class:`~lisa_agent.serving.protocol.RemoteError` for a protocol reply whose
    ``frames`` are damaged."""
    try:
        reply = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(reply, dict) or "ok" not in reply or "v" not in reply:
        return None
    extra = reply.pop("frames", None) or []
    frames = [bytes(body)]
    try:
        frames += [base64.b64decode(f, validate=True) for f in extra]
    except (binascii.Error, ValueError, TypeError):
        raise RemoteError(Code.INTERNAL, "server reply carries frames that are not base64") from None
    return reply, frames


# ---------------------------------------------------------------------------------------- client


class HttpExchange:
    """One kept-alive HTTP/1.1 connection to ``endpoint`` that POSTs request bodies (thread-safe: one
    exchange at a time).

    ``post`` gives the server ``timeout`` seconds in all for connecting, sending and each read of the
    reply; it raises ``TimeoutError`` / ``OSError`` / ``http.client.HTTPException`` when the exchange
    fails and then drops the connection, so the next call starts on a fresh one. A kept-alive
    connection the server closed while it was idle is reopened once, within the same ``timeout``.
    """

    def __init__(self, endpoint: str) -> None:
        parts = urlsplit(endpoint)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgumentError(f"an HTTP endpoint looks like http://HOST:PORT/ROUTE; got {endpoint!r}")
        try:
            port = parts.port
        except ValueError:
            raise InvalidArgumentError(f"the port of {endpoint!r} is not a number in 0..65535") from None
        self.endpoint = endpoint
        self.https = scheme == "https"
        self.host = parts.hostname
        self.port = port or (443 if self.https else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._conn: http.client.HTTPConnection | None = None
        self._served = 0  # replies read on the current connection
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Close the connection (the next ``post`` opens a new one). Idempotent."""
        conn, self._conn = self._conn, None
        self._served = 0
        if conn is not None:
            conn.close()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.https:
                self._conn = http.client.HTTPSConnection(self.host, self.port, context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port)
            self._served = 0
        return self._conn

    @staticmethod
    def _budget(conn: http.client.HTTPConnection, end: float) -> None:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        conn.timeout = remaining  # used to connect
        if conn.sock is not None:
            conn.sock.settimeout(remaining)  # and for each send / receive from here on

    def post(self, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
        """POST ``body`` and return (HTTP status, reply body)."""
        with self._lock:
            end = time.monotonic() + timeout
            while True:
                conn = self._connection()
                reused = self._served > 0
                try:
                    self._budget(conn, end)
                    conn.request("POST", self.path, body=body, headers=headers)
                    self._budget(conn, end)
                    response = conn.getresponse()
                    data = response.read()
                except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                    self.reset()
                    if reused and time.monotonic() < end:
                        continue  # the server closed the idle kept-alive connection: once more on a fresh one
                    raise
                except BaseException:
                    self.reset()
                    raise
                self._served += 1
                if response.will_close:
                    self.reset()
                return response.status, data


def request_over_http(exchange: HttpExchange, request_id: str, op: str, frames: list[bytes], *, timeout: float,
                      retries: int, session: str) -> tuple[dict[str, Any], list[bytes]]:
    """Client side: one request (``frames``, header first) on ``exchange``, with the client's ``timeout`` and
    ``retries`` and its stream as the ``session`` header (blocking): the reply and its frames, or the server's
    error raised as a local exception.

    An attempt that gets no reply within ``timeout`` (connection refused or dropped, a timeout) or an answer from
    Ray Serve instead of the deployment (:data:`RETRY_STATUSES`) is retried on a fresh connection, ``retries``
    times, then :class:`~lisa_agent.errors.ServerUnavailableError`; Serve's backpressure (``503``) is
    :class:`~lisa_agent.errors.ServerBusyError`."""
    endpoint = exchange.endpoint
    body = encode_http_request(frames)
    headers = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE, SESSION_HEADER: session,
               REQUEST_ID_HEADER: request_id}
    last = "no attempt"
    for attempt in range(retries + 1):
        if attempt:
            log.warning("LISA server %s: %s on %r id=%s; retrying (attempt %d of %d)", endpoint, last, op,
                        request_id, attempt + 1, retries + 1)
        try:
            status, data = exchange.post(body, headers, timeout)
        except TimeoutError:
            last = f"no reply within {timeout:g} s"
            continue
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(min(0.05 * 2 ** attempt, 0.5))  # refused at once: give a restarting server a moment
            continue
        decoded = decode_http_reply(data)
        if decoded is not None:
            reply, rframes = decoded
            if not answers(reply, request_id):
                raise RemoteError(Code.INTERNAL, f"{endpoint} answered request {request_id!r} with the reply to "
                                                 f"{reply.get('id')!r}")
            if not reply.get("ok"):
                raise error_from_dict(reply.get("error"))
            return reply, rframes
        text = " ".join(data[:300].decode("utf-8", "replace").split()) or "(empty body)"
        if status == 503 and "backpressure" in text.lower():
            raise ServerBusyError(f"{endpoint} is busy (Ray Serve: {text}); nothing was run, retry later")
        if status not in RETRY_STATUSES:
            raise ServerUnavailableError(
                f"{endpoint} answered {op!r} with HTTP {status} ({text}), not a LISA reply: is the route right "
                "(`lisa-agent serve --engine ray` serves http://HOST:PORT/lisa)?")
        last = f"HTTP {status} ({text})"
        exchange.reset()
        time.sleep(min(0.05 * 2 ** attempt, 0.5))
    raise ServerUnavailableError(
        f"no reply from the LISA server at {endpoint} to {op!r} after {retries + 1} attempt(s) of "
        f"{timeout:g} s (last: {last}): is `lisa-agent serve --engine ray` running there?")
