"""The result of one LISA query: masks, per-mask statistics and 3D targets, answer text, prompt and timings.

:meth:`SegmentationResult.to_dict` is the one result schema every door emits (the CLI's ``--json``,
the server's replies, the bag tool's and the ROS node's ``result`` messages, the LangChain tool's
artifact); it is documented in ``docs/result.md`` and validated against
``lisa_agent/schemas/result.schema.json`` (:data:`RESULT_SCHEMA_PATH`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .encoders import (
    label_image,
    mask_bbox,
    mask_centroid,
    mask_to_rle,
    render_overlay,
    rle_to_mask,
)
from .frames import Stamp
from .geometry import Target, frame_targets

if TYPE_CHECKING:  # pragma: no cover
    from .frames import Frame

#: Version of the result schema (``schema_version`` in every result dict).
RESULT_SCHEMA_VERSION = 1
#: The JSON Schema (draft 2020-12) of :meth:`SegmentationResult.to_dict`.
RESULT_SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "result.schema.json"


@dataclass(frozen=True)
class MaskInstance:
    """Statistics of one mask.

    Attributes:
        bbox: tight box, XYXY inclusive pixel coordinates of the original frame.
        area: number of mask pixels.
        centroid: (x, y) mean pixel position.
        score: the SAM mask decoder's IoU prediction for this mask; for checkpoints with a presence gate
            (see :mod:`lisa_agent.engine.segmenter`) the probability that the mask's target is in the frame.
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


@dataclass(frozen=True)
class TrackInfo:
    """How a stream result was made (``SegmentationResult.track``; the result schema's ``track``).

    Attributes:
        source: ``reasoned`` (LISA ran on this frame) or ``tracked`` (carried from its last reasoning).
        tracker: the tracker's name.
        age_frames: frames since the reasoning step the masks come from (0 when reasoned).
        age_s: seconds since it (from the frames' stamps when both have one, else wall time).
        confidence: per mask, the tracker's confidence in [0, 1] (1.0 for reasoned masks).
        reasoned_stamp: the stamp of the frame LISA reasoned on, or None.
    """

    source: str
    tracker: str
    age_frames: int
    age_s: float
    confidence: tuple[float, ...]
    reasoned_stamp: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "tracker": self.tracker, "age_frames": int(self.age_frames),
                "age_s": round(float(self.age_s), 4), "confidence": [round(float(c), 4) for c in self.confidence],
                "reasoned_stamp": self.reasoned_stamp}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrackInfo:
        return cls(source=str(d["source"]), tracker=str(d["tracker"]), age_frames=int(d["age_frames"]),
                   age_s=float(d["age_s"]), confidence=tuple(float(c) for c in d["confidence"]),
                   reasoned_stamp=d.get("reasoned_stamp"))


@dataclass(frozen=True)
class MaskPrompt:
    """What prompted SAM for one mask of a reasoner backend (the result schema's per-mask ``prompts``).

    Attributes:
        box: (x1, y1, x2, y2) ints, frame pixels (the box the model wrote, mapped back and clipped).
        points: positive points (x, y) ints, frame pixels.
    """

    box: tuple[int, int, int, int]
    points: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"box": [int(v) for v in self.box], "points": [[int(x), int(y)] for x, y in self.points]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskPrompt:
        return cls(box=tuple(int(v) for v in d["box"]),  # type: ignore[arg-type]
                   points=tuple((int(p[0]), int(p[1])) for p in d.get("points", ())))


@dataclass(frozen=True)
class ReasoningInfo:
    """How a reasoner backend's answer read (the result schema's optional ``reasoning``; None for LISA).

    Attributes:
        think: the reasoning the model wrote inside ``<think>``; "" when it wrote none.
        answer: the text inside ``<answer>`` as written (coordinates of the model's square input).
        status: ``ok``, ``partial``, ``empty`` (the model listed no object), ``malformed`` or ``no_answer``
            (:mod:`lisa_agent.reasoner.parsing`).
        notes: what the answer parser dropped or changed (clipped coordinates, unreadable items).
        style: the prompt style (``vision_reasoner`` or ``seg_zero``).
    """

    think: str
    answer: str
    status: str
    notes: tuple[str, ...] = ()
    style: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"think": self.think, "answer": self.answer, "status": self.status, "notes": list(self.notes),
                "style": self.style}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReasoningInfo:
        return cls(think=str(d.get("think", "")), answer=str(d.get("answer", "")), status=str(d.get("status", "")),
                   notes=tuple(str(n) for n in d.get("notes", ())), style=str(d.get("style", "")))


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
        frame_id: the frame's name as the caller gave it (:attr:`Frame.frame_id <lisa_agent.frames.Frame>`).
        stamp: when the frame was taken (:class:`~lisa_agent.frames.Stamp`), as the caller gave it.
        cached: the frame's image features were already computed (a handle, or the same pixels
            again): the encoder timings are then zero and ``digest`` is the lookup's cost.
        targets: per mask a :class:`~lisa_agent.geometry.Target` (median depth, 3D point) or None
            where the mask has no valid depth; None when the frame came without depth or its depth
            was refused.
        depth_note: why targets are missing (depth refused, intrinsics unknown, ...), else None.
        track: for results of a stream (:class:`lisa_agent.tracking.StreamSegmenter`, :class:`TrackInfo`): ``reasoned`` or
            ``tracked``, the tracker, the age of the reasoning step and per-mask confidence; else None.
        reasoning: a reasoner backend's reasoning and answer (:class:`ReasoningInfo`); None for LISA.
        prompts: per mask, the SAM prompts it came from (:class:`MaskPrompt`: box and points; several for a
            reasoner's union mask); None for LISA.
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
    stamp: Stamp | None = None
    cached: bool = False
    targets: list[Target | None] | None = None
    depth_note: str | None = None
    track: TrackInfo | None = None
    reasoning: ReasoningInfo | None = None
    prompts: list[tuple[MaskPrompt, ...]] | None = None

    @classmethod
    def from_masks(cls, masks: np.ndarray, scores: Sequence[float], **kwargs: Any) -> SegmentationResult:
        """Build a result from N x H x W bool masks and their decoder scores; statistics computed here."""
        masks = np.asarray(masks, dtype=bool)
        instances = [
            MaskInstance(bbox=mask_bbox(m), area=int(m.sum()), centroid=mask_centroid(m), score=float(s))
            for m, s in zip(masks, scores, strict=True)
        ]
        return cls(masks=masks, instances=instances, **kwargs)

    @classmethod
    def from_frame(cls, frame: Frame, masks: np.ndarray, scores: Sequence[float], **kwargs: Any) -> SegmentationResult:
        """Build the result of a query on ``frame``: its size, id and stamp carried over and, when it
        has depth, the masks' 3D targets (:func:`~lisa_agent.geometry.frame_targets`)."""
        targets, note = frame_targets(frame, masks)
        return cls.from_masks(masks, scores, image_size=frame.size, frame_id=frame.frame_id, stamp=frame.stamp,
                              targets=targets, depth_note=note, **kwargs)

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def empty(self) -> bool:
        """True when the answer has no ``[SEG]`` (nothing was segmented)."""
        return len(self.instances) == 0

    def to_dict(self, include_rle: bool = True) -> dict[str, Any]:
        """The result schema (``docs/result.md``): JSON-ready, identical in every door.

        Keys: ``schema_version``, ``text``, ``query``, ``mode``, ``image_size`` [H, W], ``frame_id``,
        ``stamp`` {sec, nanosec} or null, ``cached``, ``masks`` (per mask ``bbox`` [x1, y1, x2, y2]
        inclusive, ``area``, ``centroid`` [x, y], ``score``, ``target`` {depth_m, point, pixel,
        valid_pixels} or null, and ``rle`` unless ``include_rle`` is False), ``depth_note``, ``track``
        (null outside a stream) and ``timings_ms``; a reasoner backend's results add ``reasoning`` and per mask
        ``prompts`` (absent otherwise). Doors add their own envelope keys beside these, never inside.
        """
        masks = []
        for k, inst in enumerate(self.instances):
            d = inst.to_dict()
            target = self.targets[k] if self.targets is not None else None
            d["target"] = None if target is None else target.to_dict()
            if self.prompts is not None:
                d["prompts"] = [p.to_dict() for p in self.prompts[k]]
            if include_rle:
                d["rle"] = mask_to_rle(self.masks[k])
            masks.append(d)
        out: dict[str, Any] = {
            "schema_version": RESULT_SCHEMA_VERSION,
            "text": self.text,
            "query": self.query,
            "mode": self.mode,
            "image_size": [int(self.image_size[0]), int(self.image_size[1])],
            "frame_id": self.frame_id,
            "stamp": None if self.stamp is None else self.stamp.to_dict(),
            "cached": bool(self.cached),
            "masks": masks,
            "depth_note": self.depth_note,
            "track": None if self.track is None else self.track.to_dict(),
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
        }
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning.to_dict()
        return out

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
        prompts = None
        if entries and all("prompts" in m for m in entries):
            prompts = [tuple(MaskPrompt.from_dict(p) for p in m["prompts"]) for m in entries]
        targets: list[Target | None] | None = None
        if any(m.get("target") is not None for m in entries):
            targets = [None if m.get("target") is None else Target.from_dict(m["target"]) for m in entries]
        return cls(masks=masks, instances=instances, text=d.get("text", ""), query=d.get("query", ""),
                   mode=d.get("mode", ""), image_size=(h, w), timings_ms=dict(d.get("timings_ms", {})),
                   frame_id=d.get("frame_id"), stamp=Stamp.of(d.get("stamp")), cached=bool(d.get("cached", False)),
                   targets=targets, depth_note=d.get("depth_note"),
                   track=None if d.get("track") is None else TrackInfo.from_dict(d["track"]),
                   reasoning=None if d.get("reasoning") is None else ReasoningInfo.from_dict(d["reasoning"]),
                   prompts=prompts)

    def label_mask(self) -> np.ndarray:
        """H x W uint8 label image: 0 background, k+1 where mask k is (later masks win)."""
        return label_image(self.masks) if len(self.masks) else np.zeros(self.image_size, dtype=np.uint8)

    def overlay(self, image: np.ndarray, labels: Sequence[str] | None = None) -> np.ndarray:
        """Masks tinted over ``image`` (HxWx3 uint8 RGB) with outlines, boxes and labels."""
        if labels is None:
            labels = [f"{k}: {inst.score:.2f}" for k, inst in enumerate(self.instances)]
        return render_overlay(image, self.masks, [i.bbox for i in self.instances], labels)
