"""Measurements, reported as medians and ratios from one run (never as timed assertions in tests).

- :mod:`lisa_agent.benchmarks.engine`: per-stage timings of the engine's modes (``lisa-agent bench``).
- :mod:`lisa_agent.benchmarks.server`: what the model server and client add over the in-process engine,
  and throughput under concurrent clients (``python -m lisa_agent.benchmarks.server``).
- :mod:`lisa_agent.benchmarks.mcp`: what the MCP server adds to a ``segment_objects`` call (in process, stdio,
  streamable HTTP) over the engine in process (``python -m lisa_agent.benchmarks.mcp``).
"""
