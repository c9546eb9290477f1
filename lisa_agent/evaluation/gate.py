"""Choose the presence gate's threshold on a validation split.

For every query of a ReasonSeg-layout split (ours: explicit, implicit, multi, no_target) the model
answers in chat mode with the gate off; the query's presence probability is the largest
``sigmoid(score)`` over its ``[SEG]`` (None when the answer has no ``[SEG]``: already declined). A
threshold t then declines a no-target query when its probability is None or below t, and keeps a
query with targets when its probability is at least t. :func:`choose_threshold` picks the t with the
best balanced rate ``(declined + kept) / 2``, or, given ``min_decline``, the t that keeps the most
targets while declining at least that share of no-target queries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypedDict

import numpy as np

from ..data.reasonseg import Sample, lisa_eval_prompt


def presence_scores(segmenter: Any, samples: Iterable[Sample], *, prompt: str = "lisa",
                    max_new_tokens: int = 32, limit: int | None = None) -> list[tuple[str, float | None]]:
    """(subset, presence probability or None) per query; ``segmenter`` must have its gate off (raw scores)."""
    if getattr(segmenter, "presence_gate", None) is not None:
        raise ValueError("load the segmenter with presence_threshold=None: the gate must not decline here")
    out: list[tuple[str, float | None]] = []
    for sample in samples:
        for q in sample.queries:
            text = lisa_eval_prompt(q.text, q.is_sentence) if prompt == "lisa" else q.text
            result = segmenter.segment(sample.image, text, mode="chat", max_new_tokens=max_new_tokens)
            raw = [inst.score for inst in result.instances]
            out.append((q.subset, 1.0 / (1.0 + math.exp(-max(raw))) if raw else None))
            if limit is not None and len(out) >= limit:
                return out
    return out


class GateRates(TypedDict):
    """The rates of :func:`gate_rates` at one threshold."""

    threshold: float
    declined: float | None
    kept: float | None


def _known(rate: float | None) -> float:
    """A rate of a split that has the queries it counts (:func:`choose_threshold` checks both kinds)."""
    assert rate is not None
    return rate


def gate_rates(scores: list[tuple[str, float | None]], threshold: float) -> GateRates:
    """``declined``: share of no-target queries declined at ``threshold``; ``kept``: share of queries with
    targets that keep their masks (None where the split has no such query)."""
    absent = [p for s, p in scores if s == "no_target"]
    present = [p for s, p in scores if s != "no_target"]
    declined = float(np.mean([p is None or p < threshold for p in absent])) if absent else None
    kept = float(np.mean([p is not None and p >= threshold for p in present])) if present else None
    return {"threshold": threshold, "declined": declined, "kept": kept}


def choose_threshold(scores: list[tuple[str, float | None]], min_decline: float | None = None) -> dict[str, Any]:
    """The chosen threshold and its rates, plus ``table``: the rates at every candidate threshold
    (midpoints between consecutive distinct probabilities, within (0, 1)). Raises ValueError when the
    split lacks no-target queries or queries with targets."""
    probs = sorted({p for _, p in scores if p is not None})
    if not any(s == "no_target" for s, _ in scores) or all(s == "no_target" for s, _ in scores):
        raise ValueError("calibration needs both no-target queries and queries with targets")
    edges = [0.0, *probs, 1.0]
    candidates = sorted({min(max((a + b) / 2, 1e-4), 1 - 1e-4) for a, b in zip(edges, edges[1:], strict=False)})
    table = [gate_rates(scores, t) for t in candidates]
    if min_decline is None:
        best = max(table, key=lambda r: ((_known(r["declined"]) + _known(r["kept"])) / 2,
                                         -abs(r["threshold"] - 0.5)))
    else:
        ok = [r for r in table if _known(r["declined"]) >= min_decline]
        if not ok:
            raise ValueError(f"no threshold declines {min_decline:.0%} of the no-target queries")
        best = max(ok, key=lambda r: (_known(r["kept"]), -r["threshold"]))
    return {**best, "criterion": "balanced" if min_decline is None else f"declined >= {min_decline}",
            "n_no_target": sum(s == "no_target" for s, _ in scores),
            "n_with_targets": sum(s != "no_target" for s, _ in scores), "table": table}
