"""Clients of the model server: :class:`LisaClient` (blocking) and :class:`AsyncLisaClient` (asyncio).

The endpoint's scheme picks the transport:

- ``tcp://`` (``ipc://``, ...): ``lisa-agent serve`` over ZeroMQ (:mod:`~lisa_agent.serving.zmq_transport`).
  Both clients follow the ZeroMQ guide's "Lazy Pirate" pattern on a DEALER socket: send, poll for the reply
  up to ``timeout`` seconds, and when nothing comes close the socket (linger 0), open a fresh one and
  resend, ``retries`` times; then raise :class:`~lisa_agent.errors.ServerUnavailableError`. Every call waits
  at most ``timeout * (retries + 1)`` seconds. Replies are matched by request id, so a late reply to an
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

Here: the clients' API (building requests, reading results); the transports do the sending.

Server errors are raised as the same classes the engine raises in-process (``invalid_image`` ->
:class:`~lisa_agent.errors.InvalidImageError`, ...) or as
the service's own (``queue_full`` -> ``ServerBusyError``, ``deadline_exceeded`` -> ``DeadlineExceededError``,
``superseded`` -> ``SupersededError``; :mod:`lisa_agent.errors`), so local and remote models are handled alike.

A client object holds one socket: use one client per thread (or per asyncio task that awaits in
sequence). An HTTP client's exchanges are serialized by a lock, so sharing one is safe but not faster.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from ..errors import InvalidArgumentError
from ..frames import Frame, as_frame, check_query
from ..options import QueryOptions, TrackOptions
from ..result import SegmentationResult
from . import security
from .codecs import encode_depth, encode_image, logits_from_frames
from .framing import build_header
from .http_transport import HttpExchange, is_http_endpoint, request_over_http
from .zmq_transport import AsyncDealerSocket, DealerSocket, Reply

if TYPE_CHECKING:
    from typing_extensions import Unpack

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"

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
    """What the two clients share: their settings, request building and result decoding, and the transport the
    endpoint's scheme picks (``_dealer_class``: the client's ZeroMQ socket kind)."""

    _dealer_class: type[DealerSocket] | type[AsyncDealerSocket]

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 10.0, retries: int = 2,
                 curve_server_key: str | bytes | os.PathLike[str] | None = None,
                 curve_client_keys: _Keys = None) -> None:
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
        server_key = security.load_public_key(curve_server_key) if curve_server_key is not None else None
        client_keys = security.client_keypair(curve_client_keys) if curve_client_keys is not None else None
        #: stream name sent with every request: names this client's frames on the server (frame
        #: ids, latest_only) and survives socket resets.
        self.stream = uuid.uuid4().hex
        self._ids = itertools.count(1)
        #: the DEALER socket of a ZeroMQ endpoint; None for HTTP endpoints
        self._dealer = None if self._http is not None else self._dealer_class(endpoint, server_key, client_keys)

    def _new_id(self) -> str:
        return f"{self.stream[:8]}-{next(self._ids)}"

    def _reset(self) -> None:
        if self._dealer is not None:
            self._dealer.reset()
        if self._http is not None:
            self._http.reset()

    def _http_call(self, rid: str, op: str, frames: list[bytes]) -> Reply:
        assert self._http is not None
        return request_over_http(self._http, rid, op, frames, timeout=self.timeout, retries=self.retries,
                                 session=self.stream)

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

    _dealer_class = DealerSocket
    _dealer: DealerSocket | None

    def _request(self, rid: str, op: str, frames: list[bytes]) -> Reply:
        if self._dealer is None:
            return self._http_call(rid, op, frames)
        return self._dealer.request(rid, op, frames, self.timeout, self.retries)

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

    _dealer_class = AsyncDealerSocket
    _dealer: AsyncDealerSocket | None

    async def _request(self, rid: str, op: str, frames: list[bytes]) -> Reply:
        if self._dealer is None:  # http.client in a worker thread; its lock keeps exchanges one at a time
            return await asyncio.to_thread(self._http_call, rid, op, frames)
        return await self._dealer.request(rid, op, frames, self.timeout, self.retries)

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
        if self._dealer is not None:
            self._dealer.close()

    async def __aenter__(self) -> AsyncLisaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
