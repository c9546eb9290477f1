"""Scale-out with Ray Serve: the application, one :class:`~lisa_agent.LisaSegmenter` per replica behind Serve's
HTTP ingress, and the helpers that start or join a Ray cluster and deploy it.

``lisa-agent serve --engine ray`` (or :func:`lisa_app` + :func:`deploy` in Python, or a Serve config
file naming :func:`app_builder`) deploys :class:`~lisa_agent.serving.ray_replica.LisaDeployment`, each replica
as :class:`~lisa_agent.serving.ray_replica.ReplicaSettings` say (the replica itself:
:mod:`~lisa_agent.serving.ray_replica`; its model thread: :mod:`~lisa_agent.serving.ray_worker`).

A stream's requests reach one replica through Serve's session affinity (the clients send their
stream as ``x-session-id``; the deployment routes with Serve's consistent-hash request router), so its
features, ``latest_only`` supersession and tracking sessions live in one place. See docs/ray.md for
what that guarantees and what not.

Importing this module imports Ray (``pip install 'lisa-agent[ray]'``); the engine and torch are
imported only inside replicas.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from ray import serve

from .. import errors
from ..backend import SegmentBackend
from ..config import EngineConfig
from ..errors import InvalidArgumentError, LisaError
from .ray_replica import DEPLOYMENT_NAME, LisaDeployment, ReplicaSettings

__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "ROUTE_PREFIX", "LisaDeployment", "ReplicaSettings", "app_builder",
           "cluster_gpus", "connect", "deploy", "endpoint_url", "lisa_app", "private_temp_dir", "replica_actors"]

log = logging.getLogger("lisa_agent.serving.ray")

#: the Serve application and its route
APP_NAME = "lisa"
ROUTE_PREFIX = "/lisa"
#: Serve's consistent-hash request router: requests with the same ``x-session-id`` (a client's stream)
#: go to the same replica while the replica set is unchanged (Ray Serve's experimental API)
STREAM_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


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
