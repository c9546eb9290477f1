"""The LISA wire protocol, version 2: message layout, validation, image coding and typed error codes.

A request is a ZeroMQ multipart message (after the REQ-style empty delimiter frame)::

    frame 0   header: UTF-8 JSON object (see docs/protocol.md)
    frame 1   image bytes (``segment`` only): raw HxWx3 uint8 RGB pixels, or a JPEG / PNG file
    frame 2   optional depth aligned with the image: raw HxW uint16 or float32, little-endian

A reply is a JSON header frame, optionally followed by raw frames (mask logits)::

    {"v": 2, "id": <request id>, "ok": true, "result": {...}}
    {"v": 2, "id": <request id>, "ok": false, "error": {"code": "...", "message": "..."}}

Version 2 (lisa-agent 0.2): results are the library's result schema (docs/result.md: per-mask
``target`` instead of version 1's ``depth_m`` / ``point``), and requests may carry ``options.stamp``,
``depth.stamp`` and ``depth.tolerance_s``. Version 1 clients are answered ``unsupported_version``.

This module is pure Python + numpy (zmq is not imported here): the server and both clients use it,
and it is what ``docs/protocol.md`` describes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from ..config import mask_budget
from ..errors import (
    CODES,
    Code,
    InvalidQueryError,
    LisaError,
    ProtocolError,
    RemoteError,
    describe_error,
)
from ..frames import DEPTH_TOLERANCE_S, Frame, check_query
from ..options import QueryOptions, TrackOptions
from .codecs import DEFAULT_DEPTH_SCALE, DEPTH_DTYPES, decode_depth, decode_image

#: Version of this wire format; a header with another ``v`` gets ``unsupported_version``.
PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (2,)

OPS = ("segment", "info", "health")
IMAGE_FORMATS = ("raw", "jpeg", "png")

HEADER_KEYS = frozenset({"v", "id", "op", "query", "image", "depth", "options", "timeout_ms"})
#: ``options`` keys: the query options (:class:`~lisa_agent.options.QueryOptions`), the frame's (``frame_id``,
#: ``stamp``, ``intrinsics``), the stream's (``stream``, ``latest_only``) and ``track``
#: (:class:`~lisa_agent.options.TrackOptions` or null).
OPTION_KEYS = frozenset(QueryOptions.field_names()) | {"frame_id", "stamp", "latest_only", "stream", "intrinsics",
                                                       "track"}
DEPTH_KEYS = frozenset({"shape", "dtype", "scale", "stamp", "tolerance_s"})
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


@dataclass
class Request:
    """A validated request. For ``segment`` the image is still encoded (decode with :meth:`image`)."""

    id: Any
    op: str
    query: str = ""
    image_spec: dict[str, Any] = field(default_factory=dict)
    image_data: bytes = b""
    depth_spec: dict[str, Any] | None = None
    depth_data: bytes | None = None
    #: the frame's and the stream's options: ``frame_id``, ``stamp``, ``intrinsics``, ``stream``, ``latest_only``
    options: dict[str, Any] = field(default_factory=dict)
    timeout_ms: float | None = None
    #: how the query is answered (``options.mode``, ``max_new_tokens``, ``answer``, ``return_logits``)
    query_options: QueryOptions = field(default_factory=QueryOptions)
    #: ``options.track``: the request's stream is tracked between reasoning steps (None: not)
    track: TrackOptions | None = None

    @property
    def stream(self) -> str | None:
        return self.options.get("stream")

    def frame_key(self) -> str:
        """Key of the frame's pixels: a digest of the image frame's bytes and format, whatever ids the
        client gives its frames (requests of any client on the same pixels share one encoding; a
        request never runs on another request's pixels)."""
        h = xxhash.xxh3_128(json.dumps(self.image_spec, sort_keys=True).encode())
        h.update(self.image_data)
        return "xxh3:" + h.hexdigest()

    def image(self, limits: Limits) -> np.ndarray:
        return decode_image(self.image_spec, self.image_data, limits.max_side)

    def check_mask_budget(self, info: Mapping[str, Any]) -> None:
        """Refuse (``too_large``) a forced answer (``options.answer``) with more ``[SEG]`` than the engine
        described by ``info`` (its ``info()``: ``max_masks``, ``max_mask_megapixels``, ``mask_views``) makes
        on this frame, so a server can refuse it before queueing (the engine checks again, and bounds
        generated answers itself). A frame whose size is not in its spec (JPEG, PNG) is held to
        ``max_masks`` here."""
        answer = self.query_options.answer
        max_masks = info.get("max_masks")
        if answer is None or not isinstance(max_masks, int):
            return
        budget = max_masks
        shape, mpx = self.image_spec.get("shape"), info.get("max_mask_megapixels")
        if shape and isinstance(mpx, (int, float)):
            budget = mask_budget(max_masks, mpx, int(info.get("mask_views", 1)), shape[0], shape[1])
        n_seg = answer.count("[SEG]")
        if n_seg > budget:
            raise ProtocolError(Code.TOO_LARGE, f"options.answer has {n_seg} [SEG]; the model makes at most {budget} "
                                                f"masks per answer on this frame (max_masks {max_masks}, "
                                                f"max_mask_megapixels {mpx}); not run", self.id)

    def depth(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The depth frame as HxW float32 metres (NaN where unknown), or None without depth."""
        if self.depth_spec is None or self.depth_data is None:
            return None
        return decode_depth(self.depth_spec, self.depth_data, shape)

    def frame(self, image: np.ndarray) -> Frame:
        """The engine's :class:`~lisa_agent.frames.Frame` of this request: the decoded ``image`` with the
        options' ``frame_id``, ``stamp`` and ``intrinsics``, and the depth frame (metres) with its stamp
        and tolerance. Raises :class:`ProtocolError` (``invalid_image``) for depth that cannot be decoded."""
        depth = self.depth(image.shape[:2])
        dspec = self.depth_spec or {}
        try:
            return Frame(image, frame_id=self.options.get("frame_id"), stamp=self.options.get("stamp"),
                         depth=depth, intrinsics=self.options.get("intrinsics"), depth_stamp=dspec.get("stamp"),
                         depth_tolerance_s=dspec.get("tolerance_s", DEPTH_TOLERANCE_S))
        except LisaError as exc:
            raise ProtocolError(exc.code, str(exc), self.id) from None


# ----------------------------------------------------------------------------------------- requests


def _bad(message: str, rid: Any = None, code: str = Code.BAD_REQUEST) -> ProtocolError:
    return ProtocolError(code, message, rid)


def _shape(value: Any, ndim: int, what: str, rid: Any) -> tuple[int, ...]:
    if (not isinstance(value, list) or len(value) != ndim
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise _bad(f"{what}.shape must be a list of {ndim} positive integers; got {value!r}", rid,
                   Code.INVALID_IMAGE)
    return tuple(value)


def parse_header(data: bytes, limits: Limits) -> dict[str, Any]:
    """Decode frame 0 into a dict, checking size, JSON syntax, version and id type."""
    if len(data) > limits.max_header_bytes:
        raise _bad(f"header is {len(data)} bytes; the limit is {limits.max_header_bytes}", None, Code.TOO_LARGE)
    try:
        header = json_loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"header frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad(f"header must be a JSON object; got {type(header).__name__}")
    rid = header.get("id")
    if isinstance(rid, bool) or not (isinstance(rid, int) or (isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS)):
        raise _bad(f"header.id must be a non-empty string (at most {MAX_ID_CHARS} chars) or an integer; "
                   f"got {rid!r}")
    version = header.get("v")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise _bad(f"protocol version {version!r} is not supported; this server speaks "
                   f"{list(SUPPORTED_VERSIONS)}", rid, Code.UNSUPPORTED_VERSION)
    unknown = sorted(set(header) - HEADER_KEYS)
    if unknown:
        raise _bad(f"unknown header fields {unknown}; known: {sorted(HEADER_KEYS)}", rid)
    op = header.get("op")
    if op not in OPS:
        raise _bad(f"unknown op {op!r}; expected one of {list(OPS)}", rid, Code.UNKNOWN_OP)
    return header


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


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a JSON number that fits one (bools, strings,
    NaN, inf, and integers too large for a float such as 10**400 are all None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _unicode(text: str) -> bool:
    """True when ``text`` is valid Unicode (JSON's \\ud800 escapes give lone surrogates, which are not)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_stamp(value: Any, what: str, fail: Any) -> dict[str, int] | None:
    """``{"sec": int >= 0, "nanosec": int in [0, 1e9)}`` or null; anything else raises ``fail(message)``."""
    if value is None:
        return None
    if (not isinstance(value, dict) or set(value) != {"sec", "nanosec"}
            or not all(isinstance(value[k], int) and not isinstance(value[k], bool) for k in value)
            or not 0 <= value["sec"] < 2**63 // 10**9 or not 0 <= value["nanosec"] < 10**9):
        raise fail(f"{what} must be {{\"sec\": int >= 0, \"nanosec\": int in [0, 1e9)}} or null; got {value!r:.100}")
    return {"sec": value["sec"], "nanosec": value["nanosec"]}


def _check_options(options: Any, rid: Any, limits: Limits) -> tuple[dict[str, Any], QueryOptions, TrackOptions | None]:
    """``options``: (the frame's and stream's fields, the :class:`QueryOptions`, the :class:`TrackOptions` or None)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise _bad(f"options must be a JSON object; got {type(options).__name__}", rid)
    unknown = sorted(set(options) - OPTION_KEYS)
    if unknown:
        raise _bad(f"unknown options {unknown}; known: {sorted(OPTION_KEYS)}", rid, Code.INVALID_ARGUMENT)

    def fail(message: str) -> ProtocolError:
        return _bad(message, rid, Code.INVALID_ARGUMENT)

    answer = options.get("answer")
    if isinstance(answer, str) and len(answer) > limits.max_query_chars:
        raise fail(f"options.answer is {len(answer)} chars; the limit is {limits.max_query_chars}")
    try:
        query = QueryOptions.from_mapping({k: v for k, v in options.items() if k in QueryOptions.field_names()})
    except LisaError as exc:
        raise fail(f"options.{exc}") from None
    try:
        track = None if options.get("track") is None else TrackOptions.from_mapping(options["track"],
                                                                                        what="options.track")
    except LisaError as exc:
        message = str(exc)
        raise fail(message if message.startswith(("options.track", "unknown")) else f"options.track.{message}") \
            from None
    if query.max_new_tokens > limits.max_new_tokens:
        raise fail(f"options.max_new_tokens must be an integer in [1, {limits.max_new_tokens}] on this server; got "
                   f"{query.max_new_tokens}")
    if track is not None and (query.mode not in ("fast", "chat") or query.answer is not None):
        raise fail("options.track works with mode fast or chat and no forced answer")
    out: dict[str, Any] = {}
    latest = options.get("latest_only", False)
    if not isinstance(latest, bool):
        raise fail(f"options.latest_only must be true or false; got {latest!r:.50}")
    out["latest_only"] = latest
    fid = options.get("frame_id")
    if fid is not None:
        if isinstance(fid, bool) or not isinstance(fid, (str, int)) or len(str(fid)) > MAX_ID_CHARS \
                or not _unicode(str(fid)):
            raise fail(f"options.frame_id must be a string (at most {MAX_ID_CHARS} chars), an integer or null")
        out["frame_id"] = str(fid)
    out["stamp"] = _check_stamp(options.get("stamp"), "options.stamp", fail)
    stream = options.get("stream")
    if stream is not None:
        if not isinstance(stream, str) or not 0 < len(stream) <= MAX_ID_CHARS or not _unicode(stream):
            raise fail(f"options.stream must be a non-empty string of at most {MAX_ID_CHARS} chars")
        out["stream"] = stream
    intr = options.get("intrinsics")
    if intr is not None:
        numbers = [_number(v) for v in intr] if isinstance(intr, list) and len(intr) == 4 else []
        values = [v for v in numbers if v is not None]
        if len(values) != 4 or values[0] <= 0 or values[1] <= 0:
            raise fail(f"options.intrinsics must be [fx, fy, cx, cy] (finite pixels, fx, fy > 0); got {intr!r:.200}")
        out["intrinsics"] = values
    return out, query, track


def _check_image_spec(spec: Any, rid: Any, limits: Limits) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise _bad(f"header.image must be an object {{format, shape, dtype}}; got {spec!r}", rid, Code.INVALID_IMAGE)
    fmt = spec.get("format", "raw")
    if fmt not in IMAGE_FORMATS:
        raise _bad(f"image.format must be one of {list(IMAGE_FORMATS)}; got {fmt!r}", rid, Code.INVALID_IMAGE)
    out: dict[str, Any] = {"format": fmt}
    if fmt == "raw" or spec.get("shape") is not None:
        shape = _shape(spec.get("shape"), 3, "image", rid)
        if shape[2] != 3:
            raise _bad(f"image.shape must be [H, W, 3] (RGB); got {list(shape)}", rid, Code.INVALID_IMAGE)
        if max(shape[:2]) > limits.max_side:
            raise _bad(f"image is {shape[0]}x{shape[1]}; each side must be at most {limits.max_side} pixels",
                       rid, Code.TOO_LARGE)
        out["shape"] = list(shape)
    dtype = spec.get("dtype", "uint8")
    if dtype != "uint8":
        raise _bad(f"image.dtype must be 'uint8'; got {dtype!r} (scale float images to 0..255 first)", rid,
                   Code.INVALID_IMAGE)
    out["dtype"] = "uint8"
    return out


def parse_request(frames: list[bytes], limits: Limits | None = None) -> Request:
    """Validate a request's frames (delimiter already removed) without decoding the image.

    Checks everything cheap: frame count, sizes, header fields, options, query, and for raw images
    the byte count. Raises :class:`ProtocolError` with the typed code and the request id.
    """
    limits = limits or Limits()
    if not frames:
        raise _bad("empty message: expected a JSON header frame")
    header = parse_header(bytes(frames[0]), limits)
    rid, op = header["id"], header["op"]
    for k, f in enumerate(frames):
        if len(f) > limits.max_frame_bytes:
            raise _bad(f"frame {k} is {len(f)} bytes; the limit is {limits.max_frame_bytes}", rid, Code.TOO_LARGE)
    timeout_ms = header.get("timeout_ms")
    if timeout_ms is not None:
        timeout_ms = _number(timeout_ms)
        if timeout_ms is None or timeout_ms <= 0:
            raise _bad(f"timeout_ms must be a positive, finite number of milliseconds or null; got "
                       f"{header.get('timeout_ms')!r:.100}", rid, Code.INVALID_ARGUMENT)
    if op != "segment":
        if len(frames) != 1:
            raise _bad(f"op {op!r} takes only the header frame; got {len(frames)} frames", rid)
        return Request(id=rid, op=op, timeout_ms=timeout_ms)

    query = header.get("query")
    if not isinstance(query, str) or not query.strip():
        raise _bad("query must be a non-empty string: say what to segment, e.g. 'something to cut with'", rid,
                   Code.INVALID_QUERY)
    if len(query) > limits.max_query_chars:
        raise _bad(f"query is {len(query)} chars; the limit is {limits.max_query_chars}", rid, Code.INVALID_QUERY)
    if not _unicode(query):
        raise _bad("query is not valid Unicode text (it holds a lone surrogate)", rid, Code.INVALID_ARGUMENT)
    try:
        check_query(query)  # the engine's own rule (e.g. no "<image>"): refused before queueing
    except InvalidQueryError as exc:
        raise _bad(str(exc), rid, Code.INVALID_QUERY) from None
    spec = _check_image_spec(header.get("image"), rid, limits)
    options, query_options, track = _check_options(header.get("options"), rid, limits)
    dspec = header.get("depth")
    expected = 3 if dspec is not None else 2
    if len(frames) != expected:
        what = "header, image, depth" if dspec is not None else "header, image"
        raise _bad(f"segment expects {expected} frames ({what}); got {len(frames)}", rid)
    data = bytes(frames[1])
    if spec["format"] == "raw":
        h, w, c = spec["shape"]
        if len(data) != h * w * c:
            raise _bad(f"raw image of shape {[h, w, c]} uint8 needs {h * w * c} bytes; the frame has {len(data)}",
                       rid, Code.INVALID_IMAGE)
    depth_spec = depth_data = None
    if dspec is not None:
        if not isinstance(dspec, dict):
            raise _bad(f"header.depth must be an object {{shape, dtype[, scale]}}; got {dspec!r}", rid,
                       Code.INVALID_IMAGE)
        dshape = _shape(dspec.get("shape"), 2, "depth", rid)
        dtype = dspec.get("dtype")
        unknown = sorted(set(dspec) - DEPTH_KEYS)
        if unknown:
            raise _bad(f"unknown depth fields {unknown}; known: {sorted(DEPTH_KEYS)}", rid, Code.INVALID_IMAGE)
        if dtype not in DEPTH_DTYPES:
            raise _bad(f"depth.dtype must be one of {sorted(DEPTH_DTYPES)}; got {dtype!r}", rid, Code.INVALID_IMAGE)
        scale = _number(dspec.get("scale", DEFAULT_DEPTH_SCALE[dtype]))
        if scale is None or scale <= 0:
            raise _bad(f"depth.scale must be a positive, finite number (metres per unit); got "
                       f"{dspec.get('scale')!r:.100}", rid, Code.INVALID_ARGUMENT)
        if "shape" in spec and list(dshape) != spec["shape"][:2]:
            raise _bad(f"depth shape {list(dshape)} does not match the image's {spec['shape'][:2]}", rid,
                       Code.INVALID_IMAGE)
        depth_data = bytes(frames[2])
        need = dshape[0] * dshape[1] * DEPTH_DTYPES[dtype].itemsize
        if len(depth_data) != need:
            raise _bad(f"depth of shape {list(dshape)} {dtype} needs {need} bytes; the frame has {len(depth_data)}",
                       rid, Code.INVALID_IMAGE)
        tolerance = _number(dspec.get("tolerance_s", DEPTH_TOLERANCE_S))
        if tolerance is None or tolerance < 0:
            raise _bad(f"depth.tolerance_s must be a non-negative, finite number of seconds; got "
                       f"{dspec.get('tolerance_s')!r:.100}", rid, Code.INVALID_ARGUMENT)

        def stamp_fail(message: str) -> ProtocolError:
            return _bad(message, rid, Code.INVALID_ARGUMENT)

        depth_spec = {"shape": list(dshape), "dtype": dtype, "scale": float(scale), "tolerance_s": float(tolerance),
                      "stamp": _check_stamp(dspec.get("stamp"), "depth.stamp", stamp_fail)}
    return Request(id=rid, op=op, query=query, image_spec=spec, image_data=data, depth_spec=depth_spec,
                   depth_data=depth_data, options=options, timeout_ms=timeout_ms, query_options=query_options,
                   track=track)


# ------------------------------------------------------------------------------------------ headers


def build_header(request_id: Any, op: str, **fields: Any) -> bytes:
    """Client side: frame 0 of a request (``v`` filled in; ``None`` fields left out)."""
    header = {"v": PROTOCOL_VERSION, "id": request_id, "op": op}
    header.update({k: v for k, v in fields.items() if v is not None})
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


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
