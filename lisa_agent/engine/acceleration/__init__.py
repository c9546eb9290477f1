"""Fixed shapes, a static KV cache and CUDA graphs for the engine's hot path.

- **Buckets and the static KV cache** (:class:`StaticDecoder`): sequence lengths rounded up to multiples of
  :data:`BUCKET`, greedy decoding into a KV cache allocated once per bucketed length; outputs equal the
  dynamic cache's. The details (which cache class when, the write position) are in
  :mod:`~lisa_agent.engine.acceleration.static_cache`.
- **CUDA graphs** (CUDA only; :class:`GraphCapturer`, one per engine): the decode step of each cache length,
  the forced ``fast`` pass of each (batch, bucket) shape, CLIP, SAM's image encoder and its mask decoder
  (per mask count) are captured at first use on the engine's device, into one memory pool per replay
  stream, and replayed. At most :data:`MAX_DECODE_GRAPHS` decode steps (each with its static cache) and
  :data:`MAX_STAGE_GRAPHS` other graphs are kept, the least recently used evicted first. A capture that
  fails puts the thread's stream and the allocator back and turns that engine's graphs off (logged, never
  an error); other engines keep theirs. Stages known to synchronise with the host (bitsandbytes 8-bit
  matmuls) are never captured.
- **torch.compile** (opt-in, any device; :class:`CompiledEncoders`): SAM's and CLIP's image encoders
  compiled with inductor, once per input shape at first use (minutes for SAM ViT-H). A compilation that
  fails is logged once and that encoder stays eager. Compiled encoders replace their CUDA graphs.

Nothing here changes numbers beyond float rounding: it changes shapes, memory addresses and launches.

The pieces: :mod:`~lisa_agent.engine.acceleration.static_cache` (buckets, the static KV cache and its
decoder), :mod:`~lisa_agent.engine.acceleration.graphs` (capturing and replaying CUDA graphs),
:mod:`~lisa_agent.engine.acceleration.compiled` (``torch.compile``); the bounded maps that hold graphs and caches
are :class:`lisa_agent.engine.lru.LRU`. Every public name is importable from this package.
"""

from __future__ import annotations

from ..lru import LRU
from .compiled import CompiledEncoders
from .graphs import MAX_STAGE_GRAPHS, GraphCapturer, Graphed, GraphedStages
from .static_cache import BUCKET, MAX_DECODE_GRAPHS, StaticDecoder, bucket, pad_length, preallocated_cache

__all__ = [
    "BUCKET",
    "LRU",
    "MAX_DECODE_GRAPHS",
    "MAX_STAGE_GRAPHS",
    "CompiledEncoders",
    "GraphCapturer",
    "Graphed",
    "GraphedStages",
    "StaticDecoder",
    "bucket",
    "pad_length",
    "preallocated_cache",
]
