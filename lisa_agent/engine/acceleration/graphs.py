"""CUDA graphs of the engine's fixed-shape stages (CUDA only).

:class:`GraphCapturer` (one per engine) captures a stage at first use per shape on the engine's device, into one
memory pool per replay stream, and hands back a :class:`Graphed` to replay; a capture that fails puts the
thread's stream and the allocator back and turns that engine's graphs off (logged, never an error).
:class:`GraphedStages` holds the graphs of the forced ``fast`` pass of each (batch, bucket) shape, CLIP, SAM's
image encoder and its mask decoder (per mask count), at most :data:`MAX_STAGE_GRAPHS`, the least recently used
evicted first. The decode step's graphs live with their static caches
(:class:`~lisa_agent.engine.acceleration.static_cache.StaticDecoder`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..generation import decoder_pass
from ..lru import LRU

log = logging.getLogger(__name__)

#: Other graphs an engine keeps (forced passes per (batch, bucket), CLIP and SAM per shape, mask decoders).
MAX_STAGE_GRAPHS = 16


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
                self.failed = f"{name}: {failure_reason(exc)}"
                log.warning("CUDA graph capture of %s failed (%s); this engine runs without CUDA graphs from now on",
                            name, failure_reason(exc))
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


def failure_reason(exc: BaseException) -> str:
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
