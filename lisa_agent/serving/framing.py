"""The LISA wire protocol's envelope, version 2: versions, operations, limits, the header frame and the reply.

A request is a ZeroMQ multipart message (after the REQ-style empty delimiter frame)::

    frame 0   header: UTF-8 JSON object (see docs/protocol.md)
    frame 1   image bytes (``segment`` only): raw HxWx3 uint8 RGB pixels, or a JPEG / PNG file
    frame 2   optional depth aligned with the image: raw HxW uint16 or float32, little-endian

A reply is a JSON header frame, optionally followed by raw frames (mask logits)::

    {"v": 2, "id": <request id>, "ok": true, "result": {...}}
    {"v": 2, "id": <request id>, "ok": false, "error": {"code": "...", "message": "...", "advice": "..."}}

Here: reading the header frame (:func:`parse_header`: size, JSON, version, id, fields, op) and writing it
(:func:`build_header`), and the reply both ways (:func:`encode_reply`, :func:`parse_reply`). What a ``segment``
request may say beyond that is checked in :mod:`~lisa_agent.serving.protocol`; its pixels are
:mod:`~lisa_agent.serving.codecs`. Pure Python (zmq is not imported here).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CODES, Code, ProtocolError, RemoteError, describe_error

#: Version of this wire format; a header with another ``v`` gets ``unsupported_version``.
PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (2,)

OPS = ("segment", "info", "health")
HEADER_KEYS = frozenset({"v", "id", "op", "query", "image", "depth", "options", "timeout_ms"})
MAX_ID_CHARS = 128
#: Deepest nesting of arrays and objects a JSON document a door reads may have (a header needs 3).
MAX_JSON_DEPTH = 32

#: Every code a server may put in a reply (``unavailable`` is the client's own).
ERROR_CODES = frozenset(CODES) - {Code.UNAVAILABLE}


@dataclass(frozen=True)
class Limits:
    """What a server accepts. Each violation is answered with ``too_large`` (or ``bad_request``)."""

    max_frame_bytes: int = 64 * 1024 * 1024  # any single frame (header, image or depth)
    max_side: int = 4096  # image height / width after decoding
    max_header_bytes: int = 64 * 1024
    max_query_chars: int = 4000
    max_new_tokens: int = 1024  # the most a request's chat answer may generate here (the library allows more)

    def to_dict(self) -> dict[str, int]:
        return {"max_frame_bytes": self.max_frame_bytes, "max_side": self.max_side,
                "max_header_bytes": self.max_header_bytes, "max_query_chars": self.max_query_chars,
                "max_new_tokens": self.max_new_tokens}


def json_loads(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for what callers send: a document nested deeper than ``max_depth`` arrays / objects is a
    ``ValueError`` like any other malformed JSON (``json.loads`` itself raises ``RecursionError`` at ~1000
    levels, and a value nested a few hundred deep would do the same later in ``repr`` or ``json.dumps``)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested too deeply (at most {max_depth} levels of arrays and objects)") from None
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > max_depth:
                    raise ValueError(f"JSON nested too deeply (at most {max_depth} levels of arrays and objects)")
                pending.append((child, depth + 1))
    return value


# ------------------------------------------------------------------------------------------ headers


def parse_header(data: bytes, limits: Limits) -> dict[str, Any]:
    """Server side: frame 0 as a dict, checking size, JSON syntax, version, id type, field names and op."""
    if len(data) > limits.max_header_bytes:
        raise ProtocolError(Code.TOO_LARGE, f"header is {len(data)} bytes; the limit is {limits.max_header_bytes}")
    try:
        header = json_loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(Code.BAD_REQUEST, f"header frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(Code.BAD_REQUEST, f"header must be a JSON object; got {type(header).__name__}")
    rid = header.get("id")
    if isinstance(rid, bool) or not (isinstance(rid, int) or (isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS)):
        raise ProtocolError(Code.BAD_REQUEST, f"header.id must be a non-empty string (at most {MAX_ID_CHARS} chars) "
                                              f"or an integer; got {rid!r}")
    version = header.get("v")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise ProtocolError(Code.UNSUPPORTED_VERSION, f"protocol version {version!r} is not supported; this server "
                                                      f"speaks {list(SUPPORTED_VERSIONS)}", rid)
    unknown = sorted(set(header) - HEADER_KEYS)
    if unknown:
        raise ProtocolError(Code.BAD_REQUEST, f"unknown header fields {unknown}; known: {sorted(HEADER_KEYS)}", rid)
    op = header.get("op")
    if op not in OPS:
        raise ProtocolError(Code.UNKNOWN_OP, f"unknown op {op!r}; expected one of {list(OPS)}", rid)
    return header


def build_header(request_id: Any, op: str, **fields: Any) -> bytes:
    """Client side: frame 0 of a request (``v`` filled in; ``None`` fields left out)."""
    header = {"v": PROTOCOL_VERSION, "id": request_id, "op": op}
    header.update({k: v for k, v in fields.items() if v is not None})
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


# ------------------------------------------------------------------------------------------ replies


def encode_reply(request_id: Any, result: Any = None, error: BaseException | None = None,
                 extra_frames: list[bytes] | None = None) -> list[bytes]:
    """Server side: the reply frames (header JSON first). ``error`` wins over ``result``: its
    :func:`~lisa_agent.errors.describe_error` (``{"code", "message", "advice"}``)."""
    if error is not None:
        body = {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": describe_error(error).to_dict()}
        extra_frames = None
    else:
        body = {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}
    frames = [json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")]
    return frames + list(extra_frames or [])


def parse_reply(frames: list[bytes]) -> dict[str, Any]:
    """Client side: the reply header as a dict (``frames`` after the delimiter); raises RemoteError
    when the server sent something that is not a protocol reply."""
    if not frames:
        raise RemoteError(Code.INTERNAL, "empty reply from server")
    try:
        reply = json.loads(bytes(frames[0]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RemoteError(Code.INTERNAL, f"server reply is not JSON: {exc}") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise RemoteError(Code.INTERNAL, f"server reply is not a protocol reply: {reply!r:.200}")
    return reply


def answers(reply: Mapping[str, Any], request_id: Any) -> bool:
    """Client side: True when ``reply`` answers ``request_id``. An error without an id counts: the server could
    not read the request's id, and a client has one request in flight on a connection."""
    return reply.get("id") == request_id or (reply.get("id") is None and not reply.get("ok"))
