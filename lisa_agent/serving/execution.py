"""What both servers (the ZeroMQ one in :mod:`~lisa_agent.serving.server` and the Ray Serve replica in
:mod:`~lisa_agent.serving.ray_replica`) do with a ``segment`` request: admit it as a :class:`Job`, answer it
``superseded`` or ``deadline_exceeded`` when it must not run, and run it on the model once it has left their
queue. Also the ``info`` reply both give (:func:`describe_server`).

:func:`admit` refuses a forced answer the engine cannot make masks for, names the stream of a request that
names none, and sets the deadline. :func:`run_on_one_frame` decodes the frame once for requests on the same
pixels, turns each into a :class:`~lisa_agent.frames.Frame`, answers them with one ``segment_batch`` call where
the backend has it (falling back to one call each if the batch fails), with a tracking session for
``options.track``, or with ``segment``; and builds each reply's payload: the result schema plus
``server_queue`` / ``server_decode`` timings and, with ``return_logits``, the logits frames. Nothing there
raises: every request gets an :class:`Outcome`.

Tracking sessions (:class:`TrackSessions`) belong to a caller: each is keyed by the request's ``owner`` (who
sent it, as the door established: a CurveZMQ key, a ZeroMQ connection, a Ray session id) and its stream
name, so no caller can read or disturb another's session by naming the same stream.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..backend import SegmentBackend
from ..errors import Code, LisaError, ProtocolError, RemoteError, describe_error
from ..frames import Frame
from ..options import QueryOptions, TrackOptions
from ..result import SegmentationResult
from .codecs import logits_frames
from .framing import OPS, PROTOCOL_VERSION, SUPPORTED_VERSIONS, Limits
from .protocol import Request

log = logging.getLogger("lisa_agent.serving")


#: Tracked sessions a server keeps at most, how long an idle one is kept (seconds), and the bytes all of them
#: may hold together (frames, masks, tracker state): beyond, the least recently used sessions are dropped.
MAX_TRACK_SESSIONS = 64
TRACK_IDLE_S = 120.0
TRACK_BUDGET_BYTES = 512 * 1024 * 1024


def default_stream(secret: bytes, owner: str) -> str:
    """The stream name of an owner's requests that name none: a keyed digest of the owner (the same for every
    request of that owner, unguessable without the server's ``secret``; the doors never show it to others)."""
    return "default:" + hashlib.blake2b(owner.encode(), key=secret[:64], digest_size=12).hexdigest()


@dataclass
class Job:
    """A validated ``segment`` request waiting for the model: ``envelope`` the ZeroMQ routing frames
    (empty on Ray Serve), ``key`` the digest of its frame's pixels, ``owner`` the caller who sent it (its
    ``latest_only`` supersession and tracking sessions are its own)."""

    envelope: list[bytes]
    request: Request
    key: str
    received: float  # time.monotonic()
    deadline: float | None  # time.monotonic() or None
    owner: str = ""

    def batchable(self) -> bool:
        q = self.request.query_options
        return (q.mode == "fast" and q.answer is None and not q.return_logits and self.request.depth_spec is None
                and self.request.track is None)

    def same_frame(self, other: Job) -> bool:
        """Both requests are on the same pixels with the same frame id and stamp (one Frame serves both)."""
        a, b = self.request, other.request
        return (self.key == other.key and a.image_spec == b.image_spec
                and a.options.get("frame_id") == b.options.get("frame_id")
                and a.options.get("stamp") == b.options.get("stamp"))


def admit(request: Request, *, owner: str, received: float, secret: bytes, info: Mapping[str, Any],
          envelope: list[bytes] | None = None) -> Job:
    """A validated ``segment`` request of ``owner``, received at ``received`` (``time.monotonic()``), as a
    :class:`Job`. Refused (``too_large``) when its forced answer asks for more masks than the engine described
    by ``info`` makes; a request naming no ``options.stream`` gets its owner's default one
    (:func:`default_stream` with the server's ``secret``); ``timeout_ms`` becomes the job's deadline."""
    request.check_mask_budget(info)
    if request.options.get("stream") is None:
        request.options["stream"] = default_stream(secret, owner)
    deadline = received + request.timeout_ms / 1000.0 if request.timeout_ms is not None else None
    return Job(envelope if envelope is not None else [], request, request.frame_key(), received, deadline, owner=owner)


def superseded() -> ProtocolError:
    """The answer to a queued request a newer ``latest_only`` frame of its stream replaced."""
    return ProtocolError(Code.SUPERSEDED, "superseded by a newer frame of its stream (latest_only); not run")


def expired(job: Job, now: float, where: str) -> ProtocolError | None:
    """``deadline_exceeded`` for ``job`` when it is still waiting (in ``where``: the queue, the replica) at
    ``now`` past its deadline; None while it may run."""
    if job.deadline is None or now <= job.deadline:
        return None
    return ProtocolError(Code.DEADLINE_EXCEEDED, f"waited {(now - job.received) * 1e3:.0f} ms in {where}, past its "
                                                 f"timeout of {job.request.timeout_ms:g} ms; not run")


def batch_call(backend: SegmentBackend, enabled: bool) -> Callable[..., list[SegmentationResult]] | None:
    """The backend's ``segment_batch`` (optional: not part of :class:`~lisa_agent.backend.SegmentBackend`)
    when ``enabled`` and the backend has one, else None."""
    segment_batch = getattr(backend, "segment_batch", None)
    return segment_batch if enabled and callable(segment_batch) else None


def describe_server(backend: SegmentBackend, limits: Limits, **door: Any) -> dict[str, Any]:
    """The ``info`` reply: ``backend.info()`` (where it has one) with the protocol's versions and operations,
    ``limits`` and the door's own fields (``max_queue``, ``curve``, ``batch``, ...), as JSON carries it."""
    backend_info = backend.info() if callable(getattr(backend, "info", None)) else {}
    return json.loads(json.dumps({
        **dict(backend_info),
        "protocol_version": PROTOCOL_VERSION,
        "server_version": __version__,
        "supported_versions": list(SUPPORTED_VERSIONS),
        "ops": list(OPS),
        "limits": limits.to_dict(),
        **door,
    }, default=str))


class TrackSessions:
    """The worker's tracked streams (``options.track``): a :class:`~lisa_agent.tracking.StreamSegmenter`
    per (owner, stream), re-made when the stream's tracker settings change, a new query re-seeding it.

    Bounded three ways: at most ``max_sessions``; the sessions together hold at most ``max_bytes`` (an
    estimate of their frames, masks and tracker state; the least recently used go first, the one just used
    is kept); and one idle for ``idle_s`` seconds is dropped by :meth:`sweep`, which the servers call
    periodically (and every request calls too). Not thread-safe: one thread (the model's) uses it; the
    counts (``len``, :attr:`nbytes`) may be read from any thread."""

    def __init__(self, backend: SegmentBackend, max_sessions: int = MAX_TRACK_SESSIONS, idle_s: float = TRACK_IDLE_S,
                 max_bytes: int = TRACK_BUDGET_BYTES) -> None:
        self.backend = backend
        self.max_sessions = max_sessions
        self.idle_s = idle_s
        self.max_bytes = max_bytes
        #: (owner, stream) -> (session, its options, last used (monotonic), bytes it holds)
        self._items: collections.OrderedDict[tuple[str, str], tuple[Any, tuple[Any, ...], float, int]] = (
            collections.OrderedDict())
        self.nbytes = 0

    def process(self, owner: str, stream: str, query: str, frame: Frame, track: TrackOptions,
                options: QueryOptions) -> SegmentationResult:
        from ..tracking import StreamSegmenter

        now = time.monotonic()
        self.sweep(now)
        settings = (track, options)
        key = (owner, stream)
        entry = self._drop(key)
        session = entry[0] if entry is not None and entry[1] == settings else None
        if session is None:
            session = StreamSegmenter(self.backend, track, query=options)
        if session.instruction != query.strip():
            session.set_instruction(query)
        result = session.process(frame)
        assert result is not None  # synchronous sessions answer every frame
        size = int(session.nbytes())
        self._items[key] = (session, settings, now, size)
        self.nbytes += size
        while len(self._items) > 1 and (len(self._items) > self.max_sessions or self.nbytes > self.max_bytes):
            self._drop(next(iter(self._items)))  # the least recently used
        return result

    def sweep(self, now: float | None = None) -> int:
        """Drop the sessions idle for more than ``idle_s`` seconds; returns how many went."""
        now = time.monotonic() if now is None else now
        idle = [k for k, (_, _, seen, _) in self._items.items() if now - seen > self.idle_s]
        for key in idle:
            self._drop(key)
        return len(idle)

    def _drop(self, key: tuple[str, str]) -> tuple[Any, tuple[Any, ...], float, int] | None:
        entry = self._items.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[3]
        return entry

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Outcome:
    """What became of one :class:`Job`: ``payload`` (the reply's result) and ``extra`` (logits frames), or
    ``error``. ``ran``: the model was asked (the frame decoded); ``model_failed``: it raised something
    unexpected (``error`` is then ``internal``); ``started``: ``time.perf_counter()`` when the model began
    on this request (None when it never did)."""

    job: Job
    payload: dict[str, Any] | None = None
    extra: list[bytes] = field(default_factory=list)
    error: LisaError | None = None
    ran: bool = False
    model_failed: bool = False
    started: float | None = None


@dataclass
class FrameRun:
    """:func:`run_on_one_frame`'s answer: an :class:`Outcome` per job in the jobs' order, and how many of
    them one ``segment_batch`` call answered (0: none)."""

    outcomes: list[Outcome]
    batched: int = 0


def run_on_one_frame(jobs: list[Job], *, backend: SegmentBackend,
                     segment_batch: Callable[..., Any] | None, sessions: TrackSessions, limits: Limits,
                     now: float) -> FrameRun:
    """Answer ``jobs``, requests on one frame (several only when they are :meth:`Job.batchable` and
    :meth:`Job.same_frame`), with ``backend``; ``now`` (``time.monotonic()``) is when they left the queue."""
    t0 = time.perf_counter()
    outcomes = {id(job): Outcome(job) for job in jobs}
    try:
        image = jobs[0].request.image(limits)
    except LisaError as exc:
        for outcome in outcomes.values():
            outcome.error = exc
        return FrameRun(list(outcomes.values()))
    frames: dict[int, Frame] = {}
    for job in jobs:
        try:
            frames[id(job)] = job.request.frame(image)
        except LisaError as exc:
            outcomes[id(job)].error = exc
    live = [job for job in jobs if id(job) in frames]
    decode_ms = (time.perf_counter() - t0) * 1e3
    results: list[SegmentationResult] | None = None
    if len(live) > 1 and segment_batch is not None:
        try:
            results = list(segment_batch(frames[id(live[0])], [j.request.query for j in live], return_logits=False))
            if len(results) != len(live):
                raise RuntimeError(f"segment_batch returned {len(results)} results for {len(live)} queries")
        except Exception as exc:  # noqa: BLE001 - fall back to one call per query
            log.warning("segment_batch failed on %d queries (%s: %s); running them one by one", len(live),
                        type(exc).__name__, exc)
            results = None
    for k, job in enumerate(live):
        outcome = outcomes[id(job)]
        outcome.ran, outcome.started = True, time.perf_counter()
        request, query = job.request, job.request.query_options
        try:
            if results is not None:
                result = results[k]
            elif request.track is not None:
                result = sessions.process(job.owner, request.stream or "", request.query, frames[id(job)],
                                          request.track, query)
            else:
                result = backend.segment(frames[id(job)], request.query, options=query)
            payload = result.to_dict()
            payload["timings_ms"]["server_queue"] = round((now - job.received) * 1e3, 3)
            payload["timings_ms"]["server_decode"] = round(decode_ms, 3)
            desc, extra = logits_frames(result) if query.return_logits else (None, [])
            if desc is not None:
                payload["logits"] = desc
            outcome.payload, outcome.extra = payload, extra
        except Exception as exc:  # noqa: BLE001 - the model failing must not kill the server
            info = describe_error(exc)
            if isinstance(exc, LisaError):
                outcome.error = exc
            else:
                log.exception("backend failed on request %s", request.id)
                outcome.error = RemoteError(Code.INTERNAL, info.message)
            # only the model's or the device's faults count toward a server's health, never a caller's mistake
            outcome.model_failed = not (info.caller_fault or info.retry)
    return FrameRun([outcomes[id(job)] for job in jobs], len(live) if results is not None else 0)
