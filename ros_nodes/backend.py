"""The model behind the node: an in-process ``LisaSegmenter`` or a ``LisaClient`` to a model server.

Both are a :class:`lisa_agent.frames.SegmentBackend`. Loading is explicit (:func:`load_backend`) and
slow (seconds to minutes): never call it in a callback. Nothing here imports torch; the engine picks
the device (``device: auto``).
"""

from __future__ import annotations

from lisa_agent.config import EngineConfig
from lisa_agent.frames import SegmentBackend


def load_backend(config: EngineConfig, *, server: str = "", server_timeout: float = 10.0) -> SegmentBackend:
    """Connect to ``server`` when given (the server's own engine options apply there), else load the
    engine of ``config``; raises :class:`lisa_agent.errors.LisaError` naming what is wrong."""
    if server:
        from lisa_agent.serving.client import LisaClient

        return LisaClient(server, timeout=server_timeout)
    from lisa_agent.engine.segmenter import LisaSegmenter

    return LisaSegmenter.from_config(config)
