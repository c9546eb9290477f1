"""The result of one LISA query: masks, per-mask statistics, answer text, prompt and timings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encoders import (
    label_image,
    mask_bbox,
    mask_centroid,
    mask_to_png,
    mask_to_rle,
    render_overlay,
    rle_to_mask,
)


@dataclass(frozen=True)
class MaskInstance:
    """Statistics of one mask.

    Attributes:
        bbox: tight box, XYXY inclusive pixel coordinates of the original frame.
        area: number of mask pixels.
        centroid: (x, y) mean pixel position.
        score: the SAM mask decoder's IoU prediction for this mask; for checkpoints with a presence gate
            (see :mod:`lisa_agent.segmenter`) the probability that the mask's target is in the frame.
    """

    bbox: tuple[int, int, int, int]
    area: int
    centroid: tuple[float, float]
    score: float

    def to_dict(self) -> dict[str, Any]:
        cx, cy = self.centroid
        return {
            "bbox": [int(v) for v in self.bbox],
            "area": int(self.area),
            "centroid": [None if math.isnan(cx) else round(cx, 2), None if math.isnan(cy) else round(cy, 2)],
            "score": round(float(self.score), 4),
        }


@dataclass
class SegmentationResult:
    """Everything one query produced.

    Attributes:
        masks: N x H x W bool, one mask per ``[SEG]`` in the answer, at the original frame size.
        instances: N :class:`MaskInstance`, aligned with ``masks``.
        text: LISA's answer (text after ``ASSISTANT:``), ``[SEG]`` tokens included.
        query: the instruction as given.
        mode: ``fast``, ``chat`` or ``reference``.
        prompt: the exact prompt string fed to the tokenizer (template applied).
        input_ids: token ids of that prompt (image placeholder as -200), answer ids excluded.
        image_size: (H, W) of the frame.
        timings_ms: per-stage wall time in milliseconds (``total`` included).
        logits: N x H x W float32 mask logits at the original size (``return_logits=True`` only).
        seg_embeddings: N x D float32 prompt embeddings sent to the mask decoder (D = 256 for
            published checkpoints; ``return_logits=True`` only).
        output_ids: generated / forced answer token ids.
        frame_id: the frame key used for the feature cache.
        mask_depths: per mask ``{"depth_m": float | None, "point": [x, y, z] | None}`` in metres in the
            camera frame, aligned with ``masks``; set by :class:`~lisa_agent.serving.client.LisaClient`
            when a depth frame was sent, else None.
    """

    masks: np.ndarray
    instances: list[MaskInstance]
    text: str
    query: str
    mode: str
    prompt: str = ""
    input_ids: list[int] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)
    timings_ms: dict[str, float] = field(default_factory=dict)
    logits: np.ndarray | None = None
    seg_embeddings: np.ndarray | None = None
    output_ids: list[int] = field(default_factory=list)
    frame_id: str | None = None
    mask_depths: list[dict[str, Any]] | None = None

    @classmethod
    def from_masks(cls, masks: np.ndarray, scores: Sequence[float], **kwargs: Any) -> SegmentationResult:
        """Build a result from N x H x W bool masks and their decoder scores; statistics computed here."""
        masks = np.asarray(masks, dtype=bool)
        instances = [
            MaskInstance(bbox=mask_bbox(m), area=int(m.sum()), centroid=mask_centroid(m), score=float(s))
            for m, s in zip(masks, scores, strict=True)
        ]
        return cls(masks=masks, instances=instances, **kwargs)

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def empty(self) -> bool:
        """True when the answer has no ``[SEG]`` (nothing was segmented)."""
        return len(self.instances) == 0

    def to_dict(self, include_rle: bool = True) -> dict[str, Any]:
        """JSON-ready dict: ``text``, ``masks`` (bbox, area, centroid, score[, rle]), ``timings_ms``, ...

        This is the object ``lisa-agent segment --json`` prints and the server sends.
        """
        masks = []
        for k, inst in enumerate(self.instances):
            d = inst.to_dict()
            if include_rle:
                d["rle"] = mask_to_rle(self.masks[k])
            if self.mask_depths is not None:
                d.update(self.mask_depths[k])
            masks.append(d)
        return {
            "text": self.text,
            "query": self.query,
            "mode": self.mode,
            "image_size": [int(self.image_size[0]), int(self.image_size[1])],
            "masks": masks,
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentationResult:
        """Inverse of :meth:`to_dict` (masks decoded from their RLE)."""
        h, w = (int(v) for v in d.get("image_size", (0, 0)))
        entries = d.get("masks", [])
        masks = (np.stack([rle_to_mask(m["rle"]) for m in entries]) if entries
                 else np.zeros((0, h, w), dtype=bool))
        instances = [
            MaskInstance(
                bbox=tuple(int(v) for v in m["bbox"]),  # type: ignore[arg-type]
                area=int(m["area"]),
                centroid=tuple(float("nan") if v is None else float(v) for v in m["centroid"]),  # type: ignore[arg-type]
                score=float(m["score"]),
            )
            for m in entries
        ]
        return cls(masks=masks, instances=instances, text=d.get("text", ""), query=d.get("query", ""),
                   mode=d.get("mode", ""), image_size=(h, w), timings_ms=dict(d.get("timings_ms", {})))

    def label_mask(self) -> np.ndarray:
        """H x W uint8 label image: 0 background, k+1 where mask k is (later masks win)."""
        return label_image(self.masks) if len(self.masks) else np.zeros(self.image_size, dtype=np.uint8)

    def mask_png(self, k: int = 0) -> bytes:
        """PNG bytes of mask ``k`` (0/255 grayscale)."""
        return mask_to_png(self.masks[k])

    def overlay(self, image: np.ndarray, labels: Sequence[str] | None = None) -> np.ndarray:
        """Masks tinted over ``image`` (HxWx3 uint8 RGB) with outlines, boxes and labels."""
        if labels is None:
            labels = [f"{k}: {inst.score:.2f}" for k, inst in enumerate(self.instances)]
        return render_overlay(image, self.masks, [i.bbox for i in self.instances], labels)
