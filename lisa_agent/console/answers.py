"""What the console hands its listeners: frames (:class:`FrameEvent`) and answers (:class:`Answer`), and the
model behind it, one call at a time (:class:`SerialBackend`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..backend import SegmentBackend
from ..frames import Frame
from ..labels import answer_message, is_declined
from ..result import SegmentationResult


@dataclass(frozen=True)
class FrameEvent:
    """A frame as the console hands it to listeners: the source's number, the frame, its JPEG bytes."""

    seq: int
    frame: Frame
    jpeg: bytes


@dataclass
class Answer:
    """One answer the console shows: the model's result for one frame and the console's envelope.

    Attributes:
        request: the instruction's number (1, 2, ...); continuous answers carry their instruction's.
        origin: ``instruction`` (the model answered this instruction on this frame), ``continuous`` (a frame
            of the continuous stream: reasoned or tracked, see ``result.track``) or ``tracked`` (the last
            answer's masks carried to a newer frame with the switch off).
        frame_seq: the source's number of the frame the masks are for.
        frame: that frame.
        result: the model's result.
        labels: a short name per mask, from the answer's words before each ``[SEG]`` (``mask k`` when
            the answer names nothing, as in fast mode).
        latency_ms: instruction: from the request's arrival to the answer; continuous: from the frame's
            arrival to its masks.
        model_ms: the model's own time for the reasoning step these masks come from (``timings_ms`` of a
            tracked frame are the tracker's).
    """

    request: int
    origin: str
    frame_seq: int
    frame: Frame
    result: SegmentationResult
    labels: list[str]
    latency_ms: float
    model_ms: float | None = None
    created: float = field(default_factory=time.time)

    @property
    def declined(self) -> bool:
        """The model said no: an answer starting "Sorry" with no mask (the presence gate's refusal)."""
        return is_declined(self.result)

    @property
    def message(self) -> str | None:
        """What the page shows beside the answer when there is no mask to show, else None."""
        return answer_message(self.result)

    def to_dict(self, target: int | None = None, include_rle: bool = True) -> dict[str, Any]:
        """The result schema (``SegmentationResult.to_dict``) plus the console's envelope keys."""
        out = self.result.to_dict(include_rle=include_rle)
        out.update({"request": self.request, "origin": self.origin, "frame_seq": self.frame_seq,
                    "labels": list(self.labels), "declined": self.declined, "message": self.message,
                    "latency_ms": round(float(self.latency_ms), 1), "target": target,
                    "model_ms": None if self.model_ms is None else round(float(self.model_ms), 1)})
        return out


class SerialBackend:
    """The model with one call at a time (the engine is not re-entrant; a ZeroMQ socket neither)."""

    def __init__(self, backend: SegmentBackend, lock: threading.Lock) -> None:
        self.backend = backend
        self.lock = lock
        #: ``timings_ms["total"]`` of the last call (the continuous stream's reasoning steps report it)
        self.last_total_ms: float | None = None

    def segment(self, image: Any, query: str, options: Any = None, **kwargs: Any) -> SegmentationResult:
        with self.lock:
            result = self.backend.segment(image, query, options=options, **kwargs)
            self.last_total_ms = result.timings_ms.get("total")
            return result

    def info(self) -> dict[str, Any]:
        return self.backend.info()
