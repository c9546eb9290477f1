"""``lisa-agent serve``: load a model once and serve it until SIGINT / SIGTERM.

``--engine zmq`` (the default): one process, one model, a ZeroMQ socket (docs/protocol.md).
``--engine ray``: a Ray Serve application with one model per replica behind Serve's HTTP ingress
(docs/ray.md); the same requests and replies as JSON bodies, for ``LisaClient("http://HOST:PORT/lisa")``.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading
from typing import Any

from ..config import EngineConfig, add_engine_arguments

DEFAULT_BIND = "tcp://127.0.0.1:5557"
DEFAULT_PENDING_REPLIES_MB = 64.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--engine", default="zmq", choices=["zmq", "ray"],
                        help="zmq: one model in this process on a ZeroMQ socket; ray: a Ray Serve application, one "
                             "model per replica, HTTP ingress (pip install 'lisa-agent[ray]'; default %(default)s)")
    parser.add_argument("--bind", default=DEFAULT_BIND,
                        help="zmq: endpoint to bind (default %(default)s; tcp://127.0.0.1:* picks a free port)")
    parser.add_argument("--max-queue", type=int, default=16, metavar="N",
                        help="requests waiting for the model at most; more are answered queue_full (ray: requests one "
                             "replica holds, Serve's max_ongoing_requests; default %(default)s)")
    parser.add_argument("--max-side", type=int, default=4096, help="largest image side accepted (default %(default)s)")
    parser.add_argument("--max-frame-mb", type=float, default=64.0,
                        help="largest frame accepted, in MiB (default %(default)s)")
    parser.add_argument("--max-pending-replies-mb", type=float, default=DEFAULT_PENDING_REPLIES_MB, metavar="MB",
                        help="zmq: replies held for a client that does not read them, at most; its oldest are dropped "
                             "beyond (default %(default)s)")
    parser.add_argument("--curve-secret", default=None, metavar="FILE",
                        help="zmq: server .key_secret certificate: turn CurveZMQ encryption + authentication on")
    parser.add_argument("--curve-allow", default=None, metavar="DIR",
                        help="zmq: directory of allow-listed client .key certificates (with --curve-secret)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback bind without CurveZMQ, or (ray) a non-loopback --http-host "
                             "(trusted networks only)")
    parser.add_argument("--latest-only", action="store_true",
                        help="a client's newer frame always supersedes its queued older frames")
    parser.add_argument("--no-batch", action="store_true", help="run queued queries on one frame one by one")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                        help="debug logs one line per request (default %(default)s)")
    ray = parser.add_argument_group("Ray Serve (--engine ray; docs/ray.md)")
    ray.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas, one model each (default %(default)s)")
    ray.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                     help="let Serve scale between MIN and MAX replicas instead of --replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=2.0, metavar="R",
                     help="with --autoscale: requests per replica Serve aims for (default %(default)s)")
    ray.add_argument("--address", default=None,
                     help="Ray cluster: auto (the one running here), ray://HOST:10001 (Ray client) or HOST:PORT (GCS); "
                          "default: start a local Ray instance")
    ray.add_argument("--http-host", default="127.0.0.1",
                     help="where Serve's HTTP proxies listen (default %(default)s; others need --insecure)")
    ray.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP port (default %(default)s)")
    ray.add_argument("--num-gpus", default="auto", metavar="N",
                     help="GPUs per replica: auto (1 when the cluster has GPUs and --device is not cpu, else 0) or a "
                          "number (0.5: two replicas share a GPU; default %(default)s)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, metavar="N",
                     help="CPUs reserved per replica (default %(default)s)")
    ray.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                     help="requests Serve's dynamic batching collects for one model run at most (default %(default)s)")
    ray.add_argument("--batch-wait-ms", type=float, default=2.0, metavar="MS",
                     help="how long a batch's first request waits for company (default %(default)s)")
    ray.add_argument("--max-queued-requests", type=int, default=64, metavar="N",
                     help="requests waiting in Serve's queue for a replica with room, at most, -1 for no bound; "
                          "beyond, clients get ServerBusyError (default %(default)s)")
    ray.add_argument("--no-stream-affinity", action="store_true",
                     help="route each request to the least loaded replica instead of keeping a client's stream on "
                          "one replica")
    ray.add_argument("--detach", action="store_true",
                     help="deploy and exit, leaving the application on the cluster (with --address; remove it with "
                          "`serve shutdown` or serve.delete('lisa'))")


def run(args: argparse.Namespace) -> int:
    from ..config import engine_config_from_args
    from ..errors import InvalidArgumentError
    from ..serving import security
    from ..serving.framing import Limits
    from ..serving.server import LisaServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("lisa_agent.serving")
    config = engine_config_from_args(args)
    if getattr(args, "engine", "zmq") == "ray":
        return _run_ray(args, config, log)
    if (args.curve_secret is None) != (args.curve_allow is None):
        raise InvalidArgumentError("--curve-secret and --curve-allow go together")
    # Check what can fail fast before spending minutes loading a model.
    security.check_bind(args.bind, curve=args.curve_secret is not None, insecure=args.insecure)
    if args.curve_secret is not None:
        security.load_keypair(args.curve_secret)
        security.check_allow_dir(args.curve_allow)
    if args.max_queue < 1:
        raise InvalidArgumentError(f"--max-queue must be at least 1; got {args.max_queue}")
    if args.max_side < 8:
        raise InvalidArgumentError(f"--max-side must be at least 8; got {args.max_side}")
    for flag, value in (("--max-frame-mb", args.max_frame_mb), ("--max-pending-replies-mb", args.max_pending_replies_mb)):
        if not math.isfinite(value) or value <= 0 or value > 1024 * 1024:
            raise InvalidArgumentError(f"{flag} must be a positive number of MiB (at most 1048576); got {value}")

    from ..backend import load_model

    log.info("loading %s", config.describe())
    segmenter = load_model(config)
    limits = Limits(max_frame_bytes=int(args.max_frame_mb * 1024 * 1024), max_side=args.max_side)
    server = LisaServer(segmenter, args.bind, max_queue=args.max_queue, limits=limits,
                        curve_secret=args.curve_secret, curve_allow=args.curve_allow, insecure=args.insecure,
                        latest_only=args.latest_only, batch=not args.no_batch,
                        max_pending_reply_bytes=int(args.max_pending_replies_mb * 1024 * 1024))
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        while not stopping.wait(0.5):
            if server.wait(0):  # the server stopped by itself (socket loop failure)
                log.error("server stopped unexpectedly")
                return 1
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("stopped")
    return 0


def _check_common(args: argparse.Namespace) -> None:
    from ..errors import InvalidArgumentError

    if args.max_queue < 1:
        raise InvalidArgumentError(f"--max-queue must be at least 1; got {args.max_queue}")
    if args.max_side < 8:
        raise InvalidArgumentError(f"--max-side must be at least 8; got {args.max_side}")
    if not math.isfinite(args.max_frame_mb) or args.max_frame_mb <= 0 or args.max_frame_mb > 1024 * 1024:
        raise InvalidArgumentError(f"--max-frame-mb must be a positive number of MiB (at most 1048576); got "
                                   f"{args.max_frame_mb}")


def _ray_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Check the flags of ``--engine ray`` before anything starts: the Serve options, or a one-line error."""
    from ..errors import InvalidArgumentError
    from ..serving import security

    zmq_only = [flag for flag, given in (("--bind", args.bind != DEFAULT_BIND),
                                         ("--curve-secret", args.curve_secret is not None),
                                         ("--curve-allow", args.curve_allow is not None),
                                         ("--max-pending-replies-mb",
                                          args.max_pending_replies_mb != DEFAULT_PENDING_REPLIES_MB)) if given]
    if zmq_only:
        raise InvalidArgumentError(f"{', '.join(zmq_only)} apply to --engine zmq; the Ray engine listens on "
                                   "--http-host/--http-port (plain HTTP: put TLS and authentication in front of it)")
    _check_common(args)
    if not security.is_loopback_endpoint(f"tcp://{args.http_host}:{args.http_port}") and not args.insecure:
        raise InvalidArgumentError(f"refusing to serve on {args.http_host} without --insecure: Serve's HTTP ingress has "
                                   "no authentication, anyone on the network could use the model")
    if not 0 < args.http_port < 65536:
        raise InvalidArgumentError(f"--http-port must be in 1..65535; got {args.http_port}")
    if args.replicas < 1:
        raise InvalidArgumentError(f"--replicas must be at least 1; got {args.replicas}")
    autoscaling = None
    if args.autoscale is not None:
        try:
            low, high = (int(v) for v in args.autoscale.split(":"))
        except ValueError:
            raise InvalidArgumentError(f"--autoscale must be MIN:MAX (whole numbers); got {args.autoscale!r}") from None
        if not 0 <= low <= high or high < 1:
            raise InvalidArgumentError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1; got {args.autoscale!r}")
        if not math.isfinite(args.target_ongoing_requests) or args.target_ongoing_requests <= 0:
            raise InvalidArgumentError(f"--target-ongoing-requests must be positive; got {args.target_ongoing_requests}")
        autoscaling = {"min_replicas": low, "max_replicas": high,
                       "target_ongoing_requests": args.target_ongoing_requests}
    num_gpus: float | None = None
    if args.num_gpus != "auto":
        try:
            num_gpus = float(args.num_gpus)
        except ValueError:
            raise InvalidArgumentError(f"--num-gpus must be auto or a number; got {args.num_gpus!r}") from None
        if not math.isfinite(num_gpus) or num_gpus < 0:
            raise InvalidArgumentError(f"--num-gpus must be auto or a non-negative number; got {args.num_gpus!r}")
    if not math.isfinite(args.replica_cpus) or args.replica_cpus < 0:
        raise InvalidArgumentError(f"--replica-cpus must be a non-negative number; got {args.replica_cpus}")
    if args.detach and args.address is None:
        raise InvalidArgumentError("--detach needs --address: a Ray instance started by this command ends with it")
    return {"autoscaling": autoscaling, "num_gpus": num_gpus}


def _run_ray(args: argparse.Namespace, config: EngineConfig, log: logging.Logger) -> int:
    """``--engine ray``: join or start a cluster, deploy, wait for SIGINT / SIGTERM, remove the application."""
    from ..errors import InvalidArgumentError

    plan = _ray_plan(args)
    try:
        from ..serving import ray_app
    except ImportError as exc:
        raise InvalidArgumentError(f"--engine ray needs Ray Serve ({exc}): pip install 'lisa-agent[ray]'") from None
    from ray import serve

    from ..serving.framing import PROTOCOL_VERSION
    from ..serving.security import is_loopback_host

    # a loopback ingress answers loopback Host names only (DNS rebinding); one on a network (--insecure) any
    settings = ray_app.ReplicaSettings(
        max_queue=args.max_queue, max_side=args.max_side, max_frame_bytes=int(args.max_frame_mb * 1024 * 1024),
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, batch=not args.no_batch,
        latest_only=args.latest_only, allowed_hosts=() if is_loopback_host(args.http_host) else ("*",))
    started = ray_app.connect(args.address)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    deployed = False
    try:
        num_gpus = plan["num_gpus"]
        if num_gpus is None:
            num_gpus = 1.0 if ray_app.cluster_gpus() > 0 and config.device != "cpu" else 0.0
        app = ray_app.lisa_app(config, replicas=args.replicas, autoscaling=plan["autoscaling"], num_gpus=num_gpus,
                               num_cpus=args.replica_cpus, max_queued_requests=args.max_queued_requests,
                               settings=settings, stream_affinity=not args.no_stream_affinity)
        count = (f"{plan['autoscaling']['min_replicas']}..{plan['autoscaling']['max_replicas']}"
                 if plan["autoscaling"] else str(args.replicas))
        log.info("deploying %s on Ray Serve: %s replica(s), %g GPU(s) each", config.describe(), count, num_gpus)
        deployed = True
        url = ray_app.deploy(app, http_host=args.http_host, http_port=args.http_port)
        log.info("serving %s on %s (Ray Serve, %s replica(s), protocol %d)", config.model, url, count,
                 PROTOCOL_VERSION)
        if args.detach:
            deployed = False
            log.info("detached: application %r stays on the cluster", ray_app.APP_NAME)
            return 0
        status = None
        while not stopping.wait(2.0):
            now = serve.status().applications.get(ray_app.APP_NAME)
            current = None if now is None else str(now.status.value if hasattr(now.status, "value") else now.status)
            if current != status:
                if status is not None:
                    log.info("application %r is %s", ray_app.APP_NAME, current or "gone")
                status = current
            if current is None:
                log.error("application %r was removed from the cluster", ray_app.APP_NAME)
                deployed = False
                return 1
    finally:
        if deployed and not started:  # a Ray instance this command started ends with it, application and all
            _remove_app(serve, ray_app.APP_NAME, log)
        import ray

        ray.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("stopped")
    return 0


def _remove_app(serve: Any, name: str, log: logging.Logger, timeout: float = 60.0) -> None:
    """Delete the application from the cluster this command joined, waiting at most ``timeout`` s (a cluster
    that went away meanwhile would make Serve wait for ever)."""
    outcome: list[BaseException] = []

    def delete() -> None:
        try:
            serve.delete(name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    worker = threading.Thread(target=delete, name="serve-delete", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        log.warning("application %r was not removed within %.0f s; remove it with serve.delete(%r)", name, timeout,
                    name)
    elif outcome:
        log.warning("could not remove application %r: %s", name, outcome[0])
