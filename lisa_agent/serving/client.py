"""Clients of the model server: :class:`LisaClient` (blocking) and :class:`AsyncLisaClient` (asyncio).

The endpoint's scheme picks the transport:

- ``tcp://`` (``ipc://``, ...): ``lisa-agent serve`` over ZeroMQ. Both clients follow the ZeroMQ guide's
  "Lazy Pirate" pattern on a DEALER socket: send, poll for the reply up to ``timeout`` seconds, and
  when nothing comes close the socket (linger 0), open a fresh one and resend, ``retries`` times;
  then raise :class:`~lisa_agent.errors.ServerUnavailableError`. Every call waits at most
  ``timeout * (retries + 1)`` seconds. Replies are matched by request id, so a late reply to an
  earlier call can never be mistaken for the current one.
- ``http://`` / ``https://``: the Ray Serve deployment (``lisa-agent serve --engine ray``,
  ``http://HOST:8000/lisa``), the same messages as JSON bodies
  (:mod:`~lisa_agent.serving.http_transport`). One kept-alive connection per client; an attempt that
  gets no reply within ``timeout`` (connection refused or dropped, a timeout) or an answer from Ray
  Serve instead of the deployment (``500`` when the replica running the request died, ``408``) is
  retried on a fresh connection, ``retries`` times, then ``ServerUnavailableError``. Serve's
  backpressure (``503``: every replica and its queue full) is ``ServerBusyError``, like ``queue_full``.
  Each request carries the client's stream as ``x-session-id``, so Serve's session affinity keeps a
  client's frames on one replica. The asyncio client runs each exchange in a worker thread.

Server errors are raised as the same classes the engine raises in-process (``invalid_image`` ->
:class:`~lisa_agent.errors.InvalidImageError`, ...) or as
the service's own (``queue_full`` -> ``ServerBusyError``, ``deadline_exceeded`` -> ``DeadlineExceededError``,
``superseded`` -> ``SupersededError``; :mod:`lisa_agent.errors`), so local and remote models are handled alike.

A client object holds one socket: use one client per thread (or per asyncio task that awaits in
sequence). An HTTP client's exchanges are serialized by a lock, so sharing one is safe but not faster.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import logging
import os
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from ..errors import (
    Code,
    InvalidArgumentError,
    RemoteError,
    ServerBusyError,
    ServerUnavailableError,
    error_from_dict,
)
from ..frames import Frame, as_frame, check_query
from ..options import QueryOptions, TrackOptions
from ..result import SegmentationResult
from . import security
from .codecs import encode_depth, encode_image, logits_from_frames
from .http_transport import (
    CONTENT_TYPE,
    REQUEST_ID_HEADER,
    SESSION_HEADER,
    HttpExchange,
    decode_http_reply,
    encode_http_request,
    is_http_endpoint,
)
from .protocol import build_header, parse_reply

if TYPE_CHECKING:
    import zmq
    from typing_extensions import Unpack

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
#: HTTP statuses Ray Serve answers for a deployment that could not (a replica died mid-request, a
#: request timeout, a gateway in between failing): the request is sent again
RETRY_STATUSES = frozenset({408, 500, 502, 503, 504})

log = logging.getLogger("lisa_agent.serving.client")

_Keys = tuple[bytes, bytes] | str | os.PathLike[str] | None


class SegmentKeywords(TypedDict, total=False):
    """The keywords of :meth:`LisaClient.segment` and :meth:`AsyncLisaClient.segment` (all optional).

    Attributes:
        mode, max_new_tokens, answer, return_logits: single :class:`~lisa_agent.options.QueryOptions` fields.
        frame_id: the frame's name, carried into the result (the server keys its feature cache by the pixels,
            so several queries on one frame share its encoding either way).
        depth, depth_scale, intrinsics: the keyword form of a Frame's depth (uint16 mm or float32 m,
            ``depth_scale`` metres per unit) and ``[fx, fy, cx, cy]``; the result then carries ``targets``
            (median depth and 3D point per mask) or a ``depth_note`` saying why not.
        encoding: ``raw`` (no loss, most bytes), ``jpeg`` (``quality``) or ``png``.
        deadline_s: the server drops the request unrun (``DeadlineExceededError``) if it is still queued
            after this many seconds; default: the client's ``timeout``.
        latest_only: a newer ``latest_only`` frame from this client supersedes this one while it is still
            queued (``SupersededError``): for camera streams.
        track: follow the query's masks along this client's stream between reasoning steps on the server
            (:class:`~lisa_agent.options.TrackOptions` or its fields as a dict; docs/tracking.md); the result's
            ``track`` says whether the model reasoned on this frame or a tracker carried its masks.
    """

    mode: str | None
    max_new_tokens: int | None
    answer: str | None
    return_logits: bool | None
    frame_id: str | int | None
    depth: np.ndarray | None
    depth_scale: float | None
    intrinsics: Any
    encoding: str
    quality: int
    deadline_s: float | None
    latest_only: bool
    track: TrackOptions | dict[str, Any] | None


class _ClientCore:
    """Request building, reply decoding and socket setup shared by the two clients."""

    #: the ZeroMQ context the sockets come from, set by each client (a ``zmq.asyncio.Context``: async);
    #: None for an HTTP endpoint
    _ctx: zmq.Context[Any] | None

    def __init__(self, endpoint: str, timeout: float, retries: int, curve_server_key: Any,
                 curve_client_keys: _Keys) -> None:
        if not timeout > 0:
            raise InvalidArgumentError(f"timeout must be > 0 seconds; got {timeout!r}")
        if retries < 0:
            raise InvalidArgumentError(f"retries must be >= 0; got {retries!r}")
        if (curve_server_key is None) != (curve_client_keys is None):
            raise InvalidArgumentError("CurveZMQ needs both curve_server_key (the server's public key or .key "
                                       "file) and curve_client_keys (this client's .key_secret file or "
                                       "(public, secret) pair)")
        #: the HTTP connection of an ``http://`` / ``https://`` endpoint; None for ZeroMQ endpoints
        self._http = HttpExchange(endpoint) if is_http_endpoint(endpoint) else None
        if self._http is not None and curve_server_key is not None:
            raise InvalidArgumentError("CurveZMQ keys apply to ZeroMQ endpoints (tcp://...); an http:// endpoint has "
                                       "no CurveZMQ: reach it over https:// or a private network")
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._server_key = security.load_public_key(curve_server_key) if curve_server_key is not None else None
        self._client_keys = security.client_keypair(curve_client_keys) if curve_client_keys is not None else None
        #: stream name sent with every request: names this client's frames on the server (frame
        #: ids, latest_only) and survives socket resets.
        self.stream = uuid.uuid4().hex
        self._ids = itertools.count(1)
        self._sock: Any = None

    def _new_id(self) -> str:
        return f"{self.stream[:8]}-{next(self._ids)}"

    def _open(self) -> Any:
        """The DEALER socket, created on first use (and after a reset) from ``self._ctx``."""
        import zmq

        if self._sock is None:
            assert self._ctx is not None  # ZeroMQ endpoints only
            self._sock = self._ctx.socket(zmq.DEALER)
            self._configure(self._sock)
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._http is not None:
            self._http.reset()

    def _configure(self, sock: Any) -> None:
        import zmq

        sock.setsockopt(zmq.LINGER, 0)
        if self._server_key is not None and self._client_keys is not None:
            sock.curve_serverkey = self._server_key
            sock.curve_publickey, sock.curve_secretkey = self._client_keys
        sock.connect(self.endpoint)

    def _segment_message(self, image: Frame | np.ndarray, query: str, options: QueryOptions | None,
                         keywords: SegmentKeywords) -> tuple[str, list[bytes]]:
        kw = keywords
        unknown = sorted(set(kw) - set(SegmentKeywords.__annotations__))
        if unknown:
            raise InvalidArgumentError(f"unknown segment keywords {unknown}; known: "
                                       f"{sorted(SegmentKeywords.__annotations__)}")
        check_query(query)
        query_options = QueryOptions.of(options, mode=kw.get("mode"), max_new_tokens=kw.get("max_new_tokens"),
                                        answer=kw.get("answer"), return_logits=kw.get("return_logits"))
        frame = as_frame(image, kw.get("frame_id"))
        depth, depth_scale, intrinsics = kw.get("depth"), kw.get("depth_scale"), kw.get("intrinsics")
        if depth is not None or intrinsics is not None:  # the keyword form of a Frame's depth
            frame = replace(frame, depth=frame.depth if depth is None else depth,
                            depth_scale=frame.depth_scale if depth_scale is None else depth_scale,
                            intrinsics=frame.intrinsics if intrinsics is None else intrinsics)
        spec, data = encode_image(frame.rgb, kw.get("encoding", "raw"), kw.get("quality", 90))
        frames = [data]
        depth_spec = None
        if frame.depth is not None:
            depth_spec, ddata = encode_depth(frame.depth, frame.depth_scale, stamp=frame.depth_stamp,
                                             tolerance_s=frame.depth_tolerance_s)
            frames.append(ddata)
        wire: dict[str, Any] = {**query_options.changed(), "stream": self.stream}
        if frame.frame_id is not None:
            wire["frame_id"] = frame.frame_id
        if frame.stamp is not None:
            wire["stamp"] = frame.stamp.to_dict()
        if kw.get("latest_only"):
            wire["latest_only"] = True
        track = kw.get("track")
        if track is not None:
            wire["track"] = (track if isinstance(track, TrackOptions)
                             else TrackOptions.from_mapping(track, what="track")).to_dict()
        if frame.intrinsics is not None:
            k = frame.intrinsics
            wire["intrinsics"] = [k.fx, k.fy, k.cx, k.cy]
        deadline_s = kw.get("deadline_s")
        budget = self.timeout if deadline_s is None else float(deadline_s)
        rid = self._new_id()
        header = build_header(rid, "segment", query=query, image=spec, depth=depth_spec, options=wire,
                              timeout_ms=round(budget * 1000.0, 3))
        return rid, [header, *frames]

    @staticmethod
    def _result(reply: dict[str, Any], frames: list[bytes], t0: float) -> SegmentationResult:
        payload = reply.get("result") or {}
        result = SegmentationResult.from_dict(payload)
        result.timings_ms["client_roundtrip"] = round((time.perf_counter() - t0) * 1e3, 3)
        if "logits" in payload:
            result.logits = logits_from_frames(payload["logits"], frames)
        return result

    def _match(self, rid: str, frames: list[bytes]) -> tuple[dict[str, Any], list[bytes]] | None:
        """The reply if ``frames`` answer ``rid`` (else None: a stale reply, dropped); raises the
        server's error as a local exception."""
        if frames and frames[0] == b"":
            frames = frames[1:]
        reply = parse_reply(frames)
        if reply.get("id") != rid and not (reply.get("id") is None and not reply.get("ok")):
            return None  # a late reply to an earlier request; an id-less error can only be ours (one
            # request in flight per socket) and is raised below
        if not reply.get("ok"):
            raise error_from_dict(reply.get("error"))
        return reply, frames

    def _unavailable(self, op: str) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"no reply from the LISA server at {self.endpoint} to {op!r} after {self.retries + 1} attempt(s) of "
            f"{self.timeout:g} s: is `lisa-agent serve` running there (and, with CurveZMQ, is this client's key "
            "allow-listed)?")

    def _http_call(self, rid: str, op: str, frames: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        """One request to an HTTP endpoint, with this client's timeout and retries (blocking; see the
        module docstring): the reply and its frames, or the server's error raised as a local exception."""
        assert self._http is not None
        body = encode_http_request(frames)
        headers = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE, SESSION_HEADER: self.stream,
                   REQUEST_ID_HEADER: rid}
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                log.warning("LISA server %s: %s on %r id=%s; retrying (attempt %d of %d)", self.endpoint, last, op,
                            rid, attempt + 1, self.retries + 1)
            try:
                status, data = self._http.post(body, headers, self.timeout)
            except TimeoutError:
                last = f"no reply within {self.timeout:g} s"
                continue
            except (OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
                time.sleep(min(0.05 * 2 ** attempt, 0.5))  # refused at once: give a restarting server a moment
                continue
            decoded = decode_http_reply(data)
            if decoded is not None:
                reply, rframes = decoded
                if reply.get("id") != rid and not (reply.get("id") is None and not reply.get("ok")):
                    raise RemoteError(Code.INTERNAL, f"{self.endpoint} answered request {rid!r} with the reply to "
                                                     f"{reply.get('id')!r}")
                if not reply.get("ok"):
                    raise error_from_dict(reply.get("error"))
                return reply, rframes
            text = " ".join(data[:300].decode("utf-8", "replace").split()) or "(empty body)"
            if status == 503 and "backpressure" in text.lower():
                raise ServerBusyError(f"{self.endpoint} is busy (Ray Serve: {text}); nothing was run, "
                                                       "retry later")
            if status not in RETRY_STATUSES:
                raise ServerUnavailableError(
                    f"{self.endpoint} answered {op!r} with HTTP {status} ({text}), not a LISA reply: is the route right "
                    "(`lisa-agent serve --engine ray` serves http://HOST:PORT/lisa)?")
            last = f"HTTP {status} ({text})"
            self._http.reset()
            time.sleep(min(0.05 * 2 ** attempt, 0.5))
        raise ServerUnavailableError(
            f"no reply from the LISA server at {self.endpoint} to {op!r} after {self.retries + 1} attempt(s) of "
            f"{self.timeout:g} s (last: {last}): is `lisa-agent serve --engine ray` running there?")


class LisaClient(_ClientCore):
    """Blocking client of ``lisa-agent serve``.

    Args:
        endpoint: the server's endpoint: ``tcp://127.0.0.1:5557`` (``lisa-agent serve``, ZeroMQ) or
            ``http://HOST:8000/lisa`` (``lisa-agent serve --engine ray``, Ray Serve's HTTP ingress).
        timeout: seconds to wait for each reply before resetting the socket (connection) and retrying.
        retries: extra attempts after the first; then :class:`ServerUnavailableError`.
        curve_server_key: the server's public key (40-char Z85) or its ``.key`` file (CurveZMQ; ZeroMQ only).
        curve_client_keys: this client's ``.key_secret`` file or a (public, secret) pair.

    Example::

        with LisaClient("tcp://127.0.0.1:5557") as client:
            result = client.segment(frame, "something to cut with")   # a SegmentationResult
        with LisaClient("http://gpu-cluster:8000/lisa") as client:     # the same, from a Ray Serve cluster
            result = client.segment(frame, "something to cut with")
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 10.0, retries: int = 2,
                 curve_server_key: str | bytes | os.PathLike[str] | None = None,
                 curve_client_keys: _Keys = None) -> None:
        super().__init__(endpoint, timeout, retries, curve_server_key, curve_client_keys)
        self._ctx = None
        if self._http is None:
            import zmq

            self._ctx = zmq.Context.instance()

    def _request(self, rid: str, op: str, frames: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        if self._http is not None:
            return self._http_call(rid, op, frames)
        import zmq

        for _attempt in range(self.retries + 1):
            sock = self._open()
            try:
                sock.send_multipart([b"", *frames], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass  # nothing to send to: wait out the timeout like a lost reply
            end = time.monotonic() + self.timeout
            while (remaining := end - time.monotonic()) > 0:
                if not sock.poll(remaining * 1000.0, zmq.POLLIN):
                    break
                matched = self._match(rid, sock.recv_multipart())
                if matched is not None:
                    return matched
            self._reset()  # Lazy Pirate: the socket may be stuck; a fresh one reconnects cleanly
        raise self._unavailable(op)

    def segment(self, image: Frame | np.ndarray, query: str, options: QueryOptions | None = None,
                **keywords: Unpack[SegmentKeywords]) -> SegmentationResult:
        """Segment ``image`` (a :class:`~lisa_agent.frames.Frame` or HxWx3 uint8 RGB) for ``query`` on the server,
        answered as ``options`` say (:class:`~lisa_agent.options.QueryOptions`; the server's defaults are the
        library's). ``keywords`` (:class:`SegmentKeywords`) change single query options, carry the frame's name and
        depth, and say how to send it.

        Returns the same :class:`SegmentationResult` type as the engine (masks decoded from RLE;
        ``timings_ms`` adds ``server_queue``, ``server_decode`` and ``client_roundtrip``).
        """
        t0 = time.perf_counter()
        rid, frames = self._segment_message(image, query, options, keywords)
        reply, rframes = self._request(rid, "segment", frames)
        return self._result(reply, rframes, t0)

    def info(self) -> dict[str, Any]:
        """The server's model info: model, dtype, device, ..., ``protocol_version``, limits."""
        rid = self._new_id()
        return self._request(rid, "info", [build_header(rid, "info")])[0]["result"]

    def health(self) -> dict[str, Any]:
        """Liveness: ``{"status": "ok", "queue_depth", "max_queue", "busy", "uptime_s", "replies"}``."""
        rid = self._new_id()
        return self._request(rid, "health", [build_header(rid, "health")])[0]["result"]

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._reset()

    def __enter__(self) -> LisaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class AsyncLisaClient(_ClientCore):
    """The asyncio twin of :class:`LisaClient` (same arguments; methods are coroutines).

    Example::

        async with AsyncLisaClient("tcp://127.0.0.1:5557") as client:
            result = await client.segment(frame, "the red mug")
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 10.0, retries: int = 2,
                 curve_server_key: str | bytes | os.PathLike[str] | None = None,
                 curve_client_keys: _Keys = None) -> None:
        super().__init__(endpoint, timeout, retries, curve_server_key, curve_client_keys)
        self._ctx = None
        if self._http is None:
            import zmq.asyncio

            self._ctx = zmq.asyncio.Context()

    async def _request(self, rid: str, op: str, frames: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        if self._http is not None:  # http.client in a worker thread; its lock keeps exchanges one at a time
            return await asyncio.to_thread(self._http_call, rid, op, frames)
        import zmq

        for _attempt in range(self.retries + 1):
            sock = self._open()
            try:
                await sock.send_multipart([b"", *frames], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
            end = time.monotonic() + self.timeout
            while (remaining := end - time.monotonic()) > 0:
                if not await sock.poll(remaining * 1000.0, zmq.POLLIN):
                    break
                matched = self._match(rid, await sock.recv_multipart())
                if matched is not None:
                    return matched
            self._reset()
        raise self._unavailable(op)

    async def segment(self, image: Frame | np.ndarray, query: str, options: QueryOptions | None = None,
                      **keywords: Unpack[SegmentKeywords]) -> SegmentationResult:
        """See :meth:`LisaClient.segment`."""
        t0 = time.perf_counter()
        rid, frames = self._segment_message(image, query, options, keywords)
        reply, rframes = await self._request(rid, "segment", frames)
        return self._result(reply, rframes, t0)

    async def info(self) -> dict[str, Any]:
        """See :meth:`LisaClient.info`."""
        rid = self._new_id()
        return (await self._request(rid, "info", [build_header(rid, "info")]))[0]["result"]

    async def health(self) -> dict[str, Any]:
        """See :meth:`LisaClient.health`."""
        rid = self._new_id()
        return (await self._request(rid, "health", [build_header(rid, "health")]))[0]["result"]

    def close(self) -> None:
        """Close the socket and the client's context (idempotent)."""
        self._reset()
        if self._ctx is not None and not self._ctx.closed:
            self._ctx.term()

    async def __aenter__(self) -> AsyncLisaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
