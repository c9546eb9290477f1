"""``LisaSegmenter``: numpy frames and instructions in, masks and answers out.

Three modes share one pipeline (frame features -> prompt -> LLM -> [SEG] states -> SAM decoder):

- ``fast``: the answer is teacher-forced (default ``"Sure, [SEG]."``) and the LLM runs once over
  prompt + answer; the hidden state before each ``[SEG]`` is read directly. LISA's own evaluation
  works this way; a robot wants it at frame rate.
- ``chat``: greedy generation with a KV cache; the post-norm hidden state of each step that emits
  ``[SEG]`` is kept. Stops at EOS or ``max_new_tokens``.
- ``reference``: what the public LISA code does (no KV cache: CLIP and the whole sequence re-run for
  every new token, then one more full pass for the hidden states). For parity tests and speed
  comparison only.

Presence gate (ours, not LISA's; only for checkpoints whose ``config.json`` declares
``lisa_agent.presence_gate``, such as the bundled ``tabletop-tiny``): the mask decoder's score output
was trained to say whether a ``[SEG]``'s target is in the frame, and each mask's ``score`` is that
probability. When every ``[SEG]`` of an answer scores below the gate's threshold the query is
declined: no mask, and the answer is generated again from the checkpoint's decline prefix
(``"Sorry,"``) with ``[SEG]`` barred, so the language model words the refusal itself ("Sorry, there
is no hammer in this image."). Published LISA checkpoints have no gate and behave exactly as LISA.

Mask test-time augmentation (ours, off unless asked for or declared by the checkpoint as
``lisa_agent.mask_tta``): SAM also encodes mirrored copies of the frame (``hflip``: left-right;
``flips``: left-right, upside-down and both), the mask decoder reads each with the same ``[SEG]``
states, and the mirrored logits, flipped back, are averaged with the frame's own (mask logits and
score logits alike). It costs one SAM encoder pass and one decoder pass per extra view; the language
model runs once. Upside-down views suit top-down cameras (a tabletop seen from above), not a robot's
forward-looking one.

Per-frame SAM and CLIP features (:mod:`lisa_agent.engine.features`) are computed once per frame: pass the
handle :meth:`LisaSegmenter.encode` returns, or the same pixels again (a small LRU cache keyed by a
digest of the pixels finds them). Results say ``cached`` and report what the call really cost.
:meth:`LisaSegmenter.segment_batch` runs several ``fast`` queries in one LLM pass.

Every entry point takes a :class:`~lisa_agent.frames.Frame` (pixels, id, stamp, optional depth +
intrinsics), a plain HxWx3 uint8 RGB array, or a :class:`~lisa_agent.engine.features.FrameFeatures` handle;
with depth, each result carries the masks' 3D targets (:func:`lisa_agent.geometry.frame_targets`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
import torch

from ..config import MASK_TTA_VIEWS, EngineConfig, mask_budget
from ..errors import InvalidArgumentError, InvalidQueryError, LimitExceededError
from ..frames import Frame, as_frame, check_query
from ..options import MODES, QueryOptions, check_answer
from ..result import SegmentationResult
from .acceleration import CompiledEncoders, GraphCapturer, GraphedStages, StaticDecoder, bucket
from .features import FeatureCache, FrameFeatures, frame_digest, mirror, mirrored_views
from .generation import decoder_pass, greedy_cached, greedy_reference
from .loading import load_lisa, resolve_checkpoint, resolve_precision, resolve_quant_backend
from .modeling.lisa import LisaModel
from .preprocess import (
    SamInput,
    clip_preprocess,
    clip_preprocess_tensor,
    sam_preprocess,
    sam_preprocess_tensor,
)
from .prompts import DEFAULT_ANSWER, SEG_TOKEN, build_prompt, get_template
from .tokenization import LisaTokenizer

log = logging.getLogger(__name__)

#: generation limit for a declined ``fast`` query's refusal (chat modes use their own max_new_tokens)
DECLINE_MAX_TOKENS = 32
#: what a call may pass as its image: pixels, a Frame, or features already encoded
ImageInput = np.ndarray | Frame | FrameFeatures


@dataclass
class Conversation:
    """A multi-turn chat about one image (LISA takes one image per conversation).

    ``features`` is the image's :class:`~lisa_agent.engine.features.FrameFeatures` handle (kept alive by the
    conversation); ``history`` holds (question, answer) pairs; :meth:`LisaSegmenter.chat` appends to it.
    """

    features: FrameFeatures
    history: list[tuple[str, str]] = field(default_factory=list)

    @property
    def image(self) -> np.ndarray:
        """The HxWx3 uint8 RGB frame of the conversation."""
        return self.features.frame.rgb


class _Timer:
    """Wall time per stage; on CUDA it waits for the device's current stream only (work on other streams,
    such as SAM's encoder overlapping the language model, goes on)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sync = device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.sync:
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        ms = (now - self.t) * 1000.0
        self.t = now
        return ms


class OptimizationSwitches(TypedDict):
    """Keyword arguments of :meth:`LisaSegmenter.set_optimizations` (and of the constructor)."""

    static_cache: bool
    cuda_graphs: bool
    overlap: bool
    compile: bool
    device_preprocess: bool


def optimization_switches(config: EngineConfig, device: torch.device) -> OptimizationSwitches:
    """The :meth:`LisaSegmenter.set_optimizations` switches ``config`` asks for on ``device`` (CUDA graphs and
    the SAM stream only on CUDA)."""
    cuda = device.type == "cuda"
    return {"static_cache": config.static_cache == "auto", "cuda_graphs": config.cuda_graphs == "auto" and cuda,
            "overlap": config.overlap == "auto" and cuda, "compile": config.compile == "on",
            "device_preprocess": config.preprocess == "device" or (config.preprocess == "auto" and cuda)}


class LisaSegmenter:
    """LISA inference engine. Build with :meth:`from_pretrained`; thread-safe (one call at a time).

    Example::

        seg = LisaSegmenter.from_pretrained("xinlai/LISA-7B-v1", dtype="bf16", device="cuda")
        result = seg.segment(frame, "grab something to cut with")   # frame: HxWx3 uint8 RGB
        result.masks[0]        # HxW bool, the knife
        feats = seg.encode(frame)                                    # encode once ...
        seg.segment(feats, "the mug"); seg.segment(feats, "the apple")  # ... ask many times
    """

    def __init__(self, model: LisaModel, tokenizer: LisaTokenizer, *, template: str = "llava_v1",
                 use_im_start_end: bool = True, name: str = "", quantization: str | None = None,
                 cache_frames: int = 4, presence_gate: dict[str, Any] | None = None, mask_tta: str = "off",
                 config: EngineConfig | None = None, max_masks: int = 16, max_mask_megapixels: float = 256.0,
                 static_cache: bool = False, cuda_graphs: bool = False, overlap: bool = False,
                 compile: bool = False, device_preprocess: bool = False, quant_backend: str | None = None):
        if mask_tta not in MASK_TTA_VIEWS:
            raise InvalidArgumentError(f"mask_tta must be one of {', '.join(MASK_TTA_VIEWS)}; got {mask_tta!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.use_im_start_end = use_im_start_end
        self.name = name
        self.quantization = quantization
        #: where the quantized weights came from (bitsandbytes / torchao), None without quantization
        self.quant_backend = quant_backend if quantization else None
        try:
            self.seg_token_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        except KeyError:
            raise InvalidArgumentError("the tokenizer has no [SEG] token: not a LISA checkpoint") from None
        self.eos_token_id = tokenizer.eos_token_id
        if model.vision is None:
            raise InvalidArgumentError("the model has no vision tower attached")
        self.sam_size = model.sam_spec.img_size
        self.clip_size = int(model.vision.image_size)
        #: the checkpoint's presence gate ({"threshold": float, "decline_prefix": str}) or None
        self.presence_gate = _check_gate(presence_gate)
        self._views = MASK_TTA_VIEWS[mask_tta]
        self._mask_tta = mask_tta
        self._cache = FeatureCache(cache_frames)
        #: per-answer mask limits (see EngineConfig.max_masks / max_mask_megapixels)
        self.max_masks = int(max_masks)
        self.max_mask_megapixels = float(max_mask_megapixels)
        #: the model's context length: prompt, image tokens and answer together
        self.max_positions = int(model.llm.config.max_position_embeddings)
        self._decoder: StaticDecoder | None = None
        self._stages: GraphedStages | None = None
        #: captures this engine's CUDA graphs (its device, its pools; after a failed capture, none more)
        self._capturer = GraphCapturer(self.device) if self.device.type == "cuda" else None
        self._sam_stream: torch.cuda.Stream | None = None
        self._compiled: CompiledEncoders | None = None
        self._compiled_kept: CompiledEncoders | None = None
        self.compile = False
        self.device_preprocess = False
        self.set_optimizations(static_cache=static_cache, cuda_graphs=cuda_graphs, overlap=overlap, compile=compile,
                               device_preprocess=device_preprocess)
        self._lock = threading.RLock()
        #: the options this engine was built from (None when built directly from a model)
        self.config = config

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: str | os.PathLike[str] = "tabletop-tiny", **options: Any) -> LisaSegmenter:
        """Load a LISA checkpoint in the published layout.

        Args:
            model: Hub id (``xinlai/LISA-7B-v1``), local folder, or a bundled short name
                (``tabletop-tiny``).
            **options: the other :class:`~lisa_agent.config.EngineConfig` fields (``vision_tower``,
                ``device``, ``dtype``, ``quantization``, ``template``, ``mask_tta``,
                ``presence_threshold``, ``sam_attention``, ``cache_frames``), validated before anything
                loads. Defaults: ``device="auto"`` (CUDA when present), ``dtype="auto"`` (bf16 on CUDA,
                fp32 on the CPU), the checkpoint's own template, mask augmentation and presence gate.
        """
        return cls.from_config(EngineConfig(model=os.fspath(model), **options))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LisaSegmenter:
        """Load the checkpoint ``config.model`` with the options of ``config`` (see :class:`EngineConfig`)."""
        tdtype, tdevice = resolve_precision(config)
        folder = resolve_checkpoint(config.model)
        backend = resolve_quant_backend(config, tdevice)
        loaded = load_lisa(folder, vision_tower=config.vision_tower, dtype=tdtype, device=tdevice,
                           quantization=config.quantization, sam_attention=config.sam_attention, quant_backend=backend)
        tokenizer = LisaTokenizer.from_pretrained(folder)
        gate = loaded.config.presence_gate
        if config.presence_threshold is None:
            gate = None
        elif config.presence_threshold != "checkpoint":
            if not gate:
                raise InvalidArgumentError(f"{config.model} has no presence head (config.json declares no "
                                           "lisa_agent.presence_gate): presence_threshold must be 'checkpoint' or off")
            gate = {**gate, "threshold": config.presence_threshold}
        mask_tta = loaded.config.mask_tta if config.mask_tta == "checkpoint" else config.mask_tta
        return cls(loaded.model, tokenizer, template=config.template or loaded.config.conv_template,
                   use_im_start_end=loaded.config.mm_use_im_start_end, name=config.model,
                   quantization=config.quantization, cache_frames=config.cache_frames, presence_gate=gate,
                   mask_tta=mask_tta, config=config, max_masks=config.max_masks,
                   max_mask_megapixels=config.max_mask_megapixels, quant_backend=backend,
                   **optimization_switches(config, tdevice))

    def set_optimizations(self, *, static_cache: bool, cuda_graphs: bool, overlap: bool,
                          buckets: bool | None = None, compile: bool | None = None,
                          device_preprocess: bool | None = None) -> None:
        """Turn the hot-path optimizations on or off (:mod:`lisa_agent.engine.acceleration`; ``bench --compare`` times
        each): a static KV cache; CUDA graphs; SAM's encoder on its own CUDA stream, overlapping CLIP and the
        language model; sequence lengths padded to buckets (``buckets``; None: on with graphs, which need
        fixed shapes); the image encoders through ``torch.compile`` (``compile``; compiled once and kept
        when turned off and on again); frames resized and normalised on the device (``device_preprocess``:
        uploaded once as uint8). ``compile`` and ``device_preprocess`` stay as they are when None. Graphs and
        the stream need CUDA."""
        cuda = self.device.type == "cuda"
        self.static_cache = bool(static_cache)
        self.cuda_graphs = bool(cuda_graphs) and self._capturer is not None
        self.overlap = bool(overlap) and cuda
        self.buckets = self.cuda_graphs if buckets is None else bool(buckets)
        # bitsandbytes' 8-bit matmul reads its outliers on the host: a capture of the LLM would fail
        llm_graphs = not (self.quant_backend == "bitsandbytes" and self.quantization == "8bit")
        self._decoder = (StaticDecoder(self.model.llm, graphs=self.cuda_graphs and llm_graphs, pad=self.buckets,
                                       capturer=self._capturer) if self.static_cache else None)
        sdpa = any(type(m).__name__ == "SdpaAttention" for m in self.model.sam.image_encoder.modules())
        self._stages = (GraphedStages(self.model, self._capturer, sam=sdpa, llm=llm_graphs)
                        if self.cuda_graphs and self._capturer is not None else None)
        self._sam_stream = torch.cuda.Stream(device=self.device) if self.overlap else None
        self.compile = self.compile if compile is None else bool(compile)
        if self.compile and self._compiled_kept is None:
            self._compiled_kept = CompiledEncoders(self.model)
        self._compiled = self._compiled_kept if self.compile else None
        self.device_preprocess = self.device_preprocess if device_preprocess is None else bool(device_preprocess)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        """The engine's CUDA device made current (``cuda:N``: the streams, events, timers and graph captures of
        this engine and of the libraries it calls default to the current device); nothing elsewhere."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def graph_memory(self) -> dict[str, Any]:
        """What the optimizations hold (bounded, see :mod:`lisa_agent.engine.acceleration`): CUDA graphs, static KV
        caches and their megabytes, and why this engine's graph captures stopped (None while they work)."""
        decoder = self._decoder.memory() if self._decoder is not None else {
            "static_caches": 0, "decode_graphs": 0, "static_cache_mb": 0.0}
        stages = len(self._stages) if self._stages is not None else 0
        return {"cuda_graphs": stages + int(decoder["decode_graphs"]), "static_caches": decoder["static_caches"],
                "static_cache_mb": decoder["static_cache_mb"],
                "cuda_graphs_captured": 0 if self._capturer is None else self._capturer.captured,
                "cuda_graphs_failed": None if self._capturer is None else self._capturer.failed}

    @property
    def dtype(self) -> torch.dtype:
        return self.model.mm_projector.weight.dtype

    @property
    def mask_tta(self) -> str:
        """The mask test-time augmentation in use: ``off``, ``hflip`` or ``flips`` (fixed at construction)."""
        return self._mask_tta

    def info(self) -> dict[str, Any]:
        """Model, precision and input sizes, as reported by the server's ``info`` op."""
        return {
            "model": self.name,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "quantization": self.quantization,
            "quant_backend": self.quant_backend,
            "template": self.template.name,
            "seg_token_id": self.seg_token_id,
            "sam_image_size": self.sam_size,
            "clip_image_size": self.clip_size,
            "modes": list(MODES),
            "presence_threshold": None if self.presence_gate is None else self.presence_gate["threshold"],
            "mask_tta": self._mask_tta,
            "cache_frames": self._cache.size,
            "max_masks": self.max_masks,
            "max_mask_megapixels": self.max_mask_megapixels,
            "mask_views": len(self._views),
            "max_positions": self.max_positions,
            "static_cache": self.static_cache,
            "cuda_graphs": self.cuda_graphs and self._capturer is not None and self._capturer.failed is None,
            "cuda_graphs_failed": None if self._capturer is None else self._capturer.failed,
            "overlap": self.overlap,
            "buckets": self.buckets,
            "compile": self.compile,
            "device_preprocess": self.device_preprocess,
        }

    # ------------------------------------------------------------------ frames
    @torch.inference_mode()
    def encode(self, image: np.ndarray | Frame, frame_id: str | None = None) -> FrameFeatures:
        """The SAM and CLIP features of ``image`` (a :class:`~lisa_agent.frames.Frame` or HxWx3 uint8 RGB),
        from the cache when the same pixels were encoded recently.

        Pass the returned handle to :meth:`segment`, :meth:`segment_batch` or :meth:`start_conversation`
        to query the frame again without hashing, preprocessing or encoding it.
        """
        return self._features(image, frame_id)[0]

    def _features(self, image: ImageInput, frame_id: str | None = None) -> tuple[FrameFeatures, dict[str, float], bool]:
        """(features, encoder timings of this call, whether they were already computed)."""
        zero = {"digest": 0.0, "preprocess": 0.0, "sam_encoder": 0.0, "clip": 0.0}
        if isinstance(image, FrameFeatures):
            if image.views != self._views or image.sam_embedding.device != self.device:
                raise InvalidArgumentError("these FrameFeatures were encoded by another engine (other views or "
                                           "device); encode the frame with this one")
            feats = image if frame_id is None else image.for_frame(as_frame(image.frame, frame_id))
            return feats, zero, True
        frame = as_frame(image, frame_id)
        timer = _Timer(self.device)
        key = frame_digest(frame.rgb)
        t_digest = timer.lap()
        with self._lock, torch.inference_mode(), self._on_device():
            cached = self._cache.get(key)
            if cached is not None:
                return cached.for_frame(frame), {**zero, "digest": t_digest}, True
            timer = _Timer(self.device)
            sam_in, clip_px = self._preprocess(frame.rgb)
            assert clip_px is not None  # asked for (clip=True)
            pixels = mirrored_views(sam_in.pixels, sam_in.resized_hw, self._views)
            t_pre = timer.lap()
            sam_emb, ready = self._encode_sam(pixels)
            t_sam = timer.lap()
            tokens = self._encoder("clip")(clip_px)
            t_clip = timer.lap()
            timings = {"digest": t_digest, "preprocess": t_pre, "sam_encoder": t_sam, "clip": t_clip}
            feats = FrameFeatures(key, frame, sam_in.resized_hw, sam_emb, tokens, clip_px, timings, self._views,
                                  sam_ready=ready)
            self._cache.put(feats)
            return feats, timings, False

    def _preprocess(self, rgb: np.ndarray, clip: bool = True) -> tuple[SamInput, torch.Tensor | None]:
        """SAM's input (pixels on the device) and CLIP's (on the device; None unless ``clip``) for an HxWx3
        uint8 RGB frame: with PIL on the CPU, or by torch on the device from one uint8 upload."""
        if self.device_preprocess:
            host = rgb if rgb.flags.c_contiguous and rgb.flags.writeable else np.array(rgb)  # torch wants writable
            frame = _upload(torch.from_numpy(host), self.device).permute(2, 0, 1)[None]
            return (sam_preprocess_tensor(frame, self.sam_size),
                    clip_preprocess_tensor(frame, self.clip_size) if clip else None)
        sam_in = sam_preprocess(rgb, self.sam_size)
        sam_in = SamInput(_upload(sam_in.pixels, self.device), sam_in.resized_hw, sam_in.original_hw)
        return sam_in, _upload(clip_preprocess(rgb, self.clip_size), self.device) if clip else None

    def _encoder(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The ``clip`` or ``sam`` image encoder to run: compiled, else graphed, else eager."""
        if self._compiled is not None:
            return self._compiled.clip if name == "clip" else self._compiled.sam
        if self._stages is not None:
            return self._stages.clip if name == "clip" else self._stages.sam
        return self.model.encode_clip if name == "clip" else self.model.encode_sam

    def _encode_sam(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """SAM image embeddings of ``pixels`` (V, 3, S, S): on the SAM stream when overlapping (returns the
        event marking them ready), else on the current stream (None)."""
        encode = self._encoder("sam")
        if self._sam_stream is None:
            if self.device.type == "cuda" or len(pixels) == 1:
                return encode(pixels), None
            # on CPUs one view at a time is faster than a batch (114 vs 160 ms for 4 views, 2 cores)
            return torch.cat([encode(pixels[k:k + 1]) for k in range(len(pixels))]), None
        stream = self._sam_stream
        main = torch.cuda.current_stream(self.device)
        stream.wait_stream(main)  # the pixels were uploaded there
        with torch.cuda.stream(stream):
            embedding = encode(pixels)
            ready = torch.cuda.Event()
            ready.record(stream)
        pixels.record_stream(stream)
        embedding.record_stream(main)
        return embedding, ready

    def clear_cache(self) -> None:
        """Forget all cached frame features."""
        self._cache.clear()

    @torch.inference_mode()
    def masks_from_prompts(self, image: np.ndarray | Frame, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The masks that decoder ``prompts`` (N x D float32, a result's ``seg_embeddings``) give on ``image``:
        SAM's encoder on the frame itself (no mirrored views, no CLIP, no language model) and the mask decoder.

        What the ``sam`` tracker runs on every frame between reasoning steps. Returns (N x H x W bool masks,
        N scores: the decoder's IoU prediction, or the presence probability for gated checkpoints).
        """
        frame = as_frame(image)
        prompts_t = torch.as_tensor(np.asarray(prompts, dtype=np.float32), device=self.device)
        h, w = frame.size
        if prompts_t.ndim != 2 or len(prompts_t) == 0:
            return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
        with self._lock, self._on_device():
            sam_in, _ = self._preprocess(frame.rgb, clip=False)
            if self._sam_stream is not None:  # SAM's graph may still be replaying there for an encode()
                torch.cuda.current_stream(self.device).wait_stream(self._sam_stream)
            embedding = self._encoder("sam")(sam_in.pixels)  # graphed or compiled like the engine's own
            low_res, iou = self.model.decode_prompts(prompts_t, embedding)
            logits = self.model.postprocess_masks(low_res, sam_in.resized_hw, (h, w))
            scores = iou[:, 0].float()
            if self.presence_gate is not None:
                scores = scores.sigmoid()
            return (logits > 0).cpu().numpy(), scores.cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------------ public queries
    def segment(self, image: ImageInput, query: str, options: QueryOptions | None = None, *,
                frame_id: str | None = None, mode: str | None = None, max_new_tokens: int | None = None,
                answer: str | None = None, return_logits: bool | None = None) -> SegmentationResult:
        """Answer ``query`` about ``image`` and segment what the answer's ``[SEG]`` tokens point at.

        Args:
            image: a :class:`~lisa_agent.frames.Frame` (with depth and intrinsics the result carries 3D
                targets), an HxWx3 uint8 RGB array, or a :class:`~lisa_agent.engine.features.FrameFeatures`
                handle from :meth:`encode`.
            query: the instruction, e.g. "grab something to cut with".
            options: how to answer (:class:`~lisa_agent.options.QueryOptions`: ``mode`` ``fast`` (teacher-forced
                ``answer``, default ``"Sure, [SEG]."``), ``chat`` (greedy, KV cache) or ``reference``;
                ``max_new_tokens``; ``return_logits``: also float32 mask logits (N x H x W) and the decoder
                prompts (N x D)); None: the defaults.
            frame_id: the frame's name, carried into the result (replaces a Frame's own).
            mode, max_new_tokens, answer, return_logits: change single ``options`` fields.
        """
        opts = QueryOptions.of(options, mode=mode, max_new_tokens=max_new_tokens, answer=answer,
                               return_logits=return_logits)
        if opts.mode == "fast":
            return self.segment_batch(image, [query], answers=None if opts.answer is None else [opts.answer],
                                      frame_id=frame_id, return_logits=opts.return_logits)[0]
        query = check_query(query)
        feats, timings, cached = self._features(image, frame_id)
        return self._generate(feats, timings, cached, query, (), opts.mode, opts.max_new_tokens, opts.return_logits)

    def segment_batch(self, image: ImageInput, queries: Sequence[str], *, answers: Sequence[str] | None = None,
                      frame_id: str | None = None, return_logits: bool = False) -> list[SegmentationResult]:
        """Several ``fast`` queries on one frame: image encoders once, one LLM pass for all queries."""
        if isinstance(queries, str) or not len(queries):
            raise InvalidQueryError("queries must be a non-empty list of strings")
        texts = [check_query(q) for q in queries]
        answers = [DEFAULT_ANSWER] * len(texts) if answers is None else [check_answer(a) for a in answers]
        if len(answers) != len(texts):
            raise InvalidArgumentError(f"{len(answers)} answers for {len(texts)} queries")
        feats, timings, cached = self._features(image, frame_id)
        with self._lock, torch.inference_mode(), self._on_device():
            return self._forced(feats, timings, cached, texts, answers, return_logits)

    def start_conversation(self, image: ImageInput, frame_id: str | None = None) -> Conversation:
        """A new multi-turn conversation about ``image`` (features computed now and kept by the conversation)."""
        return Conversation(self._features(image, frame_id)[0])

    def chat(self, conversation: Conversation, query: str, options: QueryOptions | None = None, *,
             max_new_tokens: int | None = None, return_logits: bool | None = None) -> SegmentationResult:
        """One more turn of ``conversation`` (greedy, KV cache; ``options.mode`` is ignored); the answer is
        appended to its history."""
        opts = QueryOptions.of(options, max_new_tokens=max_new_tokens, return_logits=return_logits)
        query = check_query(query)
        feats, timings, cached = self._features(conversation.features)
        result = self._generate(feats, timings, cached, query, tuple(conversation.history), "chat", opts.max_new_tokens,
                                opts.return_logits)
        conversation.history.append((query, result.text))
        return result

    # ------------------------------------------------------------------ internals
    def _prompt(self, query: str, history: Sequence[tuple[str, str]] = (), answer: str = "") -> str:
        return build_prompt(self.template, query, history, self.use_im_start_end, answer)

    def _forced(self, feats: FrameFeatures, enc_ms: dict[str, float], cached: bool, queries: list[str],
                answers: list[str], return_logits: bool) -> list[SegmentationResult]:
        timer = _Timer(self.device)
        prompts = [self._prompt(q) for q in queries]
        prompt_ids = [self.tokenizer.encode_prompt(p) for p in prompts]
        full_ids = [self.tokenizer.encode_prompt(self._prompt(q, answer=a)) for q, a in zip(queries, answers, strict=True)]
        budget = self._mask_budget(feats)
        for b, ids in enumerate(full_ids):  # refuse what does not fit before the model runs
            self._room(feats, queries[b], len(ids))
            n_seg = ids[len(prompt_ids[b]):].count(self.seg_token_id)
            if n_seg > budget:
                raise LimitExceededError(
                    f"the answer {answers[b][:80]!r} has {n_seg} [SEG]; at most {budget} masks per answer on a "
                    f"{feats.original_hw[0]}x{feats.original_hw[1]} frame with {len(self._views)} view(s) "
                    f"(max_masks={self.max_masks}, max_mask_megapixels={self.max_mask_megapixels:g})")
        longest = max(len(x) for x in full_ids)
        if self.buckets:  # a few fixed shapes: the padded length's bucket (image tokens included)
            n_image = feats.image_tokens.shape[1]
            longest = min(bucket(longest - 1 + n_image), self.max_positions) - n_image + 1
            longest = max(longest, max(len(x) for x in full_ids))
        # Right padding needs no attention mask: causal attention never looks at later (pad) positions.
        batch = torch.zeros(len(full_ids), longest, dtype=torch.long)
        for b, ids in enumerate(full_ids):
            batch[b, : len(ids)] = torch.tensor(ids)
        batch = batch.to(self.device)
        embeds, merged = self.model.embed_with_image(batch, feats.image_tokens)
        t_tok = timer.lap()
        if self._stages is not None:
            hidden = self._stages.llm_pass(embeds)
        else:
            hidden = decoder_pass(self.model.llm.model, embeds)
        t_llm = timer.lap()
        seg_rows, seg_cols, owners = [], [], []
        merged_pos = merged.tolist()  # one device->host copy, not one per [SEG]
        for b, ids in enumerate(full_ids):
            for j in range(len(prompt_ids[b]), len(ids)):  # [SEG] in the answer only, never in the query
                if ids[j] == self.seg_token_id:
                    seg_rows.append(b)
                    seg_cols.append(merged_pos[b][j] - 1)  # the position whose prediction is [SEG]
                    owners.append(b)
        seg_states = hidden[seg_rows, seg_cols] if seg_rows else hidden.new_zeros(0, hidden.shape[-1])
        logits, masks, scores, prompts_out, t_dec, t_post = self._masks(feats, seg_states, return_logits)
        results = []
        share = 1.0 / len(queries)
        for b, q in enumerate(queries):
            idx = [k for k, o in enumerate(owners) if o == b]
            timings = {**enc_ms, "tokenize": t_tok * share,
                       "llm": t_llm * share, "decoder": t_dec * share, "postprocess": t_post * share}
            output_ids, text = full_ids[b][len(prompt_ids[b]):], answers[b]
            if self._declines(scores[idx]):
                output_ids, text, timings["decline"] = self._decline(feats, q, (), DECLINE_MAX_TOKENS)
                idx = []
            results.append(self._result(feats, cached, q, "fast", prompts[b], prompt_ids[b], output_ids, text,
                                        None if logits is None else logits[idx], masks[idx], scores[idx],
                                        prompts_out[idx], timings))
        return results

    def _greedy(self, ids: torch.Tensor, feats: FrameFeatures, max_new_tokens: int, *, max_segs: int,
                banned: int | None = None) -> tuple[list[int], torch.Tensor]:
        """Greedy generation after ``ids`` (1, T): into the static cache when it is on, else the dynamic one."""
        if self._decoder is None:
            return greedy_cached(self.model, ids, feats.image_tokens, max_new_tokens, eos=self.eos_token_id,
                                 seg=self.seg_token_id, max_segs=max_segs, banned=banned)
        embeds, _ = self.model.embed_with_image(ids, feats.image_tokens)
        return self._decoder.generate(embeds, max_new_tokens, eos=self.eos_token_id, seg=self.seg_token_id,
                                      max_segs=max_segs, banned=banned)

    def _room(self, feats: FrameFeatures, query: str, n_ids: int, refuse: bool = True) -> int:
        """Positions left in the model's context after ``n_ids`` prompt ids with the image merged in;
        refuses (InvalidQueryError) a prompt that does not fit with room for one more token."""
        used = n_ids - 1 + feats.image_tokens.shape[1]  # the image placeholder becomes the image tokens
        room = self.max_positions - used
        if room < 1 and refuse:
            raise InvalidQueryError(
                f"the prompt is {used} tokens with the image's {feats.image_tokens.shape[1]}; this model reads at "
                f"most {self.max_positions} (its max_position_embeddings), answer included: shorten the query "
                f"(it is {len(query)} characters)")
        return room

    def _mask_budget(self, feats: FrameFeatures) -> int:
        """Masks one answer may have on this frame: ``max_masks``, and the ``max_mask_megapixels`` they cost
        (each is a full-frame float mask per mirrored view)."""
        return mask_budget(self.max_masks, self.max_mask_megapixels, len(self._views), *feats.original_hw)

    def _declines(self, scores: torch.Tensor) -> bool:
        """True when the presence gate is on and every one of an answer's (>= 1) [SEG] scores is below it."""
        return (self.presence_gate is not None and len(scores) > 0
                and bool((scores < self.presence_gate["threshold"]).all()))

    def _decline(self, feats: FrameFeatures, query: str, history: Sequence[tuple[str, str]],
                 max_new_tokens: int) -> tuple[list[int], str, float]:
        """The answer the model gives when it declines: greedy from the gate's decline prefix with
        ``[SEG]`` barred. Returns (answer ids, answer text, milliseconds)."""
        timer = _Timer(self.device)
        prefix = self.presence_gate["decline_prefix"]  # type: ignore[index]
        open_ids = self.tokenizer.encode_prompt(self._prompt(query, history))
        closed = self._prompt(query, history, answer=prefix)
        ids = self.tokenizer.encode_prompt(closed[: closed.rindex(prefix) + len(prefix)])
        max_new_tokens = max(0, min(max_new_tokens, self._room(feats, query, len(ids), refuse=False)))
        generated, _ = self._greedy(torch.tensor([ids], device=self.device), feats, max_new_tokens, max_segs=0,
                                    banned=self.seg_token_id)
        if ids[: len(open_ids)] == open_ids:
            answer_ids = ids[len(open_ids):] + generated
            text = self.tokenizer.decode(answer_ids)
        else:  # the prefix merged with the prompt's last token: keep the prefix as text
            answer_ids = generated
            text = f"{prefix} {self.tokenizer.decode(generated)}"
        return answer_ids, _clean(text), timer.lap()

    def _masks(self, feats: FrameFeatures, seg_states: torch.Tensor, keep_logits: bool):  # noqa: ANN202
        """Decoder + postprocess. Returns (logits (n, H, W) float32 on the CPU or None, masks (n, H, W)
        bool, scores (n,), decoder prompts (n, D), decoder ms, postprocess ms); thresholded on the device
        so only booleans cross to the host unless logits are asked for."""
        if feats.sam_ready is not None:  # SAM's encoder ran on its own stream, overlapping the LLM
            torch.cuda.current_stream(self.device).wait_event(feats.sam_ready)
        timer = _Timer(self.device)
        if len(seg_states) == 0:
            h, w = feats.original_hw
            empty = torch.zeros(0, h, w)
            return (empty if keep_logits else None, empty.bool(), torch.zeros(0),
                    torch.zeros(0, self.model.sam_spec.prompt_embed_dim), 0.0, 0.0)
        logits, iou, t_dec, t_post = None, None, 0.0, 0.0
        decode = self._stages.decode_masks if self._stages is not None else self.model.decode_masks
        for k, flip in enumerate(self._views):
            low_res, iou_k, prompts = decode(seg_states, feats.sam_embedding[k:k + 1])
            t_dec += timer.lap()
            view = mirror(self.model.postprocess_masks(low_res, feats.resized_hw, feats.original_hw), flip)
            logits = view if logits is None else logits + view
            iou = iou_k.float() if iou is None else iou + iou_k.float()
            t_post += timer.lap()
        assert logits is not None and iou is not None  # every view set has at least one view
        if len(self._views) > 1:  # mean of the views' logits (prompts are the same for every view)
            logits, iou = logits / len(self._views), iou / len(self._views)
        masks = (logits > 0).cpu()
        logits = logits.cpu() if keep_logits else None
        t_post += timer.lap()
        scores = iou[:, 0].float()
        if self.presence_gate is not None:
            scores = scores.sigmoid()  # the score head was trained as a presence logit
        return logits, masks, scores.cpu(), prompts.float().cpu(), t_dec, t_post

    def _result(self, feats: FrameFeatures, cached: bool, query: str, mode: str, prompt: str,
                prompt_ids: list[int], output_ids: list[int], text: str, logits: torch.Tensor | None,
                masks: torch.Tensor, scores: torch.Tensor, prompts: torch.Tensor,
                timings: dict[str, float]) -> SegmentationResult:
        timings["total"] = sum(v for k, v in timings.items() if k != "total")
        return SegmentationResult.from_frame(
            feats.frame, masks.numpy(), scores.tolist(), text=text, query=query, mode=mode, prompt=prompt,
            input_ids=list(prompt_ids), timings_ms=timings, cached=cached,
            logits=None if logits is None else logits.numpy().astype(np.float32),
            seg_embeddings=prompts.numpy().astype(np.float32),
            output_ids=[int(t) for t in output_ids])

    @torch.inference_mode()
    def _generate(self, feats: FrameFeatures, enc_ms: dict[str, float], cached: bool, query: str,
                  history: Sequence[tuple[str, str]], mode: str, max_new_tokens: int,
                  return_logits: bool) -> SegmentationResult:
        with self._lock, self._on_device():
            timer = _Timer(self.device)
            prompt = self._prompt(query, history)
            prompt_ids = self.tokenizer.encode_prompt(prompt)
            room = self._room(feats, query, len(prompt_ids))
            max_new_tokens = min(max_new_tokens, room)  # the answer ends where the model's context does
            ids = torch.tensor([prompt_ids], device=self.device)
            t_tok = timer.lap()
            budget = self._mask_budget(feats)
            if mode == "chat":
                generated, seg_states = self._greedy(ids, feats, max_new_tokens, max_segs=budget)
            else:
                generated, seg_states = greedy_reference(self.model, ids, feats.clip_pixels, max_new_tokens,
                                                         eos=self.eos_token_id, seg=self.seg_token_id, max_segs=budget)
            t_llm = timer.lap()
            logits, masks, scores, prompts_out, t_dec, t_post = self._masks(feats, seg_states, return_logits)
            text = _clean(self.tokenizer.decode(generated))
            timings = {**enc_ms, "tokenize": t_tok, "llm": t_llm, "decoder": t_dec, "postprocess": t_post}
            if self._declines(scores):
                generated, text, timings["decline"] = self._decline(feats, query, history, max_new_tokens)
                keep = torch.zeros(len(scores), dtype=torch.bool)
                logits = None if logits is None else logits[keep]
                masks, scores, prompts_out = masks[keep], scores[keep], prompts_out[keep]
            return self._result(feats, cached, query, mode, prompt, prompt_ids, generated, text, logits, masks,
                                scores, prompts_out, timings)


def _upload(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``: through pinned memory, without blocking, on CUDA."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _clean(text: str) -> str:
    return text.replace("\n", "").replace("  ", " ").strip()


def _check_gate(gate: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate a presence gate ``{"threshold": float in (0, 1), "decline_prefix": str}`` (None: no gate)."""
    if gate is None:
        return None
    if not isinstance(gate, dict):
        raise InvalidArgumentError(f"presence_gate must be a dict, got {type(gate).__name__}")
    threshold = gate.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) < 1.0:
        raise InvalidArgumentError(f"presence threshold must be a number in (0, 1); got {threshold!r}")
    prefix = gate.get("decline_prefix", "Sorry,")
    if not isinstance(prefix, str) or not prefix.strip() or SEG_TOKEN in prefix:
        raise InvalidArgumentError(f"decline_prefix must be non-empty text without [SEG]; got {prefix!r}")
    return {"threshold": float(threshold), "decline_prefix": prefix.strip()}
