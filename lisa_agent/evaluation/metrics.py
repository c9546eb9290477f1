"""gIoU and cIoU exactly as LISA computes them.

Per query (LISA's ``validate``): the prediction is ``logits > 0`` (or a bool mask); pixels where the
ground truth is 255 are ignored; I = |pred & gt|, U = |pred | gt| over the other pixels;
IoU = I / (U + 1e-5), and IoU = 1.0 when U == 0 (both empty). gIoU = mean per-query IoU;
cIoU = sum I / sum U over the split.

How several masks are scored (LISA's ReasonSeg evaluation forces "[SEG]." so it always has one):

- a query with at most one target (ReasonSeg, our explicit / implicit / no-target queries): the
  predicted masks are unioned and scored against the target (an empty mask when there is none);
  so a no-target query scores 1.0 only when nothing at all is predicted;
- a query with several targets (our "multi" subset): the k-th predicted mask (k-th ``[SEG]``) is
  scored against the k-th target, a missing mask counts as empty and an extra mask is scored
  against an empty target; the query's IoU is the mean over the max(P, T) pairs, and its I and U
  are the sums over the pairs (what cIoU adds up). LISA's own code pairs masks the same way.

One deviation, only where LISA's code is degenerate: cIoU of a set whose union is empty
(e.g. a no-target subset answered perfectly) is 1.0 where LISA's ``I / (U + 1e-10)`` would say 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

IGNORE_VALUE = 255
EPS = 1e-5


def as_pred_mask(pred: np.ndarray) -> np.ndarray:
    """A prediction as bool: bool masks as they are, float logits thresholded at 0 (``logits > 0``)."""
    pred = np.asarray(pred)
    return pred if pred.dtype == bool else pred > 0


def intersection_union(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> tuple[int, int]:
    """(I, U) of one H x W prediction against one H x W ground truth.

    Args:
        pred: bool mask or float logits (> 0 is foreground).
        gt: bool or uint8 (0 background, 1 target, 255 ignored).
        ignore: optional H x W bool of extra pixels to ignore.
    """
    p = as_pred_mask(pred)
    g = np.asarray(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
    valid = g != IGNORE_VALUE if g.dtype != bool else np.ones(g.shape, dtype=bool)
    if ignore is not None:
        valid &= ~np.asarray(ignore, dtype=bool)
    t = (g == 1) if g.dtype != bool else g
    p = p & valid
    t = t & valid
    inter = int(np.count_nonzero(p & t))
    union = int(np.count_nonzero(p | t))
    return inter, union


def iou_from(inter: int, union: int) -> float:
    """LISA's per-query IoU: I / (U + 1e-5), 1.0 when U == 0."""
    return 1.0 if union == 0 else inter / (union + EPS)


@dataclass(frozen=True)
class QueryScore:
    """Score of one query: its IoU and the I, U it adds to cIoU."""

    iou: float
    inter: int
    union: int


def score_query(pred_masks: np.ndarray | Sequence[np.ndarray], target_masks: np.ndarray | Sequence[np.ndarray],
                ignore: np.ndarray | None = None, shape: tuple[int, int] | None = None) -> QueryScore:
    """Score P predicted masks against T target masks with the rules in the module docstring.

    Args:
        pred_masks: P x H x W bool masks or float logits (P may be 0).
        target_masks: T x H x W ground truth (bool, or uint8 0/1/255; T may be 0 = no target).
        ignore: H x W bool pixels to ignore (besides 255 in the targets).
        shape: (H, W) when both P and T are 0.
    """
    preds = [as_pred_mask(p) for p in pred_masks]
    targets = [np.asarray(t) for t in target_masks]
    hw = (preds or targets)[0].shape if (preds or targets) else shape
    if hw is None:
        raise ValueError("no masks given: pass shape=(H, W)")
    if len(targets) <= 1:
        pred = np.logical_or.reduce(preds) if preds else np.zeros(hw, dtype=bool)
        gt = targets[0] if targets else np.zeros(hw, dtype=bool)
        i, u = intersection_union(pred, gt, ignore)
        return QueryScore(iou_from(i, u), i, u)
    ious, inter, union = [], 0, 0
    empty = np.zeros(hw, dtype=bool)
    for k in range(max(len(preds), len(targets))):
        i, u = intersection_union(preds[k] if k < len(preds) else empty,
                                  targets[k] if k < len(targets) else empty, ignore)
        ious.append(iou_from(i, u))
        inter += i
        union += u
    return QueryScore(float(np.mean(ious)), inter, union)


@dataclass
class IoUMeter:
    """Accumulates query scores; ``giou`` = mean IoU, ``ciou`` = sum I / sum U."""

    ious: list[float] = field(default_factory=list)
    inter: int = 0
    union: int = 0

    def add(self, score: QueryScore) -> None:
        self.ious.append(score.iou)
        self.inter += score.inter
        self.union += score.union

    @property
    def n(self) -> int:
        return len(self.ious)

    @property
    def giou(self) -> float | None:
        return float(np.mean(self.ious)) if self.ious else None

    @property
    def ciou(self) -> float | None:
        if not self.ious:
            return None
        return 1.0 if self.union == 0 else self.inter / self.union

    def summary(self) -> dict[str, float | int | None]:
        """``{"gIoU", "cIoU", "n"}`` (None values when empty), rounded to 4 decimals."""
        r = (lambda v: None if v is None else round(float(v), 4))  # noqa: E731
        return {"gIoU": r(self.giou), "cIoU": r(self.ciou), "n": self.n}
