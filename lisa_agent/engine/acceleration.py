"""Fixed shapes, a static KV cache and CUDA graphs for the engine's hot path.

- **Buckets**: sequence lengths are rounded up to multiples of :data:`BUCKET` (right padding: causal
  attention never lets a real position see a later pad), so every stage runs with one of a few shapes.
- **Static KV cache** (:class:`StaticDecoder`): greedy decoding writes into a KV cache allocated once per
  bucketed length. With CUDA graphs or bucket padding it is ``transformers.StaticCache``, whose write
  position lives in a device tensor (a captured decode step advances it on every replay); with bucket
  padding the prompt is prefilled padded to its bucket and the write position then set back to the real
  length, so decoding overwrites the pads. Without either (the CPU's default) it is
  :func:`preallocated_cache`, whose write position is a Python int. Outputs equal the dynamic cache's
  (tested on the CPU, padded and not).
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
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .generation import decoder_pass, greedy_loop

log = logging.getLogger(__name__)

#: Sequence lengths are padded up to a multiple of this.
BUCKET = 64
#: Decode-step graphs (each with its static KV cache: one per cache length) an engine keeps.
MAX_DECODE_GRAPHS = 4
#: Other graphs an engine keeps (forced passes per (batch, bucket), CLIP and SAM per shape, mask decoders).
MAX_STAGE_GRAPHS = 16

K = TypeVar("K")
V = TypeVar("V")


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


class LRU(Generic[K, V]):
    """A map of at most ``size`` entries: putting one more evicts the least recently used (read or put)."""

    def __init__(self, size: int) -> None:
        self.size = max(1, int(size))
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def keys(self) -> list[K]:
        return list(self._items)

    def values(self) -> list[V]:
        return list(self._items.values())

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class Graphed:
    """``fn`` of fixed-shape tensors, captured in a CUDA graph (by :meth:`GraphCapturer.capture`): inputs are
    copied into static buffers, the graph replayed, and the static outputs returned (clone them to keep them
    past the next replay of any graph of the same pool)."""

    def __init__(self, graph: Any, inputs: list[torch.Tensor], outputs: Any) -> None:
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs

    def __call__(self, *inputs: torch.Tensor) -> Any:
        for buffer, value in zip(self.inputs, inputs, strict=True):
            buffer.copy_(value)
        self.graph.replay()
        return self.outputs


class GraphCapturer:
    """Captures the CUDA graphs of one engine: on its ``device`` (whatever device is current), from a capture
    stream of its own, into one memory pool per replay stream (graphs replayed on one stream never run at the
    same time, so their temporaries can share memory; SAM's encoder graphs, replayed on the SAM stream while
    the others run, get a pool of their own).

    A capture that fails is undone (:meth:`_recover`: the thread back on the stream it was on, the allocator
    no longer routing allocations into the graph's pool, the device synchronised) and no further capture is
    tried: ``failed`` names the stage and the error, and the engine's graph users run eagerly from then on.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        #: why captures stopped (``stage: error``), None while they work
        self.failed: str | None = None
        #: graphs captured so far (evicted ones included)
        self.captured = 0
        self._pools: dict[str, Any] = {}
        self._stream: Any = None

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The engine's device made current (streams, events and capture default to the current device)."""
        with torch.cuda.device(self.device):
            yield

    def capture(self, name: str, fn: Callable[..., Any], *examples: torch.Tensor, pool: str = "main",
                warmup: int = 2) -> Graphed | None:
        """``fn(*examples)`` warmed up on the capture stream, captured into the pool ``pool``; None when
        capture failed (or failed before, in this engine)."""
        if self.failed is not None:
            return None
        with self.on_device():
            current = torch.cuda.current_stream(self.device)
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            if pool not in self._pools:
                self._pools[pool] = torch.cuda.graph_pool_handle()
            side, handle, graph = self._stream, self._pools[pool], torch.cuda.CUDAGraph()
            try:
                inputs = [e.clone() for e in examples]
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for _ in range(warmup):
                        fn(*inputs)
                current.wait_stream(side)
                with torch.cuda.graph(graph, pool=handle, stream=side, capture_error_mode="thread_local"):
                    outputs = fn(*inputs)
            except Exception as exc:  # noqa: BLE001 - a stage that cannot be captured runs eagerly
                self._recover(current, graph, handle)
                self.failed = f"{name}: {_why(exc)}"
                log.warning("CUDA graph capture of %s failed (%s); this engine runs without CUDA graphs from now on",
                            name, _why(exc))
                return None
        self.captured += 1
        return Graphed(graph, inputs, outputs)

    def _recover(self, stream: Any, graph: Any, pool: Any) -> None:
        """Undo what a failed capture can leave behind. ``torch.cuda.graph`` ends the capture on leaving, but
        when ending it raises (a capture invalidated by a host synchronisation) it neither returns the thread
        to its stream nor tells the caching allocator that the capture is over."""
        with contextlib.suppress(Exception):
            if torch.cuda.is_current_stream_capturing():
                graph.capture_end()
        torch.cuda.set_stream(stream)
        end_pool = getattr(torch._C, "_cuda_endAllocateToPool", None)
        if end_pool is not None:
            with contextlib.suppress(Exception):  # raises "not currently recording" when the capture ended cleanly
                end_pool(self.device.index if self.device.index is not None else torch.cuda.current_device(), pool)
        with contextlib.suppress(Exception):  # a sticky CUDA error shows again at the caller's next call
            torch.cuda.synchronize(self.device)


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


class GraphedStages:
    """CUDA graphs of the engine's fixed-shape stages, captured at first use per shape (CUDA only) by the
    engine's ``capturer``; at most ``max_graphs`` kept (least recently used evicted).

    ``llm_pass(embeds)``: the LLM's forced pass (batch, bucket, H) -> last hidden state (eager when ``llm`` is
    False: a quantization whose matmuls synchronise with the host); ``clip(pixels)``; ``sam(pixels)``: SAM's
    image encoder (only with the SDPA attention, whose indices live on the device; replayed on the SAM stream,
    so in a pool of its own); ``decode_masks(seg_states, embedding)``: ``text_hidden_fcs`` and SAM's mask
    decoder, per number of masks. Each returns fresh tensors (cloned from the graph's static outputs), or runs
    eagerly once the engine's captures have failed.
    """

    def __init__(self, model: Any, capturer: GraphCapturer, *, sam: bool, llm: bool = True,
                 max_graphs: int = MAX_STAGE_GRAPHS) -> None:
        self.model = model
        self.capturer = capturer
        self.sam_enabled = sam
        self.llm_enabled = llm
        self._graphs: LRU[tuple[Any, ...], Graphed] = LRU(max_graphs)

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> list[tuple[Any, ...]]:
        """The (stage, shapes, dtype) keys of the graphs held."""
        return self._graphs.keys()

    def _run(self, key: tuple[Any, ...], fn: Callable[..., Any], *xs: torch.Tensor, pool: str = "main") -> Any:
        if self.capturer.failed is not None:
            self._graphs.clear()  # an engine whose capture failed replays nothing
            return fn(*xs)
        graphed = self._graphs.get(key)
        if graphed is None:
            graphed = self.capturer.capture(str(key[0]), fn, *xs, pool=pool)
            if graphed is None:
                self._graphs.clear()
                return fn(*xs)
            self._graphs.put(key, graphed)
        out = graphed(*xs)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    def llm_pass(self, embeds: torch.Tensor) -> torch.Tensor:
        def run(x: torch.Tensor) -> torch.Tensor:
            return decoder_pass(self.model.llm.model, x)

        if not self.llm_enabled:
            return run(embeds)
        return self._run(("llm forced pass", tuple(embeds.shape), embeds.dtype), run, embeds)

    def clip(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(("clip", tuple(pixels.shape), pixels.dtype), self.model.encode_clip, pixels)

    def decode_masks(self, seg_states: torch.Tensor,
                     embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`LisaModel.decode_masks` ((n, H) [SEG] states, (1, C, h, w) embedding -> low-res logits,
        IoU predictions, prompts), one graph per (n, dtype)."""
        key = ("mask decoder", tuple(seg_states.shape), tuple(embedding.shape), seg_states.dtype)
        return self._run(key, self.model.decode_masks, seg_states, embedding)

    def sam(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.sam_enabled:
            return self.model.encode_sam(pixels)
        return self._run(("sam image encoder", tuple(pixels.shape), pixels.dtype), self.model.encode_sam, pixels,
                         pool="sam")


class CompiledEncoders:
    """SAM's and CLIP's image encoders through ``torch.compile`` (static shapes: each new input shape
    compiles once, at its first call).

    ``clip(pixels)``: (B, 3, C, C) -> CLIP patch tokens; ``sam(pixels)``: (V, 3, S, S) -> (V, 256, s, s) SAM
    embeddings, as :meth:`LisaModel.encode_clip` / :meth:`LisaModel.encode_sam` return them. An encoder
    whose compilation or compiled run fails is logged once and runs eagerly from then on (never an error).
    ``backend`` is ``torch.compile``'s (``inductor`` by default).
    """

    def __init__(self, model: Any, *, backend: Any = "inductor", mode: str | None = None) -> None:
        self.model = model
        self._compiled = {
            "clip": torch.compile(model.encode_clip, backend=backend, mode=mode, dynamic=False),
            "sam": torch.compile(model.encode_sam, backend=backend, mode=mode, dynamic=False),
        }
        self._eager = {"clip": model.encode_clip, "sam": model.encode_sam}
        #: names of the encoders whose compilation failed (they run eagerly)
        self.failed: set[str] = set()

    def _run(self, name: str, pixels: torch.Tensor) -> torch.Tensor:
        if name not in self.failed:
            try:
                return self._compiled[name](pixels)
            except Exception as exc:  # noqa: BLE001 - an encoder that cannot be compiled runs eagerly
                self.failed.add(name)
                log.warning("torch.compile of the %s encoder failed (%s); it runs eagerly", name, _why(exc))
        return self._eager[name](pixels)

    def clip(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run("clip", pixels)

    def sam(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run("sam", pixels)


def _why(exc: BaseException) -> str:
    """``Type: first line`` of an exception and, when it wraps another (a compiler backend's), of the root."""
    def line(e: BaseException) -> str:
        text = next((t.strip() for t in str(e).splitlines() if t.strip()), "")
        return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__

    root, seen = exc, {id(exc)}
    while True:  # torch's BackendCompilerFailed keeps the backend's error as inner_exception
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        root = inner
        seen.add(id(root))
    return line(exc) if root is exc else f"{line(exc)} <- {line(root)}"
