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

This module holds the engine's construction, its optimization switches and its public queries; the frame
side (preprocessing, image encoders, the feature cache) is :mod:`~lisa_agent.engine.encoding`, the language
side (prompts, the LLM passes, ``[SEG]`` to masks, the presence gate's decline) :mod:`~lisa_agent.engine.answering`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
import torch

from ..config import MASK_TTA_VIEWS, EngineConfig
from ..errors import InvalidArgumentError, InvalidQueryError
from ..frames import check_query
from ..options import MODES, QueryOptions, check_answer
from ..result import SegmentationResult
from .acceleration import CompiledEncoders, GraphCapturer, GraphedStages, StaticDecoder
from .answering import DECLINE_MAX_TOKENS, AnsweringMixin, check_presence_gate
from .device import resolve_precision
from .encoding import EncodingMixin, ImageInput
from .features import FeatureCache, FrameFeatures
from .loading import load_lisa, resolve_checkpoint
from .modeling.lisa import LisaModel
from .prompts import DEFAULT_ANSWER, SEG_TOKEN, get_template
from .quantization import resolve_quant_backend
from .tokenization import LisaTokenizer

#: ``ImageInput`` and ``DECLINE_MAX_TOKENS`` live in encoding / answering; still importable from here.
__all__ = ["DECLINE_MAX_TOKENS", "Conversation", "ImageInput", "LisaSegmenter", "OptimizationSwitches",
           "optimization_switches"]


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


class LisaSegmenter(EncodingMixin, AnsweringMixin):
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
        self.presence_gate = check_presence_gate(presence_gate)
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
