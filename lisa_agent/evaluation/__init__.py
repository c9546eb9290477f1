"""Evaluation as LISA computes it: gIoU / cIoU (:mod:`.metrics`) over a ReasonSeg-layout split (:mod:`.evaluate`)."""

from .metrics import IoUMeter, QueryScore, intersection_union, iou_from, score_query

__all__ = ["IoUMeter", "QueryScore", "intersection_union", "iou_from", "score_query"]
