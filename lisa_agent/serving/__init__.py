"""Model server and client: one process (or one Ray Serve replica per GPU) holds the model, every other
process is a client; ZeroMQ (``tcp://``) or Serve's HTTP ingress (``http://``), one protocol.

- :mod:`lisa_agent.serving.protocol`: the wire format (``docs/protocol.md``) and its validation;
  :mod:`lisa_agent.serving.codecs`: its image, depth and logits frames. Error codes: :mod:`lisa_agent.errors`.
- :mod:`lisa_agent.serving.server`: :class:`~lisa_agent.serving.server.LisaServer` (ROUTER socket loop
  plus one model worker thread and a bounded queue).
- :mod:`lisa_agent.serving.client`: :class:`~lisa_agent.serving.client.LisaClient` and its asyncio twin
  (Lazy Pirate: timeouts, retries, socket reset).
- :mod:`lisa_agent.serving.security`: CurveZMQ certificates and the loopback-bind rule.
- :mod:`lisa_agent.serving.ray_app` / :mod:`lisa_agent.serving.http_transport`: the Ray Serve deployment
  and the protocol's HTTP form (``docs/ray.md``).

Nothing here imports zmq or torch at package import time.
"""

from __future__ import annotations

from ..errors import RemoteError, ServerUnavailableError
from .protocol import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "RemoteError", "ServerUnavailableError"]
