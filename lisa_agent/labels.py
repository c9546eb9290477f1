"""Words for an answer's masks, for people and tools: a short label per mask from the answer's text, and
whether the model declined. Used by the console, the ROS node's Foxglove view and any door that names masks."""

from __future__ import annotations

import re

from .result import SegmentationResult

_GENERIC = re.compile(r"^(sure|yes|ok|okay|it|it is|this is|here it is|here is|there|the|a|an|)$", re.IGNORECASE)
_LEAD = re.compile(r"^(?:sure|yes|ok|okay)\b[\s,.!]*|^(?:it is|this is|here is|that is|here's)\s+", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)


def is_declined(result: SegmentationResult) -> bool:
    """The model said no: an answer starting "Sorry" with no mask (the presence gate's refusal)."""
    return not len(result) and result.text.strip().lower().startswith("sorry")


def answer_message(result: SegmentationResult) -> str | None:
    """What to tell an operator beside an answer without a mask (a refusal, or nothing pointed at); else None."""
    if is_declined(result):
        return f"The model declined: {result.text.strip()}"
    if not len(result):
        return "The answer has no mask: the model pointed at nothing."
    return None


def mask_labels(text: str, count: int) -> list[str]:
    """A short label per mask from the answer's words before each ``[SEG]``: "Sure, the knife [SEG] ."
    gives ``["knife"]``; "the mug [SEG] and the spoon [SEG]" ``["mug", "spoon"]``; "Sure, [SEG]."
    ``["mask 1"]``."""
    pieces = str(text).split("[SEG]")
    labels = []
    for k in range(count):
        chunk = pieces[k] if k < len(pieces) else ""
        clause = re.split(r"[,;:.!?]|\band\b", chunk)[-1].strip() if chunk.strip() else ""
        for _ in range(3):
            clause = _ARTICLE.sub("", _LEAD.sub("", clause).strip()).strip()
        clause = " ".join(clause.split())
        if _GENERIC.match(clause) or "segmentation" in clause.lower() or len(clause) > 48:
            clause = f"mask {k + 1}"
        labels.append(clause)
    return labels
