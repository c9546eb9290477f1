"""The model server: a ROUTER socket loop, a bounded queue and one model worker thread.

The socket thread only parses, validates and routes: it answers ``info`` / ``health`` itself,
answers malformed requests with typed errors, refuses work when the queue is full and supersedes
stale ``latest_only`` frames. The worker thread owns the model: it decodes the image, skips
requests past their deadline, runs the backend (batching queued ``fast`` queries on one frame when
the backend has ``segment_batch``) and hands the reply back to the socket thread over an inproc
PUSH/PULL pair (ZeroMQ sockets are not shared between threads). Every request gets exactly one
reply. Running requests on the model is :func:`lisa_agent.serving.execution.run_on_one_frame`, shared with
the Ray Serve replica.

``backend`` is a :class:`~lisa_agent.frames.SegmentBackend` (``segment(frame, query, **options) ->
SegmentationResult`` and ``info() -> dict``; ``segment_batch(frame, queries, return_logits=...)``
optional): in production a :class:`~lisa_agent.LisaSegmenter`. The worker turns each request into a
:class:`~lisa_agent.frames.Frame` (pixels, ``frame_id``, ``stamp``, depth, intrinsics) and replies with
the result schema (:meth:`SegmentationResult.to_dict`), adding ``server_queue`` and ``server_decode``
to its ``timings_ms`` and, with ``return_logits``, a ``logits`` descriptor.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..backend import SegmentBackend
from ..errors import Code, InvalidArgumentError, LisaError, ProtocolError, RemoteError
from ..result import SegmentationResult
from . import security
from .execution import TRACK_BUDGET_BYTES, TRACK_IDLE_S, Job, TrackSessions, default_stream, run_on_one_frame
from .protocol import (
    OPS,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Limits,
    Request,
    encode_reply,
    parse_request,
)

log = logging.getLogger("lisa_agent.serving")

DEFAULT_BIND = "tcp://127.0.0.1:5557"


class RequestQueue:
    """A bounded FIFO of jobs with "latest frame only" supersession and same-frame batching."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise InvalidArgumentError(f"max_queue must be at least 1; got {maxsize}")
        self.maxsize = maxsize
        self._items: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, job: Job) -> bool:
        """Append ``job``; False (nothing queued) when the queue is full."""
        with self._cond:
            if len(self._items) >= self.maxsize:
                return False
            self._items.append(job)
            self._cond.notify()
            return True

    def supersede(self, owner: str, stream: str, key: str) -> list[Job]:
        """Remove and return queued jobs of ``owner``'s ``stream`` for another frame than ``key``."""
        with self._cond:
            old = [j for j in self._items if j.owner == owner and j.request.stream == stream and j.key != key]
            for j in old:
                self._items.remove(j)
            return old

    def get(self, timeout: float, batch: bool) -> list[Job]:
        """Wait up to ``timeout`` s for a job; with ``batch``, also take the queued jobs that can run
        in one ``segment_batch`` call with it (same frame, fast mode). [] on timeout."""
        with self._cond:
            if not self._items and not self._cond.wait(timeout):
                return []
            if not self._items:
                return []
            first = self._items.popleft()
            jobs = [first]
            if batch and first.batchable():
                same = [j for j in self._items if j.batchable() and j.same_frame(first)]
                for j in same:
                    self._items.remove(j)
                jobs += same
            return jobs

    def drain(self) -> list[Job]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items


class LisaServer:
    """Serve ``backend`` on a ZeroMQ ROUTER socket.

    Args:
        backend: the model (see the module docstring).
        bind: endpoint, ``tcp://127.0.0.1:5557`` by default; ``tcp://127.0.0.1:*`` picks a free
            port (read it back from :attr:`endpoint`). A non-loopback address needs CurveZMQ or
            ``insecure=True``.
        max_queue: requests waiting for the model at most; more are answered ``queue_full``.
        limits: frame / image size limits (:class:`~lisa_agent.serving.protocol.Limits`).
        curve_secret: the server's ``.key_secret`` certificate file: turns CurveZMQ on.
        curve_allow: directory of allow-listed client ``.key`` files (required with ``curve_secret``).
        insecure: allow a non-loopback bind without CurveZMQ.
        latest_only: treat every request as ``latest_only`` (camera-stream servers).
        batch: run queued ``fast`` queries on one frame in one ``segment_batch`` call when the
            backend has it.
        max_pending_reply_bytes: replies held for one peer that does not read them, at most (bytes,
            beyond what ZeroMQ and the kernel buffer); the peer's oldest replies are dropped beyond it,
            counted as ``replies_dropped`` in ``health`` and logged.
        track_idle_s / max_track_bytes: tracked sessions (``options.track``) idle this long are dropped (the
            worker sweeps every second), and all of them together hold at most this many bytes (the least
            recently used are dropped beyond); see :class:`~lisa_agent.serving.execution.TrackSessions`.

    Callers: a request's caller is its CurveZMQ key when CurveZMQ is on, else its ZeroMQ connection (the
    routing identity). ``latest_only`` supersession and tracking sessions are the caller's own: another caller
    naming the same ``stream`` reaches neither. A request without ``options.stream`` gets a name derived
    from its caller with a secret of this server's (unguessable, and never shown to anyone).

    Use ``with LisaServer(...) as server:`` or :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        backend: SegmentBackend,
        bind: str = DEFAULT_BIND,
        *,
        max_queue: int = 16,
        limits: Limits | None = None,
        curve_secret: str | os.PathLike[str] | None = None,
        curve_allow: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        latest_only: bool = False,
        batch: bool = True,
        max_pending_reply_bytes: int = 64 * 1024 * 1024,
        track_idle_s: float = TRACK_IDLE_S,
        max_track_bytes: int = TRACK_BUDGET_BYTES,
    ) -> None:
        if (curve_secret is None) != (curve_allow is None):
            raise InvalidArgumentError("CurveZMQ needs both curve_secret (server .key_secret) and curve_allow "
                                       "(directory of client .key files)")
        security.check_bind(bind, curve=curve_secret is not None, insecure=insecure)
        self.backend = backend
        self.bind = bind
        self.limits = limits or Limits()
        self.queue = RequestQueue(max_queue)
        self.latest_only = latest_only
        # segment_batch is optional (not part of SegmentBackend): fetched once, None when not used
        segment_batch = getattr(backend, "segment_batch", None)
        self._segment_batch: Callable[..., list[SegmentationResult]] | None = (
            segment_batch if batch and callable(segment_batch) else None)
        self.batch = self._segment_batch is not None
        self._curve_keys = security.load_keypair(curve_secret) if curve_secret is not None else None
        self._curve_allow = security.check_allow_dir(curve_allow) if curve_allow is not None else None
        self._stop = threading.Event()
        self._stats_lock = threading.Lock()
        self._stats: collections.Counter[str] = collections.Counter()
        self._busy = False
        self._started = 0.0
        self._ctx: Any = None
        self._auth: Any = None
        self._router: Any = None
        self._pull: Any = None
        self._inproc = f"inproc://lisa-server-{id(self):x}"
        self._io_thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._info: dict[str, Any] = {}
        self.endpoint: str = ""
        if max_pending_reply_bytes < 1:
            raise InvalidArgumentError(f"max_pending_reply_bytes must be positive; got {max_pending_reply_bytes}")
        #: replies a peer has not taken yet (it does not read, or reads slowly), by peer identity:
        #: at most this many bytes each; beyond, the peer's oldest replies are dropped (and counted)
        self.max_pending_reply_bytes = int(max_pending_reply_bytes)
        self._outbox: dict[bytes, collections.deque[tuple[list[bytes], int]]] = {}
        self._outbox_bytes: collections.Counter[bytes] = collections.Counter()
        #: tracked streams (``options.track``): one StreamSegmenter per caller's stream, used by the worker only
        self._sessions = TrackSessions(backend, idle_s=track_idle_s, max_bytes=max_track_bytes)
        self._stream_secret = secrets.token_bytes(32)  # default stream names: unguessable, never shown

    # ------------------------------------------------------------------------------- lifecycle

    def start(self) -> LisaServer:
        """Bind and start the socket and worker threads; returns self. Raises on a bind failure."""
        import zmq

        if self._io_thread is not None:
            raise RuntimeError("server already started")
        backend_info = self.backend.info() if callable(getattr(self.backend, "info", None)) else {}
        self._info = json.loads(json.dumps({
            **dict(backend_info),
            "protocol_version": PROTOCOL_VERSION,
            "server_version": __version__,
            "supported_versions": list(SUPPORTED_VERSIONS),
            "ops": list(OPS),
            "limits": self.limits.to_dict(),
            "max_queue": self.queue.maxsize,
            "curve": self._curve_keys is not None,
            "batch": self.batch,
        }, default=str))
        self._ctx = zmq.Context()
        try:
            if self._curve_keys is not None:
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("lisa_agent.serving.auth"))
                self._auth.start()
                self._auth.configure_curve(domain="*", location=str(self._curve_allow))
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 500)
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client with a fixed identity takes over
            router.setsockopt(zmq.MAXMSGSIZE, 4 * self.limits.max_frame_bytes)
            # replies to a peer that does not read wait in our outbox (bounded in bytes), not in ZeroMQ's
            # pipe (bounded only in messages): a small pipe, and a send that fails instead of dropping
            router.setsockopt(zmq.SNDHWM, 4)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if self._curve_keys is not None:
                router.curve_publickey, router.curve_secretkey = self._curve_keys
                router.curve_server = True
            try:
                router.bind(self.bind)
            except zmq.ZMQError as exc:
                router.close(0)
                raise InvalidArgumentError(f"cannot bind {self.bind}: {exc}") from None
            self._router = router
            self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
            self._pull = self._ctx.socket(zmq.PULL)
            self._pull.bind(self._inproc)
        except BaseException:
            self._close_context()
            raise
        self._started = time.monotonic()
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="lisa-server-worker", daemon=True)
        self._io_thread = threading.Thread(target=self._serve, name="lisa-server-io", daemon=True)
        self._worker.start()
        self._io_thread.start()
        log.info("serving %s on %s (protocol %d, max queue %d, CurveZMQ %s)", self._info.get("model", "model"),
                 self.endpoint, PROTOCOL_VERSION, self.queue.maxsize, "on" if self._curve_keys else "off")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: the worker finishes its current job, queued jobs are answered
        ``shutting_down``, pending replies are flushed, sockets close. Idempotent."""
        self._stop.set()
        if self._io_thread is not None:
            self._io_thread.join(timeout)
            if self._io_thread.is_alive():  # the model is stuck in a call: leave the daemon threads behind
                log.warning("server threads did not stop within %.1f s; abandoning them", timeout)
                self._io_thread = None
                return
            self._io_thread = None
        self._close_context()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` is called (e.g. from a signal handler); True when stopped."""
        return self._stop.wait(timeout)

    def __enter__(self) -> LisaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _close_context(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            for sock in (self._router, self._pull):
                if sock is not None and not sock.closed:
                    sock.close(0)
            self._router = self._pull = None
            self._ctx.term()
            self._ctx = None

    # ---------------------------------------------------------------------------- socket thread

    def _serve(self) -> None:
        import zmq

        router, pull = self._router, self._pull
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        try:
            while not self._stop.is_set() or (self._worker is not None and self._worker.is_alive()):
                if self._stop.is_set():
                    for job in self.queue.drain():
                        self._send_error(router, job.envelope, job.request.id, "segment",
                                         ProtocolError(Code.SHUTTING_DOWN, "server is shutting down; not run"))
                events = dict(poller.poll(50 if not self._outbox else 5))
                if self._outbox:
                    self._flush(router)
                if pull in events:
                    self._forward(pull, router)
                if router in events:
                    for _ in range(64):  # bounded burst, so replies keep flowing under load
                        try:
                            parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(router, [p.bytes for p in parts], self._caller(parts))
            self._forward(pull, router)
        except Exception:  # pragma: no cover - a bug here must not pass silently
            log.exception("server socket loop crashed")
            self._stop.set()
        finally:
            router.close(500)
            pull.close(0)

    def _forward(self, pull: Any, router: Any) -> None:
        import zmq

        while True:
            try:
                frames = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._deliver(router, frames)

    def _deliver(self, router: Any, frames: list[bytes]) -> None:
        """Send a reply (identity first) now, or keep it in the peer's outbox when the peer is not taking
        replies; never blocks the socket loop."""
        import zmq

        peer = frames[0]
        if peer in self._outbox:  # keep the order: behind what is already waiting
            self._hold(peer, frames)
            return
        try:
            router.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self._hold(peer, frames)
        except zmq.ZMQError:  # the peer is gone (EHOSTUNREACH): nobody to answer
            self._count("replies_unroutable")

    def _hold(self, peer: bytes, frames: list[bytes]) -> None:
        box = self._outbox.setdefault(peer, collections.deque())
        size = sum(len(f) for f in frames)
        box.append((frames, size))
        self._outbox_bytes[peer] += size
        dropped = 0
        while self._outbox_bytes[peer] > self.max_pending_reply_bytes and len(box) > 1:
            _, old = box.popleft()
            self._outbox_bytes[peer] -= old
            dropped += 1
        if dropped:
            with self._stats_lock:
                self._stats["replies_dropped"] += dropped
            log.warning("peer %s does not read its replies: dropped its %d oldest (%d bytes still waiting, limit %d)",
                        peer.hex(), dropped, self._outbox_bytes[peer], self.max_pending_reply_bytes)

    def _flush(self, router: Any) -> None:
        """Send what waits in the outboxes, as far as each peer takes it."""
        import zmq

        for peer in list(self._outbox):
            box = self._outbox[peer]
            while box:
                frames, size = box[0]
                try:
                    router.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    self._count("replies_unroutable")
                box.popleft()
                self._outbox_bytes[peer] -= size
            if not box:
                del self._outbox[peer]
                del self._outbox_bytes[peer]

    def _caller(self, parts: list[Any]) -> str:
        """Who sent a message: ``curve:KEY`` (the client's CurveZMQ public key, which the authenticator
        checked) with CurveZMQ, else ``zmq:ROUTING_ID`` (its connection)."""
        if self._curve_keys is not None:
            try:
                key = parts[-1].get("User-Id")
            except Exception:  # noqa: BLE001 - no metadata: fall back to the connection
                key = None
            if key:
                return f"curve:{key}"
        return "zmq:" + parts[0].bytes.hex()

    def _handle(self, router: Any, msg: list[bytes], caller: str = "") -> None:
        t0 = time.perf_counter()
        if len(msg) >= 2 and msg[1] == b"":  # REQ-style envelope: identity, empty delimiter
            envelope, body = msg[:2], msg[2:]
        else:  # DEALER without delimiter
            envelope, body = msg[:1], msg[1:]
        rid: Any = None
        op = "?"
        try:
            req = parse_request(body, self.limits)
            rid, op = req.id, req.op
            if op == "health":
                self._send_ok(router, envelope, rid, op, self.health(), t0)
            elif op == "info":
                self._send_ok(router, envelope, rid, op, self._info, t0)
            elif self._stop.is_set():
                raise ProtocolError(Code.SHUTTING_DOWN, "server is shutting down; not run")
            else:
                self._enqueue(router, envelope, req, caller or "zmq:" + msg[0].hex())
        except ProtocolError as exc:
            self._send_error(router, envelope, exc.request_id if rid is None else rid, op, exc, t0)
        except Exception as exc:  # noqa: BLE001 - any failure becomes a reply, the loop goes on
            log.exception("error while handling a request")
            self._send_error(router, envelope, rid, op, RemoteError(Code.INTERNAL, f"{type(exc).__name__}: {exc}"), t0)

    def _enqueue(self, router: Any, envelope: list[bytes], req: Request, caller: str) -> None:
        req.check_mask_budget(self._info)
        if req.options.get("stream") is None:
            req.options["stream"] = default_stream(self._stream_secret, caller)
        key = req.frame_key()
        now = time.monotonic()
        deadline = now + req.timeout_ms / 1000.0 if req.timeout_ms is not None else None
        job = Job(envelope, req, key, now, deadline, owner=caller)
        if req.options["latest_only"] or self.latest_only:
            for old in self.queue.supersede(caller, req.stream or "", key):
                self._send_error(router, old.envelope, old.request.id, "segment", ProtocolError(
                    Code.SUPERSEDED, "superseded by a newer frame of its stream (latest_only); not run"))
        if not self.queue.put(job):
            raise ProtocolError(Code.QUEUE_FULL, f"server queue is full ({self.queue.maxsize} requests waiting); "
                                                 "retry later", req.id)

    def health(self) -> dict[str, Any]:
        """The ``health`` reply: liveness, queue depth and counters."""
        with self._stats_lock:
            stats = dict(self._stats)
        return {
            "status": "stopping" if self._stop.is_set() else "ok",
            "protocol_version": PROTOCOL_VERSION,
            "queue_depth": len(self.queue),
            "max_queue": self.queue.maxsize,
            "busy": self._busy,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "replies": stats,
            "pending_reply_bytes": int(sum(self._outbox_bytes.values())),
            "track_sessions": len(self._sessions),
            "track_bytes": int(self._sessions.nbytes),
        }

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self._stats[key] += 1

    def _emit(self, sock: Any, frames: list[bytes]) -> None:
        """The worker hands replies to the socket thread (inproc); the socket thread delivers them."""
        if sock is self._router:
            self._deliver(sock, frames)
        else:
            sock.send_multipart(frames)

    def _send_ok(self, sock: Any, envelope: list[bytes], rid: Any, op: str, result: Any, t0: float | None = None,
                 extra: list[bytes] | None = None) -> None:
        self._emit(sock, envelope + encode_reply(rid, result, extra_frames=extra))
        self._count("ok")
        if log.isEnabledFor(logging.DEBUG):
            ms = (time.perf_counter() - t0) * 1e3 if t0 is not None else float("nan")
            log.debug("%s id=%s -> ok (%.1f ms)", op, rid, ms)

    def _send_error(self, sock: Any, envelope: list[bytes], rid: Any, op: str, error: LisaError,
                    t0: float | None = None) -> None:
        self._emit(sock, envelope + encode_reply(rid, error=error))
        self._count(error.code)
        if log.isEnabledFor(logging.DEBUG):
            ms = (time.perf_counter() - t0) * 1e3 if t0 is not None else float("nan")
            log.debug("%s id=%s -> %s: %s (%.1f ms)", op, rid, error.code, error, ms)

    # ---------------------------------------------------------------------------- worker thread

    def _work(self) -> None:
        import zmq

        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self._inproc)
        swept = time.monotonic()
        try:
            while not self._stop.is_set():
                jobs = self.queue.get(0.05, self.batch)
                if time.monotonic() - swept >= 1.0:  # idle tracked sessions go even when no request comes
                    swept = time.monotonic()
                    self._sessions.sweep(swept)
                if jobs:
                    self._busy = True
                    try:
                        self._run(push, jobs)
                    finally:
                        self._busy = False
        except Exception:  # pragma: no cover
            log.exception("server worker crashed")
            self._stop.set()
        finally:
            push.close()

    def _run(self, push: Any, jobs: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in jobs:
            if job.deadline is not None and now > job.deadline:
                waited = (now - job.received) * 1e3
                self._send_error(push, job.envelope, job.request.id, "segment", ProtocolError(
                    Code.DEADLINE_EXCEEDED, f"waited {waited:.0f} ms in the queue, past its timeout of "
                                            f"{job.request.timeout_ms:g} ms; not run"))
            else:
                live.append(job)
        if not live:
            return
        run = run_on_one_frame(live, backend=self.backend, segment_batch=self._segment_batch,
                               sessions=self._sessions, limits=self.limits, now=now)
        for outcome in run.outcomes:
            job = outcome.job
            if outcome.error is not None:
                self._send_error(push, job.envelope, job.request.id, "segment", outcome.error, outcome.started)
            else:
                self._send_ok(push, job.envelope, job.request.id, "segment", outcome.payload, outcome.started,
                              outcome.extra)

