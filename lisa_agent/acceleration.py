"""Fixed shapes, a static KV cache and CUDA graphs for the engine's hot path.

- **Buckets**: sequence lengths are rounded up to multiples of :data:`BUCKET` (right padding: causal
  attention never lets a real position see a later pad), so every stage runs with one of a few shapes.
- **Static KV cache** (:class:`StaticDecoder`): greedy decoding writes into a preallocated
  ``transformers.StaticCache`` of a bucketed length; with bucket padding on (always with CUDA graphs) the
  prompt is prefilled padded to its bucket and the cache's write position then set back to the real
  length, so decoding overwrites the pads. Outputs equal the dynamic cache's (tested on the CPU, padded and
  not). Padding only pays where shapes must be fixed: on the CPU it is off unless asked for.
- **CUDA graphs** (CUDA only): the decode step of each cache length, the forced ``fast`` pass of each
  (batch, bucket) shape, CLIP, SAM's image encoder and its mask decoder (per mask count) are captured once
  at first use (:class:`Graphed`)
  and replayed; a capture that fails is logged once and that stage stays eager (never an error).
- **torch.compile** (opt-in, any device; :class:`CompiledEncoders`): SAM's and CLIP's image encoders
  compiled with inductor, once per input shape at first use (minutes for SAM ViT-H). A compilation that
  fails is logged once and that encoder stays eager. Compiled encoders replace their CUDA graphs.

Nothing here changes numbers beyond float rounding: it changes shapes, memory addresses and launches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .generation import decoder_pass, greedy_loop

log = logging.getLogger(__name__)

#: Sequence lengths are padded up to a multiple of this.
BUCKET = 64


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


class Graphed:
    """``fn`` of fixed-shape tensors, captured in a CUDA graph: inputs are copied into static buffers,
    the graph replayed, and the static outputs returned (clone them to keep them past the next call).

    Build with :meth:`capture`, which returns None (and logs why, once per name) when capture fails.
    """

    _failed: set[str] = set()

    def __init__(self, graph: Any, inputs: list[torch.Tensor], outputs: Any) -> None:
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs

    @classmethod
    def capture(cls, name: str, fn: Callable[..., Any], *examples: torch.Tensor, warmup: int = 2) -> Graphed | None:
        if name in cls._failed:
            return None
        try:
            inputs = [e.clone() for e in examples]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = fn(*inputs)
            return cls(graph, inputs, outputs)
        except Exception as exc:  # noqa: BLE001 - a stage that cannot be captured runs eagerly
            cls._failed.add(name)
            log.warning("CUDA graph capture of %s failed (%s: %s); it runs eagerly", name, type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "")
            return None

    def __call__(self, *inputs: torch.Tensor) -> Any:
        for buffer, value in zip(self.inputs, inputs, strict=True):
            buffer.copy_(value)
        self.graph.replay()
        return self.outputs


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


class StaticDecoder:
    """Greedy decoding into a static, bucketed KV cache (CUDA graphs for the decode step on CUDA).

    One per engine; caches and graphs are kept per cache length (a few buckets) and reused.
    """

    def __init__(self, llm: Any, *, graphs: bool, pad: bool | None = None) -> None:
        self.llm = llm
        self.graphs = graphs
        #: prefill padded to its bucket (fixed shapes, needed by graphs; on the CPU the pads only cost time)
        self.pad = graphs if pad is None else pad
        self._caches: dict[int, Any] = {}
        self._steps: dict[int, Graphed | None] = {}

    def _cache(self, length: int) -> Any:
        """The cache of ``length`` positions: ``StaticCache`` (fixed shapes) when padding, else preallocated."""
        cache = self._caches.get(length)
        if cache is None:
            if self.pad:
                from transformers import StaticCache

                cache = StaticCache(config=self.llm.config, max_cache_len=length)
            else:
                cache = preallocated_cache(self.llm.config, length)
            self._caches[length] = cache
        return cache

    @staticmethod
    def _set_length(cache: Any, length: int) -> None:
        """Make the cache's next write land at position ``length`` (after a padded prefill)."""
        for layer in cache.layers:
            layer.cumulative_length.fill_(length)

    def _eager_step(self, cache: Any, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(token)
        return decoder_pass(self.llm.model, embeds, cache, position)[:, -1]

    def _step(self, length: int, cache: Any, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        if not (self.graphs and token.is_cuda):
            return self._eager_step(cache, token, position)
        if length not in self._steps:
            # warm-up and capture write into the cache; the caller resets and prefills afterwards
            self._steps[length] = Graphed.capture(f"decode step ({length} positions)",
                                                  lambda t, p: self._eager_step(cache, t, p), token, position)
            raise _Recapture
        graphed = self._steps[length]
        if graphed is None:
            return self._eager_step(cache, token, position)
        return graphed(token, position).clone()  # the graph's output buffer is overwritten by the next replay

    def generate(self, embeds: torch.Tensor, max_new_tokens: int, *, eos: int | None, seg: int, max_segs: int,
                 banned: int | None = None) -> tuple[list[int], torch.Tensor]:
        """Greedy generation after ``embeds`` (1, T, H), the same contract as
        :func:`lisa_agent.generation.greedy_cached` (ids without EOS, ``[SEG]`` states)."""
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
        n = embeds.shape[1]
        length = bucket(n + max_new_tokens)
        cache = self._cache(length)
        cache.reset()
        prefill = min(bucket(n), length) if self.pad else n
        last = decoder_pass(llm.model, pad_length(embeds, prefill), cache,
                            torch.arange(prefill, device=device)[None])[:, n - 1]
        if self.pad:
            self._set_length(cache, n)
        token_buf = torch.zeros(1, 1, dtype=torch.long, device=device)
        position_buf = torch.zeros(1, 1, dtype=torch.long, device=device)

        def step(token: int, i: int) -> torch.Tensor:  # fixed input buffers: what a captured graph reads
            token_buf.fill_(token)
            position_buf.fill_(n + i)
            return self._step(length, cache, token_buf, position_buf)

        return greedy_loop(llm, last, step, max_new_tokens, eos=eos, seg=seg, max_segs=max_segs, banned=banned)


class _Recapture(Exception):
    """A decode step was just captured (which wrote into the cache): generation restarts from the prompt."""


class GraphedStages:
    """CUDA graphs of the engine's fixed-shape stages, captured at first use per shape (CUDA only).

    ``llm_pass(embeds)``: the LLM's forced pass (batch, bucket, H) -> last hidden state; ``clip(pixels)``;
    ``sam(pixels)``: SAM's image encoder (only with the SDPA attention, whose indices live on the device);
    ``decode_masks(seg_states, embedding)``: ``text_hidden_fcs`` and SAM's mask decoder, per number of masks.
    Each returns fresh tensors (cloned from the graph's static outputs) or runs eagerly where capture failed.
    """

    def __init__(self, model: Any, *, sam: bool) -> None:
        self.model = model
        self.sam_enabled = sam
        self._graphs: dict[tuple[Any, ...], Graphed | None] = {}

    def _run(self, key: tuple[Any, ...], fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if key not in self._graphs:
            self._graphs[key] = Graphed.capture(str(key[0]), fn, x)
        graphed = self._graphs[key]
        return fn(x) if graphed is None else graphed(x).clone()

    def llm_pass(self, embeds: torch.Tensor) -> torch.Tensor:
        def run(x: torch.Tensor) -> torch.Tensor:
            return decoder_pass(self.model.llm.model, x)

        return self._run(("llm forced pass", tuple(embeds.shape), embeds.dtype), run, embeds)

    def clip(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(("clip", tuple(pixels.shape), pixels.dtype), self.model.encode_clip, pixels)

    def decode_masks(self, seg_states: torch.Tensor,
                     embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`LisaModel.decode_masks` ((n, H) [SEG] states, (1, C, h, w) embedding -> low-res logits,
        IoU predictions, prompts), one graph per (n, dtype)."""
        key = ("mask decoder", tuple(seg_states.shape), tuple(embedding.shape), seg_states.dtype)
        if key not in self._graphs:
            self._graphs[key] = Graphed.capture(str(key[0]), self.model.decode_masks, seg_states, embedding)
        graphed = self._graphs[key]
        if graphed is None:
            return self.model.decode_masks(seg_states, embedding)
        low_res, iou, prompts = graphed(seg_states, embedding)
        return low_res.clone(), iou.clone(), prompts.clone()

    def sam(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.sam_enabled:
            return self.model.encode_sam(pixels)
        return self._run(("sam image encoder", tuple(pixels.shape), pixels.dtype), self.model.encode_sam, pixels)


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
