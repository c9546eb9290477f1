"""Reasoning segmenters beside the LISA engine: a Qwen2.5-VL model trained with reinforcement learning
(VisionReasoner-7B, Seg-Zero-7B) writes its reasoning and a JSON list of boxes and points; SAM 2 turns each
into a mask. Behind the same :class:`~lisa_agent.backend.SegmentBackend` protocol as LISA, so every door
runs it by choosing ``--model`` (``open_backend("Ricky06662/VisionReasoner-7B")``).

- :mod:`~lisa_agent.reasoner.templates`: the public code's instruction templates, resize and coordinate mapping;
- :mod:`~lisa_agent.reasoner.parsing`: the ``<think>`` / ``<answer>`` parser (tolerant, or the public one);
- :mod:`~lisa_agent.reasoner.segmenter`: :class:`ReasonerSegmenter` (generation, SAM 2 prompting, the result);
- :mod:`~lisa_agent.reasoner.loading`: which checkpoints are reasoners, loading in bf16 / fp32 / 8-bit / 4-bit;
- :mod:`~lisa_agent.reasoner.tiny`: tiny random-weight checkpoints in the published layouts, for tests.

See ``docs/reasoner.md``. Importing this package does not import torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .segmenter import ReasonerSegmenter

__all__ = ["ReasonerSegmenter"]


def __getattr__(name: str) -> Any:
    if name == "ReasonerSegmenter":
        from .segmenter import ReasonerSegmenter

        return ReasonerSegmenter
    raise AttributeError(name)
