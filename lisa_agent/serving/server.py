"""The model server: a ROUTER socket loop, a bounded queue and one model worker thread.

The socket thread only parses, validates and routes: it answers ``info`` / ``health`` itself,
answers malformed requests with typed errors, refuses work when the queue is full and supersedes
stale ``latest_only`` frames. The worker thread owns the model: it decodes the image, skips
requests past their deadline, runs the backend (batching queued ``fast`` queries on one frame when
the backend has ``segment_batch``) and hands the reply back to the socket thread over an inproc
PUSH/PULL pair (ZeroMQ sockets are not shared between threads). Every request gets exactly one
reply. The queue is :class:`~lisa_agent.serving.request_queue.RequestQueue`; replies a peer does not take wait
in its :class:`~lisa_agent.serving.outbox.Outbox`; admitting a request and running it on the model is
:mod:`lisa_agent.serving.execution`, shared with the Ray Serve replica.

``backend`` is a :class:`~lisa_agent.backend.SegmentBackend` (``segment(frame, query, **options) ->
SegmentationResult`` and ``info() -> dict``; ``segment_batch(frame, queries, return_logits=...)``
optional): in production a :class:`~lisa_agent.LisaSegmenter`. The worker turns each request into a
:class:`~lisa_agent.frames.Frame` (pixels, ``frame_id``, ``stamp``, depth, intrinsics) and replies with
the result schema (:meth:`SegmentationResult.to_dict`), adding ``server_queue`` and ``server_decode``
to its ``timings_ms`` and, with ``return_logits``, a ``logits`` descriptor.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import threading
import time
from typing import Any

from ..backend import SegmentBackend
from ..errors import Code, InvalidArgumentError, LisaError, ProtocolError, RemoteError
from . import security
from .execution import (
    TRACK_BUDGET_BYTES,
    TRACK_IDLE_S,
    Job,
    TrackSessions,
    admit,
    batch_call,
    describe_server,
    expired,
    run_on_one_frame,
    superseded,
)
from .framing import PROTOCOL_VERSION, Limits, encode_reply
from .outbox import Outbox
from .protocol import Request, parse_request
from .request_queue import RequestQueue

log = logging.getLogger("lisa_agent.serving")

DEFAULT_BIND = "tcp://127.0.0.1:5557"


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
        self._segment_batch = batch_call(backend, batch)  # fetched once, None when not used
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
        #: replies a peer has not taken yet (it does not read, or reads slowly), by peer identity:
        #: at most ``max_pending_reply_bytes`` each; beyond, the peer's oldest replies are dropped (and counted)
        self._outbox = Outbox(max_pending_reply_bytes, self._count)
        self.max_pending_reply_bytes = self._outbox.max_bytes
        #: tracked streams (``options.track``): one StreamSegmenter per caller's stream, used by the worker only
        self._sessions = TrackSessions(backend, idle_s=track_idle_s, max_bytes=max_track_bytes)
        self._stream_secret = secrets.token_bytes(32)  # default stream names: unguessable, never shown

    # ------------------------------------------------------------------------------- lifecycle

    def start(self) -> LisaServer:
        """Bind and start the socket and worker threads; returns self. Raises on a bind failure."""
        import zmq

        if self._io_thread is not None:
            raise RuntimeError("server already started")
        self._info = describe_server(self.backend, self.limits, max_queue=self.queue.maxsize,
                                     curve=self._curve_keys is not None, batch=self.batch)
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
                    self._outbox.flush(router)
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
            self._outbox.deliver(router, frames)

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
        job = admit(req, owner=caller, received=time.monotonic(), secret=self._stream_secret, info=self._info,
                    envelope=envelope)
        if req.options["latest_only"] or self.latest_only:
            for old in self.queue.supersede(caller, req.stream or "", job.key):
                self._send_error(router, old.envelope, old.request.id, "segment", superseded())
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
            "pending_reply_bytes": self._outbox.nbytes,
            "track_sessions": len(self._sessions),
            "track_bytes": int(self._sessions.nbytes),
        }

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    def _emit(self, sock: Any, frames: list[bytes]) -> None:
        """The worker hands replies to the socket thread (inproc); the socket thread delivers them."""
        if sock is self._router:
            self._outbox.deliver(sock, frames)
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
            late = expired(job, now, "the queue")
            if late is not None:
                self._send_error(push, job.envelope, job.request.id, "segment", late)
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

