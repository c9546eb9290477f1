"""Frames in, image features out: the encoding half of :class:`~lisa_agent.engine.segmenter.LisaSegmenter`.

:class:`EncodingMixin` turns a frame (a :class:`~lisa_agent.frames.Frame` or HxWx3 uint8 RGB) into its
:class:`~lisa_agent.engine.features.FrameFeatures`: preprocessing (PIL on the CPU, or torch on the device),
SAM's image encoder on the frame and its mirrored views (on its own CUDA stream when overlapping), CLIP's, each
compiled, graphed or eager as the engine's optimizations say; features are kept in an LRU keyed by a digest
of the pixels. It also runs SAM alone for the ``sam`` tracker (:meth:`EncodingMixin.masks_from_prompts`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import InvalidArgumentError
from ..frames import Frame, as_frame
from .device import OnDevice, StageTimer, upload
from .features import FeatureCache, FrameFeatures, frame_digest, mirrored_views
from .preprocess import (
    SamInput,
    clip_preprocess,
    clip_preprocess_tensor,
    sam_preprocess,
    sam_preprocess_tensor,
)

if TYPE_CHECKING:
    from .acceleration import CompiledEncoders, GraphedStages

#: what a call may pass as its image: pixels, a Frame, or features already encoded
ImageInput = np.ndarray | Frame | FrameFeatures


class EncodingMixin(OnDevice):
    """The frame side of the engine. Its class sets the attributes below: the SAM and CLIP input sizes, the
    mirrored views, the feature cache, the lock, and the optimizations' encoders and stream."""

    presence_gate: dict[str, Any] | None
    sam_size: int
    clip_size: int
    device_preprocess: bool
    _views: tuple[tuple[bool, bool], ...]
    _cache: FeatureCache
    _lock: threading.RLock
    _stages: GraphedStages | None
    _compiled: CompiledEncoders | None
    _sam_stream: torch.cuda.Stream | None

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
        timer = StageTimer(self.device)
        key = frame_digest(frame.rgb)
        t_digest = timer.lap()
        with self._lock, torch.inference_mode(), self._on_device():
            cached = self._cache.get(key)
            if cached is not None:
                return cached.for_frame(frame), {**zero, "digest": t_digest}, True
            timer = StageTimer(self.device)
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
            frame = upload(torch.from_numpy(host), self.device).permute(2, 0, 1)[None]
            return (sam_preprocess_tensor(frame, self.sam_size),
                    clip_preprocess_tensor(frame, self.clip_size) if clip else None)
        sam_in = sam_preprocess(rgb, self.sam_size)
        sam_in = SamInput(upload(sam_in.pixels, self.device), sam_in.resized_hw, sam_in.original_hw)
        return sam_in, upload(clip_preprocess(rgb, self.clip_size), self.device) if clip else None

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
