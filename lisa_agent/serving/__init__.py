"""Model server and client over ZeroMQ: one process holds the model, every other process is a client.

- :mod:`lisa_agent.serving.protocol`: the wire format (``docs/protocol.md``), validation and error codes.
- :mod:`lisa_agent.serving.server`: :class:`~lisa_agent.serving.server.LisaServer` (ROUTER socket loop
  plus one model worker thread and a bounded queue).
- :mod:`lisa_agent.serving.client`: :class:`~lisa_agent.serving.client.LisaClient` and its asyncio twin
  (Lazy Pirate: timeouts, retries, socket reset).
- :mod:`lisa_agent.serving.security`: CurveZMQ certificates and the loopback-bind rule.

Nothing here imports zmq or torch at package import time.
"""

from __future__ import annotations

from .protocol import PROTOCOL_VERSION, RemoteError, ServerUnavailableError

__all__ = ["PROTOCOL_VERSION", "RemoteError", "ServerUnavailableError"]
