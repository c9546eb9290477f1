"""Per-frame image features: computed once, queried many times.

:meth:`LisaSegmenter.encode(frame) <lisa_agent.engine.segmenter.LisaSegmenter.encode>` returns a
:class:`FrameFeatures` handle (SAM's image embedding of the frame and of its mirrored views, CLIP's
projected patch tokens); pass it to ``segment`` / ``segment_batch`` in place of the frame and nothing
is hashed, preprocessed or encoded again. Frames passed as pixels are looked up in a small LRU
:class:`FeatureCache` keyed by :func:`frame_digest`, a digest of the pixels themselves: features are
never served for other pixels than they were computed from, whatever ids callers give their frames.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import xxhash

from ..frames import Frame


def frame_digest(rgb: np.ndarray) -> str:
    """Content key of an HxWx3 uint8 frame: 128-bit xxh3 of its shape and every pixel (~0.2 ms at 1080p)."""
    h = xxhash.xxh3_128()
    h.update(repr(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).data.cast("B"))
    return "xxh3:" + h.hexdigest()


@dataclass
class FrameFeatures:
    """Image-encoder outputs of one frame, reusable by any number of queries (a handle).

    Attributes:
        key: :func:`frame_digest` of the pixels.
        frame: the :class:`~lisa_agent.frames.Frame` they were encoded from (its id, stamp and depth
            go into each result).
        resized_hw: size of the SAM letterbox content before padding.
        sam_embedding: (V, C, S/16, S/16) SAM image embeddings of the frame (index 0) and, with mask
            test-time augmentation, of its mirrored views (in the order of
            ``lisa_agent.config.MASK_TTA_VIEWS[mask_tta]``).
        image_tokens: (1, N, H) projected CLIP patch features (LLM input).
        clip_pixels: (1, 3, s, s) CLIP input (kept for ``reference`` mode, which re-encodes per token).
        encode_ms: what computing them cost: ``digest``, ``preprocess``, ``sam_encoder``, ``clip``.
        views: the mirrored views encoded, as (flip rows, flip columns) pairs.
        sam_ready: on CUDA with overlap, the event marking ``sam_embedding`` computed (on SAM's own
            stream); wait for it before reading the embedding. None otherwise.
    """

    key: str
    frame: Frame
    resized_hw: tuple[int, int]
    sam_embedding: torch.Tensor
    image_tokens: torch.Tensor
    clip_pixels: torch.Tensor
    encode_ms: dict[str, float] = field(default_factory=dict)
    views: tuple[tuple[bool, bool], ...] = ((False, False),)
    sam_ready: torch.cuda.Event | None = None

    @property
    def original_hw(self) -> tuple[int, int]:
        """(H, W) of the frame."""
        return self.frame.size

    def for_frame(self, frame: Frame) -> FrameFeatures:
        """The same features for another :class:`Frame` with the same pixels (its own id, stamp, depth)."""
        return replace(self, frame=frame)


class FeatureCache:
    """A thread-safe LRU of :class:`FrameFeatures` by :func:`frame_digest`, at most ``size`` frames."""

    def __init__(self, size: int) -> None:
        self.size = max(1, int(size))
        self._items: OrderedDict[str, FrameFeatures] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> FrameFeatures | None:
        with self._lock:
            feats = self._items.get(key)
            if feats is not None:
                self._items.move_to_end(key)
            return feats

    def put(self, feats: FrameFeatures) -> None:
        with self._lock:
            self._items[feats.key] = feats
            self._items.move_to_end(feats.key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def mirrored_views(pixels: torch.Tensor, resized_hw: tuple[int, int],
                   views: Sequence[tuple[bool, bool]]) -> torch.Tensor:
    """SAM inputs of the mirrored views: (1, 3, S, S) letterboxed frame -> (V, 3, S, S).

    The letterbox content (the top-left ``resized_hw``) is flipped in place of re-preprocessing each
    mirrored frame: bilinear resizing commutes with mirroring, so this equals ``sam_preprocess`` of the
    mirrored frame exactly (padding stays at the bottom and right, as SAM saw it in training)."""
    if len(views) == 1:
        return pixels
    h, w = resized_hw
    out = pixels.repeat(len(views), 1, 1, 1)
    for k, flip in enumerate(views):
        out[k, :, :h, :w] = mirror(pixels[0, :, :h, :w], flip)
    return out


def mirror(x: torch.Tensor, flip: tuple[bool, bool]) -> torch.Tensor:
    """``x`` (..., H, W) flipped along H and/or W (``flip`` = (rows, cols)); itself when unflipped. Its own
    inverse: the same call maps a mirrored view's output back onto the frame."""
    dims = [d for d, f in zip((-2, -1), flip, strict=True) if f]
    return x.flip(dims) if dims else x
