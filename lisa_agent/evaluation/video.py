"""How well masks follow the target through a video, and what it costs per frame.

For each sequence (:mod:`lisa_agent.data.video`) a :class:`~lisa_agent.tracking.StreamSegmenter` runs
over every frame in order (reasoning synchronously, so the result does not depend on the machine's
speed); a frame's IoU is that of the union of its masks with the union of the targets' ground truth.
``tracker="none", reason_every=1`` is LISA on every frame: the reference the trackers are measured
against.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import SegmentBackend
from ..data.video import VideoSequence, read_sequence
from ..frames import Frame, Stamp
from ..options import QueryOptions, TrackOptions
from ..tracking import StreamSegmenter

#: Frames per second the sequences stand for (their frames are stamped f / FPS seconds).
FPS = 30.0


def union_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU of the union of ``pred`` (N x H x W) with the union of ``truth`` (K x H x W); 1 when both are empty."""
    p = pred.any(axis=0) if len(pred) else np.zeros(truth.shape[1:], bool)
    t = truth.any(axis=0) if len(truth) else np.zeros(p.shape, bool)
    union = int((p | t).sum())
    return 1.0 if union == 0 else int((p & t).sum()) / union


def evaluate_video(backend: SegmentBackend, sequences: Iterable[VideoSequence | str | Path],
                   track: TrackOptions | None = None, *, query: QueryOptions | None = None) -> dict[str, Any]:
    """``{"mean_iou", "ms_per_frame", "lisa_calls", "frames", "tracker", "reason_every", "per_sequence": [...]}``
    through each sequence with a :class:`~lisa_agent.tracking.StreamSegmenter` of ``track`` and ``query``.

    ``mean_iou`` averages the sequences' mean frame IoUs; ``ms_per_frame`` is the wall time of every
    frame's call (reasoning steps included) over all frames."""
    track = track or TrackOptions()
    per_sequence = []
    total_ms, total_frames, total_calls = 0.0, 0, 0
    for item in sequences:
        seq = item if isinstance(item, VideoSequence) else read_sequence(item)
        stream = StreamSegmenter(backend, track, query=query)
        stream.set_instruction(seq.query)
        ious, sources = [], []
        t0 = time.perf_counter()
        for f, (pixels, truth) in enumerate(zip(seq.frames, seq.masks, strict=True)):
            result = stream.process(Frame(pixels, frame_id=seq.name, stamp=Stamp.of(f / FPS)))
            assert result is not None  # synchronous: every frame gets an answer
            ious.append(union_iou(result.masks, truth))
            sources.append(result.track.source if result.track is not None else "reasoned")
        ms = (time.perf_counter() - t0) * 1000.0
        total_ms += ms
        total_frames += len(seq.frames)
        total_calls += stream.lisa_calls
        per_sequence.append({"name": seq.name, "query": seq.query, "frames": len(seq.frames),
                             "mean_iou": round(float(np.mean(ious)), 4), "lisa_calls": stream.lisa_calls,
                             "ms_per_frame": round(ms / len(seq.frames), 2),
                             "tracked_frames": sources.count("tracked")})
    return {"mean_iou": round(float(np.mean([s["mean_iou"] for s in per_sequence])), 4) if per_sequence else 0.0,
            "ms_per_frame": round(total_ms / max(total_frames, 1), 2), "lisa_calls": total_calls,
            "frames": total_frames, "tracker": track.tracker, "reason_every": track.reason_every,
            "min_confidence": track.min_confidence, "per_sequence": per_sequence}
