"""lisa-agent: LISA reasoning segmentation for robots and LLM agents.

Public entry points (imported lazily, so ``import lisa_agent`` loads no model and no torch)::

    from lisa_agent import LisaSegmenter, LisaClient, SegmentationResult, QueryOptions, open_backend

``open_backend(model)`` loads LISA, or a reasoner (:class:`ReasonerSegmenter`: VisionReasoner / Seg-Zero with
SAM 2, docs/reasoner.md) when the checkpoint's config.json says ``model_type: qwen2_5_vl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_LAZY = {
    "LisaSegmenter": ("lisa_agent.engine.segmenter", "LisaSegmenter"),
    "Conversation": ("lisa_agent.engine.segmenter", "Conversation"),
    "SegmentationResult": ("lisa_agent.result", "SegmentationResult"),
    "MaskInstance": ("lisa_agent.result", "MaskInstance"),
    "LisaClient": ("lisa_agent.serving.client", "LisaClient"),
    "AsyncLisaClient": ("lisa_agent.serving.client", "AsyncLisaClient"),
    "Frame": ("lisa_agent.frames", "Frame"),
    "EngineConfig": ("lisa_agent.config", "EngineConfig"),
    "QueryOptions": ("lisa_agent.options", "QueryOptions"),
    "TrackOptions": ("lisa_agent.options", "TrackOptions"),
    "SegmentBackend": ("lisa_agent.backend", "SegmentBackend"),
    "open_backend": ("lisa_agent.backend", "open_backend"),
    "LisaError": ("lisa_agent.errors", "LisaError"),
    "StreamSegmenter": ("lisa_agent.tracking", "StreamSegmenter"),
    "ReasonerSegmenter": ("lisa_agent.reasoner.segmenter", "ReasonerSegmenter"),
}

if TYPE_CHECKING:  # pragma: no cover
    from .backend import SegmentBackend, open_backend
    from .config import EngineConfig
    from .engine.segmenter import Conversation, LisaSegmenter
    from .errors import LisaError
    from .frames import Frame
    from .options import QueryOptions, TrackOptions
    from .reasoner.segmenter import ReasonerSegmenter
    from .result import MaskInstance, SegmentationResult
    from .serving.client import AsyncLisaClient, LisaClient
    from .tracking import StreamSegmenter

__all__ = ["AsyncLisaClient", "Conversation", "EngineConfig", "Frame", "LisaClient", "LisaError", "LisaSegmenter",
           "MaskInstance", "QueryOptions", "ReasonerSegmenter", "SegmentBackend", "SegmentationResult", "StreamSegmenter", "TrackOptions",
           "open_backend"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lisa_agent' has no attribute {name!r}")
