"""Measure what the server + client add over the in-process engine, and throughput under load.

``python -m lisa_agent.benchmarks.server [--model M]`` prints both; :func:`measure_overhead` and
:func:`measure_load` each start a
:class:`~lisa_agent.serving.server.LisaServer` on a free 127.0.0.1 port and stop it afterwards (or
measure a running server given its ``endpoint``). ``--ray-replicas 1,2`` adds the same measurements
through a Ray Serve deployment on a local Ray instance (:func:`measure_ray`), once per replica count.
:class:`EchoBackend` is a model-free backend (one box mask, fixed answer) that isolates the
transport cost; tests also use it where the model's speed would only slow them down.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import numpy as np

from ..frames import Frame, as_frame, check_query
from ..options import QueryOptions
from ..result import SegmentationResult
from .process import rss_mb


class EchoBackend:
    """A backend without a model: answers ``"Sure, [SEG]."`` with one mask, the centre quarter box.

    Args:
        delay_s: seconds each ``segment`` call sleeps (a stand-in for model time).
        gate: if given, each call waits for this event first (tests use it to hold the worker).
    """

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.calls: list[tuple[str, str | None]] = []  # (query, frame_id) per segment call
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"model": "echo", "dtype": "none", "device": "cpu", "quantization": None}

    def segment(self, image: Frame | np.ndarray, query: str, options: QueryOptions | None = None, *,
                frame_id: str | None = None, mode: str | None = None, max_new_tokens: int | None = None,
                answer: str | None = None, return_logits: bool | None = None) -> SegmentationResult:
        opts = QueryOptions.of(options, mode=mode, max_new_tokens=max_new_tokens, answer=answer,
                               return_logits=return_logits)
        frame = as_frame(image, frame_id)
        query = check_query(query)
        if self.gate is not None:
            self.gate.wait(30.0)
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.calls.append((query, frame.frame_id))
        h, w = frame.size
        mask = np.zeros((1, h, w), dtype=bool)
        mask[0, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
        return SegmentationResult.from_frame(frame, mask, [0.9], text="Sure, [SEG].", query=query, mode=opts.mode,
                                             timings_ms={"total": 0.0})


def synthetic_frame(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A smooth synthetic HxWx3 uint8 RGB frame (compresses like a camera image, unlike noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx / width * 255, yy / height * 255, (xx + yy) / (width + height) * 255], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 90)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    return img.clip(0, 255).astype(np.uint8)


def _median_ms(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_overhead(backend: Any, *, n: int = 30, height: int = 480, width: int = 640,
                     query: str = "the red object", encodings: tuple[str, ...] = ("raw", "jpeg"),
                     endpoint: str | None = None) -> dict[str, Any]:
    """Median milliseconds of ``backend.segment`` in-process vs through server + client, per encoding.

    Features are cached on both sides (same ``frame_id`` every call), so the difference is the
    transport: encoding, two socket hops, decoding, queueing and the result's RLE round trip. For
    JPEG the in-process baseline runs on the decoded JPEG frame. ``server_engine_ms`` is the median of
    the engine time the server itself reports (``timings_ms.total``), and ``transport_ms`` what the
    round trip adds to it: the overhead when the serving process runs the engine at another speed
    than this one (a Ray replica has its own CPU threads). ``endpoint``: measure that running server
    (``tcp://`` or ``http://``) instead of starting a :class:`~lisa_agent.serving.server.LisaServer`.
    """
    import contextlib

    from ..serving.client import LisaClient
    from ..serving.codecs import decode_image, encode_image
    from ..serving.server import LisaServer

    frame = synthetic_frame(height, width)
    out: dict[str, Any] = {"frame": [height, width], "n": n}
    with contextlib.ExitStack() as stack:
        if endpoint is None:
            endpoint = stack.enter_context(LisaServer(backend, "tcp://127.0.0.1:*", max_queue=4)).endpoint
        client = stack.enter_context(LisaClient(endpoint, timeout=60.0, retries=0))
        for enc in encodings:
            spec, data = encode_image(frame, enc)
            image = decode_image(spec, data)
            fid = f"bench-{enc}"
            backend.segment(image, query, frame_id=fid)  # warm the feature cache
            client.segment(frame, query, frame_id=fid, encoding=enc)
            local = _median_ms(lambda image=image, fid=fid: backend.segment(image, query, frame_id=fid), n)
            engine_totals: list[float] = []

            def served(enc: str = enc, fid: str = fid, totals: list[float] = engine_totals) -> None:
                totals.append(float(client.segment(frame, query, frame_id=fid, encoding=enc).timings_ms["total"]))

            remote = _median_ms(served, n)
            server_engine = statistics.median(engine_totals)
            out[enc] = {"engine_ms": round(local, 3), "served_ms": round(remote, 3),
                        "overhead_ms": round(remote - local, 3), "server_engine_ms": round(server_engine, 3),
                        "transport_ms": round(remote - server_engine, 3), "frame_bytes": len(data)}
    return out


def measure_load(backend: Any, *, clients: int = 8, requests: int = 25, height: int = 480, width: int = 640,
                 encoding: str = "raw", query: str = "the red object", endpoint: str | None = None) -> dict[str, Any]:
    """Requests/s with ``clients`` threads each sending ``requests`` segment requests (one frame each
    thread, so features are shared within a thread's stream). Every request must be answered exactly once
    (the request ids are checked); reports latency percentiles and the process's RSS before and after
    (the server runs in this process). ``endpoint``: load that running server instead (``backend`` unused;
    ``server_replies`` is then None)."""
    import contextlib

    from ..serving.client import LisaClient
    from ..serving.server import LisaServer

    answered = [0] * clients
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(k: int, endpoint: str) -> None:
        frame = synthetic_frame(height, width, seed=k)
        try:
            with LisaClient(endpoint, timeout=120.0, retries=0) as client:
                for _ in range(requests):
                    t0 = time.perf_counter()
                    client.segment(frame, query, frame_id=f"load-{k}", encoding=encoding)
                    with lock:
                        latencies.append((time.perf_counter() - t0) * 1e3)
                    answered[k] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    rss_before = rss_mb()
    with contextlib.ExitStack() as stack:
        server = None
        if endpoint is None:
            server = stack.enter_context(LisaServer(backend, "tcp://127.0.0.1:*", max_queue=max(clients * 2, 16)))
            endpoint = server.endpoint
        threads = [threading.Thread(target=run, args=(k, endpoint)) for k in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        replies = server.health()["replies"] if server is not None else None
    total = sum(answered)
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) if ordered else float("nan")

    return {"clients": clients, "requests": clients * requests, "answered": total, "errors": [repr(e) for e in errors],
            "server_replies": replies, "seconds": round(elapsed, 3), "requests_per_s": round(total / elapsed, 2),
            "latency_ms_p50": pct(0.5), "latency_ms_p95": pct(0.95),
            "rss_mb_before": round(rss_before, 1), "rss_mb_after": round(rss_mb(), 1)}


def measure_ray(backend: Any, config: Any = None, *, replicas: tuple[int, ...] = (1, 2), n: int = 30,
                clients: int = 8, requests: int = 25, replica_cpus: float = 1.0,
                backend_factory: Any = None) -> dict[str, Any]:
    """:func:`measure_overhead` and :func:`measure_load` (raw frames) through a Ray Serve deployment of
    ``config`` (each replica's engine) or ``backend_factory``, once per replica count, on a local Ray
    instance started here with this machine's CPUs and shut down afterwards. ``backend`` is the
    in-process baseline of the overhead. Each replica reserves ``replica_cpus`` CPUs (its torch threads)."""
    import contextlib
    import os
    import sys

    import ray
    from ray import serve

    from ..serving import ray_app

    out: dict[str, Any] = {"replica_cpus": replica_cpus, "cpus": os.cpu_count()}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = _free_port()  # Serve keeps the HTTP port of its first start
    try:
        for count in replicas:
            app = ray_app.lisa_app(config, replicas=count, num_cpus=replica_cpus, backend_factory=backend_factory,
                                   settings=ray_app.ReplicaSettings(max_queue=max(clients * 2, 16)))
            url = ray_app.deploy(app, http_port=port, name=f"bench{count}", route_prefix=f"/bench{count}")
            try:
                out[str(count)] = {"endpoint": url,
                                   "overhead": measure_overhead(backend, n=n, encodings=("raw", "jpeg"), endpoint=url),
                                   "load_raw": measure_load(backend, clients=clients, requests=requests, endpoint=url)}
            finally:
                serve.delete(f"bench{count}")
    finally:
        with contextlib.redirect_stdout(sys.stderr):  # Ray's shutdown chatter: keep stdout for the report
            serve.shutdown()
            ray.shutdown()
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """``python -m lisa_agent.benchmarks.server [--model M] [--device D] ...``: print both measurements as JSON."""
    import argparse
    import json

    from ..backend import SegmentBackend
    from ..config import add_engine_arguments, engine_config_from_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--echo", action="store_true", help="serve the model-free EchoBackend (transport cost only)")
    parser.add_argument("--n", type=int, default=30, help="requests per median")
    parser.add_argument("--ray-replicas", default="", metavar="N[,M...]",
                        help="also measure a Ray Serve deployment with these replica counts, e.g. 1,2 (needs "
                             "lisa-agent[ray]; a local Ray instance is started and stopped)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per Ray replica (default %(default)s)")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    try:
        counts = tuple(int(v) for v in args.ray_replicas.split(",") if v.strip())
    except ValueError:
        parser.error(f"--ray-replicas takes replica counts like 1,2; got {args.ray_replicas!r}")
    backend: SegmentBackend
    config = engine_config_from_args(args)
    if args.echo:
        backend = EchoBackend()
    else:
        from ..engine.segmenter import LisaSegmenter

        backend = LisaSegmenter.from_config(config)
    report: dict[str, Any] = {"overhead": measure_overhead(backend, n=args.n), "load_raw": measure_load(backend),
                              "load_jpeg": measure_load(backend, encoding="jpeg")}
    if counts:
        report["ray"] = measure_ray(backend, config, replicas=counts, n=args.n, replica_cpus=args.replica_cpus,
                                    backend_factory=EchoBackend if args.echo else None)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
