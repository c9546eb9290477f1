"""Measure what the MCP server adds to a ``segment_objects`` call over the engine in process.

``python -m lisa_agent.benchmarks.mcp [--model tabletop-tiny] [--calls 20]`` prints JSON: for each way of
asking, the median of ``--calls`` calls (after ``--warmup`` calls) of the whole call, of the model's own time
(``timings_ms["total"]`` of each answer) and of their difference per call, the overhead:

- ``engine``: ``LisaSegmenter.segment(frame, instruction)`` on a fresh synthetic frame each call (the baseline);
- ``mcp_inprocess``: ``segment_objects`` through ``mcp.Client(server)`` in this process (the SDK's dispatch,
  argument validation, the answer's text, overlay JPEG and result schema);
- ``mcp_stdio``: ``lisa-agent mcp`` launched as a process, over its stdin/stdout (what desktop hosts do);
- ``mcp_http``: ``lisa-agent mcp --transport http`` as a process, over streamable HTTP on loopback.

Every MCP variant reads the synthetic source at ``--fps`` frames per second (default 10) and waits a frame
period between calls (outside the timed part), so every call gets a frame the model has not seen (no cached
image features), as the engine's baseline does. ``vs_engine_ms`` is each way's overhead minus the engine's own
(its call minus its model time): what MCP adds per call, independent of the model's speed. Numbers are for the
machine that ran them: report them with the command and the machine, never assert them in tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["QUERY", "main", "measure", "measure_engine", "measure_http", "measure_inprocess", "measure_stdio"]

QUERY = "grab something to cut with"


def _summary(calls: list[tuple[float, float]]) -> dict[str, float]:
    """Medians (ms) of (call, model) pairs and of their per-call difference."""
    return {"n": len(calls), "call_ms": round(statistics.median(c for c, _ in calls), 2),
            "model_ms": round(statistics.median(m for _, m in calls), 2),
            "overhead_ms": round(statistics.median(c - m for c, m in calls), 2)}


def _load() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (other work skews every number here), where known."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def measure_engine(engine: Any, *, calls: int, warmup: int, fps: float) -> dict[str, float]:
    """The baseline: the engine in process on a fresh frame of the synthetic scene each call."""
    from ..console.sources import SyntheticSource

    source = SyntheticSource(fps=fps)
    out = []
    for k in range(warmup + calls):
        frame = source.render(k)
        t0 = time.perf_counter()
        result = engine.segment(frame, QUERY)
        elapsed = (time.perf_counter() - t0) * 1000.0
        if k >= warmup:
            out.append((elapsed, float(result.timings_ms["total"])))
    return _summary(out)


async def _through(client: Any, *, calls: int, warmup: int, fps: float) -> dict[str, float]:
    out = []
    for k in range(warmup + calls):
        await asyncio.sleep(1.2 / fps)  # a new frame has arrived: no cached image features (not timed)
        t0 = time.perf_counter()
        result = await client.call_tool("segment_objects", {"instruction": QUERY})
        elapsed = (time.perf_counter() - t0) * 1000.0
        if result.is_error:
            raise RuntimeError(f"segment_objects failed: {result.content[0].text}")
        if k >= warmup:
            out.append((elapsed, float(result.structured_content["timings_ms"]["total"])))
    return _summary(out)


def measure_inprocess(engine: Any, *, calls: int, warmup: int, fps: float) -> dict[str, float]:
    """``segment_objects`` through ``mcp.Client(server)`` in this process, over the same engine."""
    from mcp import Client

    from ..console.sources import SyntheticSource
    from ..integrations.mcp import build_server
    from ..integrations.tool_session import ToolSession

    session = ToolSession(engine, SyntheticSource(fps=fps)).start()
    session.latest(30.0)

    async def run() -> dict[str, float]:
        async with Client(build_server(session)) as client:
            return await _through(client, calls=calls, warmup=warmup, fps=fps)

    try:
        return asyncio.run(run())
    finally:
        session.close()


def _command(model: str, device: str, fps: float, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lisa_agent.cli", "mcp", "--source", "synthetic", "--fps", f"{fps:g}",
            "--model", model, "--device", device, *extra]


def measure_stdio(model: str, device: str, *, calls: int, warmup: int, fps: float) -> dict[str, float]:
    """``lisa-agent mcp`` as a process, through the SDK's stdio client."""
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    command = _command(model, device, fps)
    params = StdioServerParameters(command=command[0], args=command[1:], env=dict(os.environ))

    async def run() -> dict[str, float]:
        with open(os.devnull, "w") as quiet:
            async with Client(stdio_client(params, errlog=quiet)) as client:
                return await _through(client, calls=calls, warmup=warmup, fps=fps)

    return asyncio.run(run())


def measure_http(model: str, device: str, *, calls: int, warmup: int, fps: float) -> dict[str, float]:
    """``lisa-agent mcp --transport http --port 0`` as a process, through the SDK's streamable-HTTP client."""
    from mcp import Client

    proc = subprocess.Popen(_command(model, device, fps, "--transport", "http", "--port", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:  # until the server says where it listens (or the process ends)
            if line.startswith("MCP endpoint "):
                url = line.split()[2]
                break
        if url is None:
            raise RuntimeError(f"lisa-agent mcp --transport http ended with {proc.wait()} before listening")

        async def run() -> dict[str, float]:
            async with Client(url) as client:
                return await _through(client, calls=calls, warmup=warmup, fps=fps)

        return asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(60)


def measure(model: str = "tabletop-tiny", device: str = "cpu", *, calls: int = 20, warmup: int = 3,
            fps: float = 10.0, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """All four measurements (or ``only`` those named), and the overhead of each MCP way over the engine's."""
    from ..engine.segmenter import LisaSegmenter

    engine: Any = None  # loaded here only for the ways that run in this process (the others load their own)
    if not only or {"engine", "mcp_inprocess"} & set(only):
        engine = LisaSegmenter.from_pretrained(model, device=device)  # the command's defaults, as processes load it
    ways: dict[str, Callable[[], dict[str, float]]] = {
        "engine": lambda: measure_engine(engine, calls=calls, warmup=warmup, fps=fps),
        "mcp_inprocess": lambda: measure_inprocess(engine, calls=calls, warmup=warmup, fps=fps),
        "mcp_stdio": lambda: measure_stdio(model, device, calls=calls, warmup=warmup, fps=fps),
        "mcp_http": lambda: measure_http(model, device, calls=calls, warmup=warmup, fps=fps),
    }
    report: dict[str, Any] = {"model": model, "device": device, "calls": calls, "warmup": warmup, "fps": fps,
                              "query": QUERY, "cpus": os.cpu_count(), "load_before": _load()}
    for name, way in ways.items():
        if not only or name in only:
            report[name] = way()
    report["load_after"] = _load()
    if "engine" in report:
        base = report["engine"]["overhead_ms"]
        report["vs_engine_ms"] = {k: round(report[k]["overhead_ms"] - base, 2) for k in ways
                                  if k != "engine" and k in report}
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m lisa_agent.benchmarks.mcp``: print the measurements as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tabletop-tiny", help="model to load (default tabletop-tiny)")
    parser.add_argument("--device", default="cpu", help="device (default cpu)")
    parser.add_argument("--calls", type=int, default=20, help="calls per median (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="calls before measuring (default 3)")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of the synthetic source (default 10)")
    parser.add_argument("--only", default="", help="comma-separated subset: engine,mcp_inprocess,mcp_stdio,mcp_http")
    args = parser.parse_args(argv)
    only = tuple(v.strip() for v in args.only.split(",") if v.strip())
    print(json.dumps(measure(args.model, args.device, calls=args.calls, warmup=args.warmup, fps=args.fps,
                             only=only), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

