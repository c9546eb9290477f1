"""A Ray Serve replica of LISA: :class:`LisaDeployment`, one backend behind Serve's HTTP ingress.

Each replica (deployed by :mod:`~lisa_agent.serving.ray_app`):

- loads its own engine from an :class:`~lisa_agent.config.EngineConfig` (its text form travels to the
  replica), on the GPU Ray gives it (``num_gpus`` per replica), with its own feature cache;
- answers ``POST`` requests in the protocol's HTTP form (:mod:`~lisa_agent.serving.http_transport`),
  validated by the same :func:`~lisa_agent.serving.protocol.parse_request` as the ZeroMQ server, so
  every door gets the same reply envelope, result schema and typed errors;
- hands the ``segment`` requests that Serve's dynamic batching (``@serve.batch``) collects to its model
  thread (:class:`~lisa_agent.serving.ray_worker.ModelWorker`: queries on the same frame as one
  ``segment_batch`` call, the rest one by one, in arrival order), so the replica's event loop stays free for
  ``info``, ``health`` and ``superseded``;
- keeps the ZeroMQ server's per-request rules: ``timeout_ms`` (a request still waiting when its time is
  up is answered ``deadline_exceeded``, not run), ``latest_only`` per ``stream`` (an older queued frame
  is answered ``superseded`` at once and never run), ``options.track`` sessions per stream, and a
  request whose client hung up is not run;
- reports unhealthy to Serve's ``check_health`` (and is restarted by Serve) when a model call has run
  for ``stuck_after_s`` or the last ``max_consecutive_failures`` model calls failed unexpectedly (a
  caller's mistake, a typed error such as ``invalid_query``, counts neither way);
- guards its ingress as the web console does (:func:`~lisa_agent.serving.security.refuse_browser_request`):
  a ``Host`` that is not a loopback name (unless ``allowed_hosts`` says otherwise), a cross-site ``Origin``
  and a ``POST`` that is not ``application/json`` are refused; a body over the protocol's limit is refused
  on its ``Content-Length`` before it is read (and a streamed one as soon as it passes the limit).

A request's caller is its ``x-session-id`` (the clients send a random one, their stream) or, without one,
its connection: ``latest_only`` supersession and tracking sessions are the caller's own, as on the ZeroMQ
server.

Importing this module imports Ray (``pip install 'lisa-agent[ray]'``); the engine and torch are
imported only inside replicas.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from ray import serve
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from ..backend import SegmentBackend
from ..config import EngineConfig
from ..errors import Code, InvalidArgumentError, LisaError, ProtocolError, RemoteError
from .execution import TRACK_BUDGET_BYTES, TRACK_IDLE_S, admit, describe_server, superseded
from .framing import PROTOCOL_VERSION, Limits, encode_reply
from .http_transport import (
    CONTENT_TYPE,
    SESSION_HEADER,
    decode_http_request,
    encode_http_reply,
    http_status,
    read_body,
)
from .protocol import Request, parse_request
from .ray_worker import Item, ModelWorker, ReplicaRequests, Reply
from .security import refuse_browser_request

log = logging.getLogger("lisa_agent.serving.ray")

DEPLOYMENT_NAME = "LisaDeployment"


@dataclass(frozen=True)
class ReplicaSettings:
    """What each replica does besides loading its engine (the Serve options are
    :func:`~lisa_agent.serving.ray_app.lisa_app`'s).

    Attributes:
        max_queue: requests a replica holds at once, running or waiting (Serve's ``max_ongoing_requests``;
            more wait in Serve's queue, see :func:`~lisa_agent.serving.ray_app.lisa_app`'s
            ``max_queued_requests``).
        max_side / max_frame_bytes: the protocol's image limits (:class:`~lisa_agent.serving.protocol.Limits`).
        max_batch_size / batch_wait_ms: Serve's dynamic batching: requests collected for one model run
            at most, and how long the first waits for company.
        batch: run queries on one frame as one ``segment_batch`` call (when the engine has it).
        latest_only: treat every request as ``latest_only`` (camera-stream deployments).
        stuck_after_s: a model call running longer marks the replica unhealthy (Serve restarts it).
        max_consecutive_failures: this many unexpected model failures in a row mark it unhealthy.
        allowed_hosts: ``Host`` names accepted besides loopback names and addresses (DNS rebinding is
            refused); ``["*"]`` accepts any, for Serve proxies listening on a network.
        track_idle_s / max_track_bytes: tracked sessions idle this long are dropped (swept at each of Serve's
            health checks), and all of a replica's sessions hold at most this many bytes together.
    """

    max_queue: int = 16
    max_side: int = 4096
    max_frame_bytes: int = 64 * 1024 * 1024
    max_batch_size: int = 8
    batch_wait_ms: float = 2.0
    batch: bool = True
    latest_only: bool = False
    stuck_after_s: float = 300.0
    max_consecutive_failures: int = 3
    allowed_hosts: tuple[str, ...] = ()
    track_idle_s: float = TRACK_IDLE_S
    max_track_bytes: int = TRACK_BUDGET_BYTES

    def __post_init__(self) -> None:
        hosts = self.allowed_hosts
        if isinstance(hosts, str) or not isinstance(hosts, (list, tuple)) or not all(
                isinstance(h, str) and h.strip() for h in hosts):
            raise InvalidArgumentError(f"allowed_hosts must be a list of host names (or [\"*\"]); got {hosts!r}")
        object.__setattr__(self, "allowed_hosts", tuple(h.strip() for h in hosts))
        for name in ("max_queue", "max_side", "max_frame_bytes", "max_batch_size", "max_consecutive_failures",
                     "max_track_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be a whole number >= 1; got {value!r}")
        if self.max_side < 8:
            raise InvalidArgumentError(f"max_side must be at least 8; got {self.max_side}")
        for name in ("batch_wait_ms", "stuck_after_s", "track_idle_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
                raise InvalidArgumentError(f"{name} must be a non-negative number; got {value!r}")
        for name in ("batch", "latest_only"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be true or false; got {getattr(self, name)!r}")

    @property
    def limits(self) -> Limits:
        return Limits(max_frame_bytes=self.max_frame_bytes, max_side=self.max_side)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["allowed_hosts"] = list(self.allowed_hosts)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ReplicaSettings:
        """Settings from a mapping of field names (a Serve config's ``args``); unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown replica settings {unknown}; known: {sorted(known)}")
        return cls(**dict(values))


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=16, health_check_period_s=10.0,
                  health_check_timeout_s=30.0, max_constructor_retry_count=3)
class LisaDeployment:
    """A Serve replica holding one engine (see the module docstring).

    Args:
        engine: the :class:`~lisa_agent.config.EngineConfig` in its text form (``config.to_texts()``).
        settings: :class:`ReplicaSettings` as a dict.
        backend_factory: builds the backend instead of the engine (any
            :class:`~lisa_agent.backend.SegmentBackend`; model-free benchmarks and tests).
    """

    def __init__(self, engine: Mapping[str, str] | None = None, settings: Mapping[str, Any] | None = None,
                 backend_factory: Callable[[], SegmentBackend] | None = None) -> None:
        self.settings = ReplicaSettings.from_dict(settings or {})
        self.limits = self.settings.limits
        if backend_factory is not None:
            self.backend: SegmentBackend = backend_factory()
        else:
            from ..backend import load_model

            config = EngineConfig.from_texts(dict(engine or {}))
            log.info("replica loading %s", config.describe())
            self.backend = load_model(config)
        #: the requests this replica holds, and the model thread that runs them
        self.requests = ReplicaRequests()
        self.worker = ModelWorker(self.backend, self.requests, limits=self.limits, batch=self.settings.batch,
                                  track_idle_s=self.settings.track_idle_s,
                                  max_track_bytes=self.settings.max_track_bytes)
        try:
            self.replica = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # noqa: BLE001 - built outside a Serve replica
            self.replica = "local"
        self._info = describe_server(
            self.backend, self.limits, max_queue=self.settings.max_queue, curve=False,
            batch=self.worker.segment_batch is not None, engine="ray", replica=self.replica,
            max_batch_size=self.settings.max_batch_size, batch_wait_ms=self.settings.batch_wait_ms)
        batched: Any = self._batched
        batched.set_max_batch_size(self.settings.max_batch_size)
        batched.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000.0)
        self._stream_secret = secrets.token_bytes(32)  # default stream names: unguessable, never shown
        self._lock = threading.Lock()
        self._stats: collections.Counter[str] = collections.Counter()
        self._started = time.monotonic()

    # ------------------------------------------------------------------------------- HTTP ingress

    async def __call__(self, request: HttpRequest) -> Response:
        """One protocol request (the JSON body of :mod:`~lisa_agent.serving.http_transport`), one reply."""
        received = time.monotonic()
        rid: Any = None
        try:
            headers = request.headers
            refusal = refuse_browser_request(request.method, headers.get("host"), headers.get("origin"),
                                             headers.get("content-type"), check_host=True,
                                             hosts=self.settings.allowed_hosts)
            if refusal is not None:
                raise ProtocolError(refusal.code, refusal.message)
            if request.method != "POST":
                raise ProtocolError(Code.BAD_REQUEST, f"send LISA requests as POST with a JSON body; got "
                                                      f"{request.method}")
            body = await read_body(request.stream(), headers.get("content-length"), self.limits)
            frames = decode_http_request(body, self.limits)
            req = parse_request(frames, self.limits)
            rid = req.id
            if req.op == "health":
                return self._reply(rid, self.health())
            if req.op == "info":
                return self._reply(rid, self._info)
            session = headers.get(SESSION_HEADER)
            client = request.client
            caller = (f"session:{session}" if session else
                      f"peer:{client.host}:{client.port}" if client is not None else "peer:?")
            return await self._segment(req, received, caller)
        except ProtocolError as exc:
            return self._error(exc.request_id if rid is None else rid, exc)
        except Exception as exc:  # noqa: BLE001 - any failure becomes a reply
            log.exception("error while handling a request")
            return self._error(rid, RemoteError(Code.INTERNAL, f"{type(exc).__name__}: {exc}"))

    def _reply(self, rid: Any, result: Any) -> Response:
        self._count("ok")
        return Response(encode_http_reply(encode_reply(rid, result)), status_code=200, media_type=CONTENT_TYPE)

    def _error(self, rid: Any, error: LisaError) -> Response:
        self._count(error.code)
        return Response(encode_http_reply(encode_reply(rid, error=error)), status_code=http_status(error.code),
                        media_type=CONTENT_TYPE)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def health(self) -> dict[str, Any]:
        """The ``health`` reply of this replica: liveness, requests it holds, replies by code, the
        ``segment_batch`` calls that grouped queries on one frame (``batches``), the replica's id."""
        with self._lock:
            stats = dict(self._stats)
        return {
            "status": "ok",
            "protocol_version": PROTOCOL_VERSION,
            "queue_depth": self.requests.queued,
            "max_queue": self.settings.max_queue,
            "busy": self.worker.busy_since is not None,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "replies": stats,
            "batches": self.worker.batches(),
            "engine": "ray",
            "replica": self.replica,
            "track_sessions": len(self.worker.sessions),
            "track_bytes": int(self.worker.sessions.nbytes),
        }

    def check_health(self) -> None:
        """Serve's periodic health check: raises (so Serve replaces this replica) when a model call is
        stuck or the model keeps failing. Also sweeps idle tracked sessions (on the model thread, between
        model calls)."""
        self.worker.sweep()
        self.worker.check(self.settings.stuck_after_s, self.settings.max_consecutive_failures)

    # --------------------------------------------------------------------------------- segment

    async def _segment(self, req: Request, received: float, caller: str) -> Response:
        item = Item(admit(req, owner=caller, received=received, secret=self._stream_secret, info=self._info))
        for old in self.requests.add(item, latest_only=req.options["latest_only"] or self.settings.latest_only):
            old.superseded.set()  # its request answers `superseded` now; the model thread skips it
        task = asyncio.ensure_future(self._batched(item))
        task.add_done_callback(_retrieve)
        waiter = asyncio.ensure_future(item.superseded.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if item.state == "superseded":
                return self._error(req.id, superseded())
            reply = task.result()
        except asyncio.CancelledError:  # the client hung up: not run if it has not started
            self.requests.abandon(item)
            raise
        finally:
            waiter.cancel()
            self.requests.remove(item)
        assert reply is not None  # a started item always has a reply
        head = json.loads(reply[0])
        code = None if head.get("ok") else head.get("error", {}).get("code")
        self._count(code or "ok")
        return Response(encode_http_reply(reply), status_code=http_status(code), media_type=CONTENT_TYPE)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[Item]) -> list[Reply | None]:
        """Serve's dynamic batching: the ``segment`` requests collected meanwhile, run on the model thread."""
        return await self.worker.run(items)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done callback: fetch the outcome of a batch task nobody awaits any more (a superseded request)."""
    if not task.cancelled():
        task.exception()
