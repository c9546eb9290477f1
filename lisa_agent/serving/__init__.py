"""Model server and client: one process (or one Ray Serve replica per GPU) holds the model, every other
process is a client; ZeroMQ (``tcp://``) or Serve's HTTP ingress (``http://``), one protocol.

- The protocol (``docs/protocol.md``): :mod:`~lisa_agent.serving.framing` (versions, limits, the header and
  reply frames), :mod:`~lisa_agent.serving.protocol` (a request's validation; the public names of both),
  :mod:`~lisa_agent.serving.codecs` (image, depth and logits frames). Error codes: :mod:`lisa_agent.errors`.
- The ZeroMQ server: :mod:`~lisa_agent.serving.server` (:class:`~lisa_agent.serving.server.LisaServer`: the
  ROUTER socket loop and one model worker thread), :mod:`~lisa_agent.serving.request_queue` (its bounded
  queue), :mod:`~lisa_agent.serving.outbox` (replies held for peers that do not read them).
- What both servers share: :mod:`~lisa_agent.serving.execution` (admitting a request, running it on the
  model, tracking sessions, the ``info`` reply).
- The Ray Serve deployment (``docs/ray.md``): :mod:`~lisa_agent.serving.ray_app` (the application, deploying
  it), :mod:`~lisa_agent.serving.ray_replica` (a replica's HTTP ingress), :mod:`~lisa_agent.serving.ray_worker`
  (its model thread); :mod:`~lisa_agent.serving.http_transport` (the protocol's HTTP form).
- The clients: :mod:`~lisa_agent.serving.client` (:class:`~lisa_agent.serving.client.LisaClient` and its
  asyncio twin), over :mod:`~lisa_agent.serving.zmq_transport` (Lazy Pirate: timeouts, retries, socket reset)
  or :mod:`~lisa_agent.serving.http_transport`.
- :mod:`~lisa_agent.serving.security`: CurveZMQ certificates, the loopback-bind rule and the HTTP doors'
  guard; :mod:`~lisa_agent.serving.gate`: the gate in front of a WebSocket server.

Nothing here imports zmq or torch at package import time.
"""

from __future__ import annotations

from ..errors import RemoteError, ServerUnavailableError
from .framing import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "RemoteError", "ServerUnavailableError"]
