"""Masks at camera rate: a tracker carries LISA's masks from one reasoning step to the next.

A camera gives 30 frames a second; LISA answers a few times a second on a robot's GPU and far slower on
a CPU. :class:`StreamSegmenter` runs LISA (any :class:`~lisa_agent.frames.SegmentBackend`) when the
instruction changes, every ``reason_every`` frames or ``reason_period_s`` seconds, or when the tracker's
confidence drops below ``min_confidence``, and a :class:`Tracker` gives every frame in between a mask:

- ``flow`` (:class:`FlowTracker`): pyramidal Lucas-Kanade optical flow of corner points inside each
  mask, a similarity transform fitted with RANSAC, the mask warped by it. A few milliseconds a frame on
  a CPU; confidence is the share of points that move together (occlusion and lighting lower it).
- ``sam`` (:class:`SamTracker`): the loaded model's own SAM, prompted on each new frame with the
  ``[SEG]`` prompt embeddings of the last reasoning step (what the decoder was told to segment): one SAM
  encoder pass per frame (the frame itself, no mirrored views), no CLIP, no language model. Confidence
  is the decoder's score (the presence probability for gated checkpoints). Needs the in-process engine.
- ``none`` (:class:`HoldTracker`): the last reasoned masks, unchanged (what a node without tracking
  publishes): the baseline.

Every output is a :class:`~lisa_agent.result.SegmentationResult` for that frame (its size, id, stamp and
depth targets), marked in ``result.track`` as ``reasoned`` or ``tracked`` with the age of its reasoning
step. When LISA reasons again, its new masks are put in the order of the masks tracked so far (matched by
overlap), so instance ``k`` stays the same object across re-seeding.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from .backend import SegmentBackend
from .errors import InvalidArgumentError
from .frames import Frame, as_frame, check_query
from .options import INTERACTIVE_MODES, TRACKERS, QueryOptions, TrackOptions
from .result import MaskPrompt, SegmentationResult, TrackInfo

if TYPE_CHECKING:  # pragma: no cover
    from .engine.segmenter import LisaSegmenter

class Tracker(Protocol):
    """Carries masks from the frame they were made on to later frames."""

    name: str

    def start(self, frame: Frame, result: SegmentationResult) -> None:
        """Take ``result``'s masks (made on ``frame``) as the ones to follow."""
        ...

    def update(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        """The masks on ``frame`` (N x H x W bool, in the order of ``start``) and per-mask confidence (N,)."""
        ...


class HoldTracker:
    """``none``: the reasoned masks, held unchanged (confidence 1): the no-tracking baseline."""

    name = "none"

    def __init__(self) -> None:
        self._masks = np.zeros((0, 1, 1), bool)

    def start(self, frame: Frame, result: SegmentationResult) -> None:
        self._masks = np.asarray(result.masks, dtype=bool)

    def update(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        h, w = frame.size
        if self._masks.shape[1:] != (h, w):
            masks = np.stack([cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
                              for m in self._masks]) if len(self._masks) else np.zeros((0, h, w), bool)
        else:
            masks = self._masks.copy()
        return masks, np.ones(len(masks), np.float32)


class FlowTracker:
    """``flow``: Lucas-Kanade optical flow of corners in each mask, a RANSAC similarity, the mask warped.

    Each mask is warped from the frame LISA made it on by the composition of the frame-to-frame
    transforms (warping the previous frame's mask instead would round sub-pixel motion away, frame
    after frame). Corners are found afresh on every frame inside the current mask.

    Args:
        max_points: corners tracked per mask.
        min_points: fewer surviving points than this and the mask stays where it was, with confidence 0.
        forward_backward_px: a point is kept when tracking it back lands within this many pixels.
    """

    name = "flow"

    def __init__(self, max_points: int = 120, min_points: int = 6, forward_backward_px: float = 1.0) -> None:
        self.max_points = max_points
        self.min_points = min_points
        self.fb = forward_backward_px
        self._gray: np.ndarray | None = None
        self._seeds = np.zeros((0, 1, 1), bool)  # the masks as LISA made them
        self._warps: list[np.ndarray] = []  # per mask, 3x3 seed frame -> previous frame
        self._masks = np.zeros((0, 1, 1), bool)  # per mask, on the previous frame
        self._lk = {"winSize": (11, 11), "maxLevel": 3,
                    "criteria": (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03)}

    @staticmethod
    def _grey(frame: Frame) -> np.ndarray:
        return cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2GRAY)

    def start(self, frame: Frame, result: SegmentationResult) -> None:
        self.reseed(frame, result.masks)

    def reseed(self, frame: Frame | None, masks: np.ndarray) -> None:
        """Follow ``masks`` (N x H x W bool, made on ``frame``) from now on; ``frame`` None: on the frame of the
        last :meth:`update` (its grey image is kept, not computed again)."""
        if frame is not None:
            self._gray = self._grey(frame)
        self._seeds = np.asarray(masks, dtype=bool)
        self._masks = self._seeds.copy()
        self._warps = [np.eye(3) for _ in range(len(self._seeds))]

    def _motion(self, prev: np.ndarray, gray: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray | None, float]:
        """The 2x3 similarity that moves ``mask``'s corners from ``prev`` to ``gray``, and the share of
        corners that agree with it (None, 0 when too few corners can be followed)."""
        pts = cv2.goodFeaturesToTrack(prev, self.max_points, 0.001, 3, mask=mask.astype(np.uint8), blockSize=5)
        if pts is None or len(pts) < self.min_points:
            return None, 0.0
        new, status, _ = cv2.calcOpticalFlowPyrLK(prev, gray, pts, None, **self._lk)  # type: ignore[call-overload]
        back, status_back, _ = cv2.calcOpticalFlowPyrLK(gray, prev, new, None, **self._lk)  # type: ignore[call-overload]
        good = (status[:, 0] == 1) & (status_back[:, 0] == 1) & \
            (np.linalg.norm((back - pts)[:, 0], axis=1) < self.fb)
        if int(good.sum()) < self.min_points:
            return None, 0.0
        matrix, inliers = cv2.estimateAffinePartial2D(pts[good], new[good], method=cv2.RANSAC,
                                                      ransacReprojThreshold=1.0)
        if matrix is None:
            return None, 0.0
        return matrix, float(inliers.sum()) / float(len(pts))

    def update(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        gray = self._grey(frame)
        prev = self._gray
        h, w = gray.shape
        n = len(self._seeds)
        if prev is None or prev.shape != gray.shape or not n:
            self._gray = gray
            return np.zeros((n, h, w), bool), np.zeros(n, np.float32)
        out = self._masks.copy()
        conf = np.zeros(n, np.float32)
        for k in range(n):
            if not self._masks[k].any():
                continue
            matrix, conf[k] = self._motion(prev, gray, self._masks[k])
            if matrix is None:
                continue
            self._warps[k] = np.vstack([matrix, [0.0, 0.0, 1.0]]) @ self._warps[k]
            out[k] = cv2.warpAffine(self._seeds[k].astype(np.uint8), self._warps[k][:2], (w, h),
                                    flags=cv2.INTER_NEAREST) > 0
        self._gray, self._masks = gray, out
        return out.copy(), conf


class SamTracker:
    """``sam``: the engine's SAM prompted on each frame with the last reasoning step's ``[SEG]`` prompts."""

    name = "sam"

    def __init__(self, engine: LisaSegmenter) -> None:
        if not callable(getattr(engine, "masks_from_prompts", None)):
            raise InvalidArgumentError("the sam tracker needs the in-process engine (LisaSegmenter): a remote "
                                       "client has no SAM to prompt; use tracker='flow'")
        self.engine = engine
        self._prompts = np.zeros((0, 1), np.float32)

    def start(self, frame: Frame, result: SegmentationResult) -> None:
        if result.seg_embeddings is None and len(result):
            raise InvalidArgumentError("the sam tracker needs the result's seg_embeddings (an in-process engine "
                                       "result)")
        self._prompts = np.zeros((0, 1), np.float32) if result.seg_embeddings is None else result.seg_embeddings

    def update(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        masks, scores = self.engine.masks_from_prompts(frame, self._prompts)
        return masks, np.clip(scores, 0.0, 1.0)


def prompt_from_mask(mask: np.ndarray, margin: float = 0.1) -> MaskPrompt | None:
    """A SAM box-and-point prompt for ``mask`` (H x W bool): its tight box grown by ``margin`` of its width and
    height on each side (clipped into the frame) and its most interior pixel as the positive point (of the pixels
    farthest from the background, the one nearest their middle). None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    h, w = mask.shape
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    gx, gy = round(margin * (x2 - x1 + 1)), round(margin * (y2 - y1 + 1))
    box = (max(0, x1 - gx), max(0, y1 - gy), min(w - 1, x2 + gx), min(h - 1, y2 + gy))
    inside = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    cy, cx = np.nonzero(inside >= inside.max() - 0.5)  # the ridge; its pixel nearest its middle
    k = int(np.argmin((cx - cx.mean()) ** 2 + (cy - cy.mean()) ** 2))
    return MaskPrompt(box, ((int(cx[k]), int(cy[k])),))


class Sam2Tracker:
    """``sam`` with a reasoner: optical flow carries each mask to the new frame (:class:`FlowTracker`), then the
    reasoner's SAM 2 is prompted with the carried mask's box (grown by ``margin``) and most interior point
    (:func:`prompt_from_mask`) and draws the mask afresh; flow follows SAM 2's masks from there. A mask whose
    SAM 2 score falls below ``min_score`` keeps the flow's mask for that frame. Confidence: SAM 2's predicted IoU
    (0 for a mask flow lost). One SAM 2 encoder pass a frame and one decode per mask; no language model.

    What a reasoner's own prompts cannot do for a moving object (its box stays where the model saw it), the flow
    does; what flow cannot (drift, a mask that slowly loses its shape), SAM 2 does. Not SAM 2's video memory
    (its memory attention over past frames): the image model only, as the reasoner loads it.
    """

    name = "sam"

    def __init__(self, reasoner: Any, margin: float = 0.1, min_score: float = 0.3) -> None:
        if not callable(getattr(reasoner, "masks_from_boxes", None)):
            raise InvalidArgumentError("the sam tracker for a reasoner needs its in-process SAM 2 (ReasonerSegmenter)")
        self.reasoner = reasoner
        self.margin = float(margin)
        self.min_score = float(min_score)
        self.flow = FlowTracker()

    def start(self, frame: Frame, result: SegmentationResult) -> None:
        self.flow.start(frame, result)

    def update(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        carried, _ = self.flow.update(frame)
        conf = np.zeros(len(carried), np.float32)
        prompts = [prompt_from_mask(m, self.margin) for m in carried]
        live = [k for k, p in enumerate(prompts) if p is not None]
        if not live:
            return carried, conf
        masks, scores = self.reasoner.masks_from_boxes(frame, [prompts[k] for k in live])
        out = carried.copy()
        for i, k in enumerate(live):
            conf[k] = float(np.clip(scores[i], 0.0, 1.0))
            if scores[i] >= self.min_score and masks[i].any():
                out[k] = masks[i]
        self.flow.reseed(None, out)  # the frame flow just updated to
        return out, conf


def make_tracker(name: str, backend: Any = None) -> Tracker:
    """The tracker called ``name`` (:data:`TRACKERS`); ``sam`` prompts ``backend``'s own SAM: a LisaSegmenter's
    with its ``[SEG]`` prompts (:class:`SamTracker`), a reasoner's SAM 2 with boxes (:class:`Sam2Tracker`)."""
    if name == "none":
        return HoldTracker()
    if name == "flow":
        return FlowTracker()
    if name == "sam":
        if callable(getattr(backend, "masks_from_boxes", None)):
            return Sam2Tracker(backend)
        return SamTracker(backend)
    raise InvalidArgumentError(f"tracker must be one of {', '.join(TRACKERS)}; got {name!r}")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.logical_or(a, b).sum())
    return int(np.logical_and(a, b).sum()) / union if union else 0.0


def match_order(new: np.ndarray, old: np.ndarray, min_iou: float = 0.05) -> list[int]:
    """The order of ``new`` masks (N x H x W) that keeps instance identity with ``old`` (M x H x W): new
    masks matched (greedily, by overlap) to old ones take those positions, unmatched ones follow."""
    if not len(old) or not len(new) or old.shape[1:] != new.shape[1:]:
        return list(range(len(new)))
    pairs = sorted(((_iou(n, o), i, j) for i, n in enumerate(new) for j, o in enumerate(old)), reverse=True)
    slot: dict[int, int] = {}
    taken: set[int] = set()
    for score, i, j in pairs:
        if score < min_iou:
            break
        if i not in slot and j not in taken:
            slot[i] = j
            taken.add(j)
    matched = sorted(slot, key=lambda i: slot[i])
    return matched + [i for i in range(len(new)) if i not in slot]


def reorder(result: SegmentationResult, order: list[int]) -> SegmentationResult:
    """``result`` with its masks (and everything per mask) in ``order``."""
    if order == list(range(len(result))):
        return result
    pick = np.asarray(order, dtype=int)
    return replace(result, masks=result.masks[pick], instances=[result.instances[i] for i in order],
                   logits=None if result.logits is None else result.logits[pick],
                   seg_embeddings=None if result.seg_embeddings is None else result.seg_embeddings[pick],
                   targets=None if result.targets is None else [result.targets[i] for i in order],
                   prompts=None if result.prompts is None else [result.prompts[i] for i in order])


class Follower:
    """One reasoning step's masks carried to the frames after it by a tracker: the track step of a
    :class:`StreamSegmenter`, and what a door uses to keep an answer's masks on their objects without asking
    the model again (the console with the continuous switch off).

    Args:
        tracker: the tracker to carry the masks with (started here on ``frame``).
        frame: the frame the model answered on.
        result: its answer (text, masks, scores are kept; the masks move).
    """

    def __init__(self, tracker: Tracker, frame: Frame, result: SegmentationResult) -> None:
        tracker.start(frame, result)
        self.tracker, self.frame, self.result = tracker, frame, result
        #: frames carried since the reasoning step
        self.frames = 0
        #: per mask, the tracker's confidence on the last frame carried to
        self.confidence = np.ones(len(result), np.float32)
        self._clock = time.monotonic()

    def seconds_since(self, frame: Frame) -> float:
        """Seconds from the reasoning step's frame to ``frame`` (their stamps when both have one, else wall time)."""
        if self.frame.stamp is not None and frame.stamp is not None:
            return self.frame.stamp.seconds_to(frame.stamp)
        return time.monotonic() - self._clock

    def info(self, frame: Frame, source: str) -> TrackInfo:
        """The :class:`~lisa_agent.result.TrackInfo` of a result on ``frame`` (``reasoned`` or ``tracked``)."""
        reasoned = source == "reasoned"
        stamp = self.frame.stamp
        return TrackInfo(source=source, tracker=self.tracker.name, age_frames=0 if reasoned else self.frames,
                         age_s=0.0 if reasoned else max(0.0, self.seconds_since(frame)),
                         confidence=tuple(1.0 for _ in range(len(self.result))) if reasoned
                         else tuple(float(c) for c in self.confidence),
                         reasoned_stamp=None if stamp is None else stamp.to_dict())

    def follow(self, frame: Frame) -> SegmentationResult:
        """The masks carried to ``frame``: ``track.source`` is ``tracked``; the answer's text and mask scores are
        the reasoning step's, the tracker's confidence is ``track.confidence``."""
        t0 = time.perf_counter()
        masks, confidence = self.tracker.update(frame)
        ms = (time.perf_counter() - t0) * 1000.0
        self.frames += 1
        self.confidence = np.asarray(confidence, np.float32)
        r = self.result
        return SegmentationResult.from_frame(
            frame, masks, [inst.score for inst in r.instances], text=r.text, query=r.query, mode=r.mode,
            prompt=r.prompt, input_ids=r.input_ids, output_ids=r.output_ids, seg_embeddings=r.seg_embeddings,
            cached=False, timings_ms={"track": ms, "total": ms}, track=self.info(frame, "tracked"),
            reasoning=r.reasoning)


class StreamSegmenter:
    """Masks for every frame of a stream: LISA now and then, a tracker in between (see the module docstring).

    Args:
        backend: the model (any :class:`~lisa_agent.backend.SegmentBackend`).
        options: when to reason and what carries the masks in between (:class:`~lisa_agent.options.TrackOptions`;
            None: the defaults).
        query: how the model answers (:class:`~lisa_agent.options.QueryOptions`: ``fast`` or ``chat``).
        tracker: a :class:`Tracker` object to use instead of the one ``options.tracker`` names.
        background: run LISA in a worker thread while the tracker keeps answering every frame (a live
            camera); the masks it brings are carried to the current frame by the tracker. Off: LISA runs
            on the frame that needs it, before :meth:`process` returns (evaluation, recorded data).

    Use: :meth:`set_instruction`, then :meth:`process` on every frame.
    """

    def __init__(self, backend: SegmentBackend, options: TrackOptions | None = None, *,
                 query: QueryOptions | None = None, tracker: Tracker | None = None, background: bool = False) -> None:
        self.options = options or TrackOptions()
        self.query = query or QueryOptions()
        if self.query.mode not in INTERACTIVE_MODES:
            raise InvalidArgumentError(f"a stream's mode must be one of {', '.join(INTERACTIVE_MODES)}; "
                                       f"got {self.query.mode!r}")
        self.backend = backend
        self.tracker = tracker if tracker is not None else make_tracker(self.options.tracker, backend)
        self.background = background
        #: how many times LISA ran (the backend's segment calls)
        self.lisa_calls = 0
        self._instruction: str | None = None
        self._changed = False
        self._follower: Follower | None = None  # the last reasoning step, carried along
        self._previous_masks = np.zeros((0, 1, 1), bool)  # the masks given for the previous frame
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: background: the reasoning step in flight, the frame it is on, its instruction, the frame count then
        self._pending: tuple[concurrent.futures.Future[SegmentationResult], Frame, str, int] | None = None
        self._count = 0  # frames processed

    # ------------------------------------------------------------------ instruction
    def set_instruction(self, text: str | None) -> None:
        """What to segment from the next frame on (None or empty: stop; nothing is segmented)."""
        self._instruction = None if text is None or not str(text).strip() else check_query(text)
        self._changed = True
        self._follower = None
        self._previous_masks = np.zeros((0, 1, 1), bool)

    @property
    def instruction(self) -> str | None:
        return self._instruction

    @property
    def last_reasoned(self) -> SegmentationResult | None:
        """The result of the last reasoning step the stream follows (None before the first)."""
        return None if self._follower is None else self._follower.result

    # ------------------------------------------------------------------ frames
    def process(self, image: Frame | np.ndarray) -> SegmentationResult | None:
        """The masks for this frame: reasoned (LISA ran on it) or tracked; None without an instruction, or
        (background mode) while the first reasoning step is still running."""
        frame = as_frame(image)
        if self._instruction is None:
            return None
        self._count += 1
        if self._follower is not None and frame.size != self._follower.frame.size:
            # another frame size (a camera reconfigured, a stream name reused): nothing carries over, LISA again
            self._follower, self._changed = None, True
            self._previous_masks = np.zeros((0, 1, 1), bool)
        if self.background:
            return self._process_background(frame)
        if self._due(frame):
            follower = self._seed(frame, self._reason(frame))
            return self._previous(replace(follower.result, track=follower.info(frame, "reasoned")))
        return self._track(frame)

    def nbytes(self) -> int:
        """Bytes of the frames, masks and tracker state this stream holds (its numpy arrays; an estimate)."""
        held: list[object] = [self.tracker]
        if self._follower is not None:
            held += [self._follower.result, self._follower.frame]
        if self._pending is not None:
            held.append(self._pending[1])
        return int(self._previous_masks.nbytes) + sum(_array_bytes(obj) for obj in held)

    def _due(self, frame: Frame) -> bool:
        follower = self._follower
        if follower is None or self._changed:
            return True
        if follower.frames + 1 >= self.options.reason_every:
            return True
        period = self.options.reason_period_s
        if period is not None and follower.seconds_since(frame) >= period:
            return True
        return bool(len(follower.confidence)) and float(follower.confidence.min()) < self.options.min_confidence

    def _reason(self, frame: Frame, instruction: str | None = None) -> SegmentationResult:
        self.lisa_calls += 1
        return self.backend.segment(frame, instruction or self._instruction or "", options=self.query)

    def _seed(self, frame: Frame, result: SegmentationResult) -> Follower:
        """Take ``result`` (LISA on ``frame``) as the reasoning step to track from; instance order kept."""
        result = reorder(result, match_order(result.masks, self._previous_masks))
        self._follower = Follower(self.tracker, frame, result)
        self._changed = False
        return self._follower

    def _track(self, frame: Frame) -> SegmentationResult:
        assert self._follower is not None
        return self._previous(self._follower.follow(frame))

    def _previous(self, result: SegmentationResult) -> SegmentationResult:
        self._previous_masks = np.asarray(result.masks, dtype=bool)
        return result

    # ------------------------------------------------------------------ background reasoning
    def _process_background(self, frame: Frame) -> SegmentationResult | None:
        if self._pending is not None and self._pending[0].done():
            future, reasoned_on, instruction, submitted = self._pending
            self._pending = None
            result = future.result()  # an error of LISA's surfaces here, to the caller
            if instruction == self._instruction and reasoned_on.size == frame.size:  # not overtaken meanwhile
                follower = self._seed(reasoned_on, result)
                follower.frames = self._count - 1 - submitted  # frames since the one LISA looked at
        if self._pending is None and self._due(frame):
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lisa-reason")
            instruction = self._instruction or ""
            self._changed = False
            self._pending = (self._pool.submit(self._reason, frame, instruction), frame, instruction, self._count)
        if self._follower is None:
            return None
        return self._track(frame)

    def close(self, wait: bool = True) -> None:
        """Stop the background worker (``wait``: until a reasoning step in progress has finished)."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait)
            self._pool = None
            self._pending = None


def _array_bytes(obj: object) -> int:
    """Bytes of the numpy arrays ``obj`` holds as attributes (directly, or in a list or tuple attribute)."""
    total = 0
    for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
        items = value if isinstance(value, (list, tuple)) else (value,)
        total += sum(int(item.nbytes) for item in items if isinstance(item, np.ndarray))
    return total
