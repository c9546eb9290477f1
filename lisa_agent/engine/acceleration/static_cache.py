"""Fixed shapes and a static KV cache for greedy decoding.

- **Buckets**: sequence lengths are rounded up to multiples of :data:`BUCKET` (right padding: causal
  attention never lets a real position see a later pad), so every stage runs with one of a few shapes.
- **Static KV cache** (:class:`StaticDecoder`): greedy decoding writes into a KV cache allocated once per
  bucketed length. With CUDA graphs or bucket padding it is ``transformers.StaticCache``, whose write
  position lives in a device tensor (a captured decode step advances it on every replay); with bucket
  padding the prompt is prefilled padded to its bucket and the write position then set back to the real
  length, so decoding overwrites the pads. Without either (the CPU's default) it is
  :func:`preallocated_cache`, whose write position is a Python int. Outputs equal the dynamic cache's
  (tested on the CPU, padded and not). On CUDA the decode step of each cache length is captured in a graph
  (:class:`~lisa_agent.engine.acceleration.graphs.GraphCapturer`); at most :data:`MAX_DECODE_GRAPHS` caches,
  each with its decode graph, are kept, the least recently used evicted first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..generation import decoder_pass, greedy_loop
from ..lru import LRU
from .graphs import GraphCapturer, Graphed

#: Sequence lengths are padded up to a multiple of this.
BUCKET = 64
#: Decode-step graphs (each with its static KV cache: one per cache length) an engine keeps.
MAX_DECODE_GRAPHS = 4


def bucket(n: int, step: int = BUCKET) -> int:
    """``n`` rounded up to a multiple of ``step`` (at least ``step``)."""
    return max(step, -(-int(n) // step) * step)


def pad_length(x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """``x`` right-padded with zeros along ``dim`` to ``length`` (itself when already that long)."""
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def preallocated_cache(config: Any, max_cache_len: int) -> Any:
    """A ``transformers`` cache whose keys and values live in buffers of ``max_cache_len`` positions
    allocated once: each step writes its position in place (no growing copy per token, as the dynamic
    cache's concatenation makes) and attention sees only the filled prefix (no padded mask, as
    ``StaticCache`` needs). Shapes still vary per step, so it is the static cache for eager devices (the CPU);
    CUDA graphs use ``StaticCache``."""
    layers: list[Any] = [_PreallocatedLayer(max_cache_len) for _ in range(config.num_hidden_layers)]
    return Cache(layers=layers)


class _PreallocatedLayer(DynamicLayer):
    """One layer of :func:`preallocated_cache`: buffers (batch, heads, max_cache_len, head_dim)."""

    def __init__(self, max_cache_len: int) -> None:
        super().__init__()
        self.max_cache_len = max_cache_len
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads = key_states.shape[:2]
        self._keys = key_states.new_empty(batch, heads, self.max_cache_len, key_states.shape[-1])
        self._values = value_states.new_empty(batch, heads, self.max_cache_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self._keys is None or self._keys.shape[:2] != key_states.shape[:2]:
            self.lazy_initialization(key_states, value_states)
        assert self._keys is not None and self._values is not None
        end = self.length + key_states.shape[-2]
        if end > self.max_cache_len:
            raise ValueError(f"the cache holds {self.max_cache_len} positions; {end} asked for")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self.keys = self._keys[:, :, :end]
        self.values = self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Forget the positions; the buffers stay allocated."""
        self.length = 0
        self.keys = self.values = None


@dataclass
class _CacheEntry:
    """A static KV cache of one length and the decode-step graph captured on it (its buffers' addresses are
    in the graph: the two live and go together)."""

    cache: Any
    step: Graphed | None = None
    tried: bool = False


class StaticDecoder:
    """Greedy decoding into a static, bucketed KV cache (CUDA graphs for the decode step on CUDA).

    One per engine; a cache and its decode graph are kept per cache length, at most ``max_entries`` of
    them (least recently used evicted). ``graphs`` needs a ``capturer`` (the engine's :class:`GraphCapturer`).
    """

    def __init__(self, llm: Any, *, graphs: bool, pad: bool | None = None, capturer: GraphCapturer | None = None,
                 max_entries: int = MAX_DECODE_GRAPHS) -> None:
        self.llm = llm
        self.graphs = bool(graphs)
        #: prefill padded to its bucket (fixed shapes, needed by graphs; on the CPU the pads only cost time)
        self.pad = self.graphs if pad is None else bool(pad)
        self.capturer = capturer
        self._entries: LRU[int, _CacheEntry] = LRU(max_entries)

    @property
    def device_positions(self) -> bool:
        """Whether the caches keep their write position in a device tensor (``StaticCache``): what a captured
        decode step needs, since a replay runs no Python; and what the padded prefill's rewind needs."""
        return self.graphs or self.pad

    def _entry(self, length: int) -> _CacheEntry:
        """The cache of ``length`` positions (and its decode graph): ``StaticCache`` or preallocated."""
        entry = self._entries.get(length)
        if entry is None:
            if self.device_positions:
                from transformers import StaticCache

                cache = StaticCache(config=self.llm.config, max_cache_len=length)
            else:
                cache = preallocated_cache(self.llm.config, length)
            entry = _CacheEntry(cache)
            self._entries.put(length, entry)
        return entry

    def memory(self) -> dict[str, float]:
        """What this decoder holds: static caches, decode-step graphs, and the caches' megabytes."""
        storages: dict[int, int] = {}
        for entry in self._entries.values():
            for layer in entry.cache.layers:
                for value in vars(layer).values():
                    if isinstance(value, torch.Tensor) and value.numel():
                        storage = value.untyped_storage()
                        storages[storage.data_ptr()] = storage.nbytes()
        return {"static_caches": len(self._entries),
                "decode_graphs": sum(e.step is not None for e in self._entries.values()),
                "static_cache_mb": round(sum(storages.values()) / 2**20, 1)}

    @staticmethod
    def _set_length(cache: Any, length: int) -> None:
        """Make the cache's next write land at position ``length`` (after a padded prefill)."""
        for layer in cache.layers:
            layer.cumulative_length.fill_(length)

    def _eager_step(self, cache: Any, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(token)
        return decoder_pass(self.llm.model, embeds, cache, position)[:, -1]

    def _step(self, length: int, entry: _CacheEntry, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        capturer = self.capturer
        if not (self.graphs and token.is_cuda and capturer is not None and capturer.failed is None):
            return self._eager_step(entry.cache, token, position)
        if not entry.tried:
            # warm-up and capture write into the cache; generation restarts from the prompt afterwards
            entry.tried = True
            entry.step = capturer.capture(f"decode step ({length} positions)",
                                          lambda t, p: self._eager_step(entry.cache, t, p), token, position)
            raise _Recapture
        if entry.step is None:
            return self._eager_step(entry.cache, token, position)
        return entry.step(token, position).clone()  # the graph's output buffer is overwritten by the next replay

    def generate(self, embeds: torch.Tensor, max_new_tokens: int, *, eos: int | None, seg: int, max_segs: int,
                 banned: int | None = None) -> tuple[list[int], torch.Tensor]:
        """Greedy generation after ``embeds`` (1, T, H), the same contract as
        :func:`lisa_agent.engine.generation.greedy_cached` (ids without EOS, ``[SEG]`` states)."""
        for _ in range(2):  # a first call per cache length captures its decode step, then runs again
            try:
                return self._generate(embeds, max_new_tokens, eos=eos, seg=seg, max_segs=max_segs, banned=banned)
            except _Recapture:
                continue
        return self._generate(embeds, max_new_tokens, eos=eos, seg=seg, max_segs=max_segs, banned=banned)

    def _generate(self, embeds: torch.Tensor, max_new_tokens: int, *, eos: int | None, seg: int, max_segs: int,
                  banned: int | None) -> tuple[list[int], torch.Tensor]:
        llm = self.llm
        device = embeds.device
        if self.capturer is not None and self.capturer.failed is not None:
            for held in self._entries.values():  # an engine whose capture failed replays nothing
                held.step = None
        n = embeds.shape[1]
        length = bucket(n + max_new_tokens)
        entry = self._entry(length)
        entry.cache.reset()
        prefill = min(bucket(n), length) if self.pad else n
        last = decoder_pass(llm.model, pad_length(embeds, prefill), entry.cache,
                            torch.arange(prefill, device=device)[None])[:, n - 1]
        if prefill != n:
            self._set_length(entry.cache, n)
        token_buf = torch.zeros(1, 1, dtype=torch.long, device=device)
        position_buf = torch.zeros(1, 1, dtype=torch.long, device=device)

        def step(token: int, i: int) -> torch.Tensor:  # fixed input buffers: what a captured graph reads
            token_buf.fill_(token)
            position_buf.fill_(n + i)
            return self._step(length, entry, token_buf, position_buf)

        return greedy_loop(llm, last, step, max_new_tokens, eos=eos, seg=seg, max_segs=max_segs, banned=banned)


class _Recapture(Exception):
    """A decode step was just captured (which wrote into the cache): generation restarts from the prompt."""

