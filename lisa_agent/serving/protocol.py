"""The LISA wire protocol, version 2: what a request may say, checked before anything runs.

:func:`parse_request` turns a request's frames (:mod:`~lisa_agent.serving.framing` describes the message and
reads the header) into a :class:`Request`: the query, the image and depth specs (their bytes still encoded;
:mod:`~lisa_agent.serving.codecs` decodes them), the frame's and the stream's options, the
:class:`~lisa_agent.options.QueryOptions` and the :class:`~lisa_agent.options.TrackOptions`. Every mistake is a
:class:`~lisa_agent.errors.ProtocolError` with its code and the request's id, raised before the request is
queued. The ZeroMQ server and the Ray Serve replica both validate with it, so every door answers alike.

Version 2 (lisa-agent 0.2): results are the library's result schema (docs/result.md: per-mask
``target`` instead of version 1's ``depth_m`` / ``point``), and requests may carry ``options.stamp``,
``depth.stamp`` and ``depth.tolerance_s``. Version 1 clients are answered ``unsupported_version``.

The envelope's names (:data:`PROTOCOL_VERSION`, :class:`Limits`, :func:`build_header`, :func:`encode_reply`,
:func:`parse_reply`) are importable from here too. Pure Python + numpy: it is what ``docs/protocol.md`` describes.
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
from ..errors import Code, InvalidQueryError, LisaError, ProtocolError
from ..frames import DEPTH_TOLERANCE_S, Frame, check_query
from ..options import QueryOptions, TrackOptions
from .codecs import DEFAULT_DEPTH_SCALE, DEPTH_DTYPES, IMAGE_FORMATS, decode_depth, decode_image
from .framing import (
    MAX_ID_CHARS,
    PROTOCOL_VERSION,
    Limits,
    build_header,
    encode_reply,
    parse_header,
    parse_reply,
)

__all__ = ["PROTOCOL_VERSION", "Limits", "Request", "build_header", "encode_reply", "parse_reply", "parse_request"]

#: ``options`` keys: the query options (:class:`~lisa_agent.options.QueryOptions`), the frame's (``frame_id``,
#: ``stamp``, ``intrinsics``), the stream's (``stream``, ``latest_only``) and ``track``
#: (:class:`~lisa_agent.options.TrackOptions` or null).
OPTION_KEYS = frozenset(QueryOptions.field_names()) | {"frame_id", "stamp", "latest_only", "stream", "intrinsics",
                                                       "track"}
DEPTH_KEYS = frozenset({"shape", "dtype", "scale", "stamp", "tolerance_s"})


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


def _check_stamp(value: Any, what: str, rid: Any) -> dict[str, int] | None:
    """``{"sec": int >= 0, "nanosec": int in [0, 1e9)}`` or null; anything else is ``invalid_argument``."""
    if value is None:
        return None
    if (not isinstance(value, dict) or set(value) != {"sec", "nanosec"}
            or not all(isinstance(value[k], int) and not isinstance(value[k], bool) for k in value)
            or not 0 <= value["sec"] < 2**63 // 10**9 or not 0 <= value["nanosec"] < 10**9):
        raise _bad(f"{what} must be {{\"sec\": int >= 0, \"nanosec\": int in [0, 1e9)}} or null; got {value!r:.100}",
                   rid, Code.INVALID_ARGUMENT)
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
    out["stamp"] = _check_stamp(options.get("stamp"), "options.stamp", rid)
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
        depth_spec = {"shape": list(dshape), "dtype": dtype, "scale": float(scale), "tolerance_s": float(tolerance),
                      "stamp": _check_stamp(dspec.get("stamp"), "depth.stamp", rid)}
    return Request(id=rid, op=op, query=query, image_spec=spec, image_data=data, depth_spec=depth_spec,
                   depth_data=depth_data, options=options, timeout_ms=timeout_ms, query_options=query_options,
                   track=track)
