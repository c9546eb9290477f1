"""Scale-out with Ray Serve: one :class:`~lisa_agent.LisaSegmenter` per replica behind Serve's HTTP ingress.

``lisa-agent serve --engine ray`` (or :func:`lisa_app` + :func:`deploy` in Python, or a Serve config
file naming :func:`app_builder`) deploys :class:`LisaDeployment`. Each replica:

- loads its own engine from an :class:`~lisa_agent.config.EngineConfig` (its text form travels to the
  replica), on the GPU Ray gives it (``num_gpus`` per replica), with its own feature cache;
- answers ``POST`` requests in the protocol's HTTP form (:mod:`~lisa_agent.serving.http_transport`),
  validated by the same :func:`~lisa_agent.serving.protocol.parse_request` as the ZeroMQ server, so
  every door gets the same reply envelope, result schema and typed errors;
- groups the ``segment`` requests that Serve's dynamic batching (``@serve.batch``) collects: queries on
  the same frame run as one ``segment_batch`` call, the rest one by one, in arrival order, on one
  model thread (the replica's event loop stays free for ``info``, ``health`` and ``superseded``);
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

A stream's requests reach one replica through Serve's session affinity (the clients send their
stream as ``x-session-id``; the deployment routes with Serve's consistent-hash request router), so its
features, ``latest_only`` supersession and tracking sessions live in one place. See docs/ray.md for
what that guarantees and what not.

Importing this module imports Ray (``pip install 'lisa-agent[ray]'``); the engine and torch are
imported only inside replicas.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from ray import serve
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from .. import __version__, errors
from ..backend import SegmentBackend
from ..config import EngineConfig
from ..errors import Code, InvalidArgumentError, LisaError, ProtocolError, RemoteError
from ..result import SegmentationResult
from .execution import TRACK_BUDGET_BYTES, TRACK_IDLE_S, Job, TrackSessions, default_stream, run_on_one_frame
from .http_transport import (
    CONTENT_TYPE,
    SESSION_HEADER,
    decode_http_request,
    encode_http_reply,
    http_status,
    read_body,
)
from .protocol import (
    OPS,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Limits,
    Request,
    encode_reply,
    parse_request,
)
from .security import refuse_browser_request

log = logging.getLogger("lisa_agent.serving.ray")

#: the Serve application, its route and the deployment's name
APP_NAME = "lisa"
ROUTE_PREFIX = "/lisa"
DEPLOYMENT_NAME = "LisaDeployment"
#: Serve's consistent-hash request router: requests with the same ``x-session-id`` (a client's stream)
#: go to the same replica while the replica set is unchanged (Ray Serve's experimental API)
STREAM_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


@dataclass(frozen=True)
class ReplicaSettings:
    """What each replica does besides loading its engine (the Serve options are :func:`lisa_app`'s).

    Attributes:
        max_queue: requests a replica holds at once, running or waiting (Serve's ``max_ongoing_requests``;
            more wait in Serve's queue, see :func:`lisa_app`'s ``max_queued_requests``).
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


class _Item:
    """One ``segment`` request inside a replica: queued (in Serve's batch queue), started, superseded,
    abandoned (its client hung up) or done. State changes happen under the replica's lock."""

    __slots__ = ("job", "state", "superseded")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.state = "queued"
        self.superseded = asyncio.Event()


_Reply = list[bytes]


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=16, health_check_period_s=10.0,
                  health_check_timeout_s=30.0, max_constructor_retry_count=3)
class LisaDeployment:
    """A Serve replica holding one engine (see the module docstring).

    Args:
        engine: the :class:`~lisa_agent.config.EngineConfig` in its text form (``config.to_texts()``).
        settings: :class:`ReplicaSettings` as a dict.
        backend_factory: builds the backend instead of the engine (any
            :class:`~lisa_agent.frames.SegmentBackend`; model-free benchmarks and tests).
    """

    def __init__(self, engine: Mapping[str, str] | None = None, settings: Mapping[str, Any] | None = None,
                 backend_factory: Callable[[], SegmentBackend] | None = None) -> None:
        self.settings = ReplicaSettings.from_dict(settings or {})
        self.limits = self.settings.limits
        if backend_factory is not None:
            self.backend: SegmentBackend = backend_factory()
        else:
            from ..engine.segmenter import LisaSegmenter

            config = EngineConfig.from_texts(dict(engine or {}))
            log.info("replica loading %s", config.describe())
            self.backend = LisaSegmenter.from_config(config)
        segment_batch = getattr(self.backend, "segment_batch", None)
        self._segment_batch: Callable[..., list[SegmentationResult]] | None = (
            segment_batch if self.settings.batch and callable(segment_batch) else None)
        try:
            self.replica = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # noqa: BLE001 - built outside a Serve replica
            self.replica = "local"
        backend_info = self.backend.info() if callable(getattr(self.backend, "info", None)) else {}
        self._info = json.loads(json.dumps({
            **dict(backend_info),
            "protocol_version": PROTOCOL_VERSION,
            "server_version": __version__,
            "supported_versions": list(SUPPORTED_VERSIONS),
            "ops": list(OPS),
            "limits": self.limits.to_dict(),
            "max_queue": self.settings.max_queue,
            "curve": False,
            "batch": self._segment_batch is not None,
            "engine": "ray",
            "replica": self.replica,
            "max_batch_size": self.settings.max_batch_size,
            "batch_wait_ms": self.settings.batch_wait_ms,
        }, default=str))
        batched: Any = self._batched
        batched.set_max_batch_size(self.settings.max_batch_size)
        batched.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000.0)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lisa-model")
        self._sessions = TrackSessions(self.backend, idle_s=self.settings.track_idle_s,
                                       max_bytes=self.settings.max_track_bytes)  # used by the model thread only
        self._stream_secret = secrets.token_bytes(32)  # default stream names: unguessable, never shown
        self._lock = threading.Lock()
        #: requests held, by (caller, stream)
        self._streams: dict[tuple[str, str], list[_Item]] = collections.defaultdict(list)
        self._stats: collections.Counter[str] = collections.Counter()
        #: ``segment_batch`` calls with more than one query, and the requests they answered
        self._batches: collections.Counter[str] = collections.Counter()
        self._queued = 0
        self._busy_since: float | None = None
        self._failures = 0
        self._last_failure = ""
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
            batches = {"calls": self._batches["calls"], "requests": self._batches["requests"]}
            queued = self._queued
        return {
            "status": "ok",
            "protocol_version": PROTOCOL_VERSION,
            "queue_depth": queued,
            "max_queue": self.settings.max_queue,
            "busy": self._busy_since is not None,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "replies": stats,
            "batches": batches,
            "engine": "ray",
            "replica": self.replica,
            "track_sessions": len(self._sessions),
            "track_bytes": int(self._sessions.nbytes),
        }

    def check_health(self) -> None:
        """Serve's periodic health check: raises (so Serve replaces this replica) when a model call is
        stuck or the model keeps failing. Also sweeps idle tracked sessions (on the model thread, between
        model calls)."""
        try:
            self._executor.submit(self._sessions.sweep)
        except RuntimeError:  # shutting down
            pass
        since = self._busy_since
        if since is not None and time.monotonic() - since > self.settings.stuck_after_s:
            raise RuntimeError(f"a model call has run for {time.monotonic() - since:.0f} s (stuck_after_s "
                               f"{self.settings.stuck_after_s:g}); replace this replica")
        if self._failures >= self.settings.max_consecutive_failures:
            raise RuntimeError(f"the last {self._failures} model calls failed (last: {self._last_failure}); "
                               "replace this replica")

    # --------------------------------------------------------------------------------- segment

    async def _segment(self, req: Request, received: float, caller: str) -> Response:
        req.check_mask_budget(self._info)
        if req.options.get("stream") is None:
            req.options["stream"] = default_stream(self._stream_secret, caller)
        stream = (caller, req.stream or "")
        key = req.frame_key()
        deadline = received + req.timeout_ms / 1000.0 if req.timeout_ms is not None else None
        item = _Item(Job([], req, key, received, deadline, owner=caller))
        superseded: list[_Item] = []
        with self._lock:
            if req.options["latest_only"] or self.settings.latest_only:
                for old in self._streams[stream]:
                    if old.job.key != key and old.state == "queued":
                        old.state = "superseded"
                        superseded.append(old)
            self._streams[stream].append(item)
            self._queued += 1
        for old in superseded:
            old.superseded.set()  # its request answers `superseded` now; the model thread skips it
        task = asyncio.ensure_future(self._batched(item))
        task.add_done_callback(_retrieve)
        waiter = asyncio.ensure_future(item.superseded.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if item.state == "superseded":
                return self._error(req.id, ProtocolError(
                    Code.SUPERSEDED, "superseded by a newer frame of its stream (latest_only); not run"))
            reply = task.result()
        except asyncio.CancelledError:  # the client hung up: not run if it has not started
            with self._lock:
                if item.state == "queued":
                    item.state = "abandoned"
            raise
        finally:
            waiter.cancel()
            with self._lock:
                self._streams[stream].remove(item)
                if not self._streams[stream]:
                    del self._streams[stream]
                if item.state in ("queued", "superseded", "abandoned"):
                    self._queued -= 1
        assert reply is not None  # a started item always has a reply
        head = json.loads(reply[0])
        code = None if head.get("ok") else head.get("error", {}).get("code")
        self._count(code or "ok")
        return Response(encode_http_reply(reply), status_code=http_status(code), media_type=CONTENT_TYPE)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[_Item]) -> list[_Reply | None]:
        """Serve's dynamic batching: the ``segment`` requests collected meanwhile, run on the model thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_items, items)

    # ---------------------------------------------------------------------------- model thread

    def _run_items(self, items: list[_Item]) -> list[_Reply | None]:
        """Reply frames for each item (None for items superseded or abandoned meanwhile): deadlines first,
        then groups of queries on one frame (one ``segment_batch`` call), in arrival order."""
        now = time.monotonic()
        replies: dict[int, _Reply | None] = {}
        live: list[_Item] = []
        with self._lock:
            for item in items:
                if item.state != "queued":
                    replies[id(item)] = None
                    continue
                item.state = "started"
                self._queued -= 1
                job = item.job
                if job.deadline is not None and now > job.deadline:
                    replies[id(item)] = encode_reply(job.request.id, error=ProtocolError(
                        Code.DEADLINE_EXCEEDED, f"waited {(now - job.received) * 1e3:.0f} ms in the replica, past its "
                                                f"timeout of {job.request.timeout_ms:g} ms; not run"))
                else:
                    live.append(item)
        while live:
            first = live.pop(0)
            group = [first]
            if self._segment_batch is not None and first.job.batchable():
                group += [i for i in live if i.job.batchable() and i.job.same_frame(first.job)]
                live = [i for i in live if all(i is not g for g in group)]
            for item, reply in zip(group, self._run_group([i.job for i in group], now), strict=True):
                replies[id(item)] = reply
        return [replies[id(item)] for item in items]

    def _run_group(self, jobs: list[Job], now: float) -> list[_Reply]:
        """Replies for requests on one frame (several only when they can run as one batch)."""
        self._busy_since = time.monotonic()
        try:
            run = run_on_one_frame(jobs, backend=self.backend, segment_batch=self._segment_batch,
                                   sessions=self._sessions, limits=self.limits, now=now)
        finally:
            self._busy_since = None
        with self._lock:
            if run.batched:
                self._batches["calls"] += 1
                self._batches["requests"] += run.batched
        replies = []
        for outcome in run.outcomes:
            # only the model's own faults count toward health; a caller's mistake (a typed error) neither
            # counts nor clears the count
            if outcome.model_failed:
                self._failures += 1
                self._last_failure = str(outcome.error)[:300]
            elif outcome.payload is not None:
                self._failures = 0
            if outcome.error is not None:
                replies.append(encode_reply(outcome.job.request.id, error=outcome.error))
            else:
                replies.append(encode_reply(outcome.job.request.id, outcome.payload, extra_frames=outcome.extra))
        return replies


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done callback: fetch the outcome of a batch task nobody awaits any more (a superseded request)."""
    if not task.cancelled():
        task.exception()


# ----------------------------------------------------------------------------------- applications


def lisa_app(config: EngineConfig | None = None, *, replicas: int = 1, autoscaling: Mapping[str, Any] | None = None,
             num_gpus: float = 0.0, num_cpus: float = 1.0, max_queued_requests: int = 64,
             settings: ReplicaSettings | None = None, stream_affinity: bool = True,
             health_check_period_s: float = 10.0,
             backend_factory: Callable[[], SegmentBackend] | None = None) -> Any:
    """The Serve application: :class:`LisaDeployment` with these options (pass it to :func:`deploy`).

    Args:
        config: each replica's engine (default: ``EngineConfig()``).
        replicas: fixed number of replicas (ignored with ``autoscaling``).
        autoscaling: Serve's ``autoscaling_config`` (``min_replicas``, ``max_replicas``,
            ``target_ongoing_requests``, ...) instead of a fixed count.
        num_gpus / num_cpus: Ray resources per replica (``num_gpus=0.5``: two replicas share a GPU).
        max_queued_requests: requests waiting in Serve's queue for a replica with room, at most (-1: no
            bound); beyond, Serve answers 503 and clients raise ``ServerBusyError``.
        settings: what each replica does (:class:`ReplicaSettings`); its ``max_queue`` is Serve's
            ``max_ongoing_requests``.
        stream_affinity: route requests with Serve's consistent-hash router on the clients' stream
            (``x-session-id``), so a stream stays on one replica; False: Serve's default router
            (least loaded of two).
        health_check_period_s: how often Serve calls each replica's ``check_health``.
        backend_factory: build this backend in each replica instead of the engine.
    """
    config = config or EngineConfig()
    settings = settings or ReplicaSettings()
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InvalidArgumentError(f"replicas must be a whole number >= 1; got {replicas!r}")
    for name, value in (("num_gpus", num_gpus), ("num_cpus", num_cpus)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
            raise InvalidArgumentError(f"{name} must be a non-negative number; got {value!r}")
    if config.device.startswith("cuda") and num_gpus <= 0:
        raise InvalidArgumentError(f"device {config.device!r} needs a GPU per replica: give num_gpus > 0 (a replica "
                                   "sees only the GPUs Ray assigns it)")
    if isinstance(max_queued_requests, bool) or not isinstance(max_queued_requests, int) \
            or not (max_queued_requests == -1 or max_queued_requests >= 1):
        raise InvalidArgumentError(f"max_queued_requests must be -1 (no bound) or >= 1; got {max_queued_requests!r}")
    options: dict[str, Any] = {
        "max_ongoing_requests": settings.max_queue,
        "max_queued_requests": max_queued_requests,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "health_check_period_s": health_check_period_s,
    }
    if autoscaling is not None:
        options["autoscaling_config"] = dict(autoscaling)
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = replicas
    if stream_affinity:
        options["request_router_config"] = {"request_router_class": STREAM_ROUTER}
    deployment: Any = LisaDeployment  # a serve.Deployment (Ray's decorator typing keeps the class type)
    return deployment.options(**options).bind(config.to_texts(), settings.to_dict(), backend_factory)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config files' entry point (``import_path: lisa_agent.serving.ray_app:app_builder``).

    ``args`` holds :class:`~lisa_agent.config.EngineConfig` fields in their text form (``model``,
    ``dtype``, ``mask_tta``, ...), :class:`ReplicaSettings` fields and ``stream_affinity`` (default
    true); the file's ``deployments`` section sets replicas, GPUs and autoscaling (docs/ray.md).
    """
    values = dict(args or {})
    affinity = values.pop("stream_affinity", True)
    if not isinstance(affinity, bool):
        raise InvalidArgumentError(f"stream_affinity must be true or false; got {affinity!r}")
    engine_names = {name for name, _, _ in EngineConfig.options()}
    config = EngineConfig.from_texts({k: v for k, v in values.items() if k in engine_names})
    settings = ReplicaSettings.from_dict({k: v for k, v in values.items() if k not in engine_names})
    # a GPU per replica for CUDA engines; the config file's ray_actor_options override it
    return lisa_app(config, settings=settings, stream_affinity=affinity,
                    num_gpus=1.0 if config.device.startswith("cuda") else 0.0)


def endpoint_url(host: str, port: int, route_prefix: str = ROUTE_PREFIX) -> str:
    """The URL clients use: ``http://HOST:PORT/lisa`` (a wildcard host is reached on 127.0.0.1 here)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}{route_prefix}"


_LISA_ERROR = re.compile(r"lisa_agent\.errors\.(\w+): (.+)")


def private_temp_dir() -> str:
    """Where a Ray instance started here keeps its session (sockets, logs, spilled objects): ``ray`` inside
    ``TMP/lisa-ray-UID``, a folder only this user may enter (mode 0700; a new private folder when that name is
    someone else's). Ray makes its own folder world-writable; the private one around it keeps others out."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = os.path.join(tempfile.gettempdir(), f"lisa-ray-{uid if uid is not None else 'user'}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid):
        path = tempfile.mkdtemp(prefix="lisa-ray-")  # not ours (or not a folder): a fresh private one
    elif info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return os.path.join(path, "ray")


def connect(address: str | None = None, **ray_init: Any) -> bool:
    """Join the Ray cluster at ``address`` (see :func:`deploy`) or start a local one; True when this
    call started a new local instance (its owner shuts it down). Does nothing when already connected.

    A local instance started here keeps to this machine where Ray lets it: no dashboard (its HTTP server
    would listen beside Serve's), its session folder in :func:`private_temp_dir` instead of the shared
    ``/tmp/ray`` (readable logs, writable sockets), Ray's token authentication as Ray 2.60 turns it on for
    new local instances. Ray's own gRPC ports still listen on every interface (Ray has no option to bind
    them to loopback): docs/ray.md says how to keep them off the network. ``ray_init`` overrides these."""
    import ray

    if ray.is_initialized():
        return False
    started = address is None and not os.environ.get("RAY_ADDRESS")
    if started:
        ray_init = {"include_dashboard": False, "_temp_dir": private_temp_dir(), **ray_init}
    ray.init(address=address, **ray_init)
    return started


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster (0 when there are none)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def deploy(app: Any, *, address: str | None = None, http_host: str = "127.0.0.1", http_port: int = 8000,
           name: str = APP_NAME, route_prefix: str = ROUTE_PREFIX, ray_init: Mapping[str, Any] | None = None) -> str:
    """Start or join a Ray cluster, start Serve's HTTP proxies and deploy ``app``; returns its URL.

    Args:
        address: ``None`` starts a local Ray instance (or joins the one ``RAY_ADDRESS`` names),
            ``"auto"`` joins the one running on this machine, ``ray://HOST:10001`` connects as a Ray
            client, a GCS ``HOST:PORT`` joins that cluster.
        http_host / http_port: where Serve's proxies listen. Serve keeps the options of its first start
            on a cluster: on a cluster where Serve already runs, these are not applied.
        ray_init: further ``ray.init`` arguments (``num_cpus``, ...) when this call starts Ray.

    Waits until every replica is up. A replica that cannot load its engine fails the deployment:
    the engine's typed error (e.g. ``ModelNotFoundError``) is raised here with the replica's message.
    """
    connect(address, **dict(ray_init or {}))
    serve.start(http_options={"host": http_host, "port": int(http_port)})
    try:
        serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    except Exception as exc:  # noqa: BLE001 - Ray's deployment failure; the replica's traceback is in its status
        text = str(exc)
        try:
            app_status = serve.status().applications.get(name)
            if app_status is not None:
                text += "\n" + app_status.message + "".join(
                    "\n" + d.message for d in app_status.deployments.values())
        except Exception:  # noqa: BLE001 - the status is a bonus
            pass
        matches = list(_LISA_ERROR.finditer(text))
        match = matches[-1] if matches else None  # the innermost: the replica's own error
        cls = getattr(errors, match.group(1), None) if match else None
        message = match.group(2).strip() if match else " ".join(str(exc).split())[:500]
        if isinstance(cls, type) and issubclass(cls, LisaError):
            raise cls(f"{message} (in a Ray Serve replica)") from None
        raise LisaError(f"the Ray Serve application {name!r} failed to deploy: {message}") from None
    host, port = _serving_http(http_host, int(http_port))
    if (host, port) != (http_host, int(http_port)):
        log.warning("Serve already ran on this cluster with HTTP on %s:%d; %s:%d was not applied", host, port,
                    http_host, http_port)
    return endpoint_url(host, port, route_prefix)


def _serving_http(host: str, port: int) -> tuple[str, int]:
    """Where Serve's proxies really listen: the options of Serve's first start on the cluster win. Read from
    Serve's controller client (not a public API: falls back to the requested values)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        config = client.http_config if client is not None else None
        if config is not None and config.host is not None and isinstance(config.port, int):
            return str(config.host), int(config.port)
    except Exception:  # noqa: BLE001 - private API: keep the requested values
        pass
    return host, port


def replica_actors(name: str = APP_NAME) -> list[str]:
    """Names of the Ray actors of ``name``'s replicas (namespace ``serve``), e.g. for ``ray.kill`` in a drill."""
    import ray

    prefix = f"SERVE_REPLICA::{name}#{DEPLOYMENT_NAME}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == "serve" and a["name"].startswith(prefix))
