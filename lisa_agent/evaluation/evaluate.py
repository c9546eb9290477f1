"""Run a segmenter over a split and score it as LISA does: a ReasonSeg-layout folder
(:func:`lisa_agent.data.reasonseg.iter_samples`) or a referring split of the RefCOCO layout
(:func:`lisa_agent.data.refcoco.open_refer_split`); both give :class:`~lisa_agent.data.reasonseg.Sample`s.

The segmenter is duck-typed: anything with ``segment(image, query, mode=..., answer=...)`` returning
an object with ``masks`` (P x H x W bool) and ``text`` works (``LisaSegmenter`` does).

Answer modes:

- ``forced`` (LISA's protocol): the answer is teacher-forced, ``"[SEG]."`` for a query with one
  target (``mode="fast", answer="[SEG]."``) and ``"[SEG] and [SEG]."`` for two targets (so
  ``two_masks_rate`` is 1.0 by construction there). No-target queries cannot be forced without
  giving the result away, so they are answered in ``chat`` mode even here.
- ``generated``: every query in ``chat`` mode (greedy generation); the model decides how many
  masks to give.

The prompt is LISA's evaluation prompt (:func:`~lisa_agent.data.reasonseg.lisa_eval_prompt`) by
default, or the raw query text (``prompt="raw"``). Scoring rules: :mod:`lisa_agent.evaluation.metrics`.

Extra statistics: ``right_object_rate`` (single-target queries whose predicted mask overlaps the
target more than any other object of the scene; needs the per-object masks our data carries),
``no_mask_rate`` (no-target queries answered without any mask), ``two_masks_rate`` (two-target
queries answered with exactly two masks), ``one_mask_rate`` (single-target queries with exactly
one mask) and, in generated mode, ``explained_rate`` (explanatory queries whose answer goes on
after the last ``[SEG]``).
"""

from __future__ import annotations

import heapq
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from ..data.queries import SUBSETS
from ..data.reasonseg import Query, Sample, lisa_eval_prompt
from .metrics import IoUMeter, QueryScore, score_query

ANSWER_MODES = ("forced", "generated")
PROMPT_STYLES = ("lisa", "raw")


class Segmenter(Protocol):
    def segment(self, image: np.ndarray, query: str, *, mode: str = ..., answer: str | None = ...) -> Any: ...


@dataclass
class _Failure:
    iou: float
    order: int
    image: np.ndarray
    query: str
    answer: str
    subset: str
    pred: np.ndarray
    gt: np.ndarray
    name: str


def forced_answer(n_targets: int) -> str:
    """The teacher-forced answer for a query with ``n_targets`` targets: "[SEG]." / "[SEG] and [SEG]."."""
    return " and ".join(["[SEG]"] * max(n_targets, 1)) + "."


def _rate(hits: list[bool]) -> float | None:
    return round(sum(hits) / len(hits), 4) if hits else None


def right_object(pred: np.ndarray, object_masks: np.ndarray, target: int) -> bool:
    """True when ``pred`` (H x W bool) overlaps object ``target`` more than any other object."""
    overlaps = np.array([np.count_nonzero(pred & m) for m in object_masks])
    if overlaps[target] == 0:
        return False
    others = np.delete(overlaps, target)
    return bool(len(others) == 0 or overlaps[target] > others.max())


def evaluate(segmenter: Segmenter, samples: Iterable[Sample], *, answer: str = "forced", prompt: str = "lisa",
             limit: int | None = None, failures_out: str | Path | None = None, n_failures: int = 8,
             max_new_tokens: int | None = None, progress: bool = False,
             subsets: Sequence[str] = SUBSETS) -> dict[str, Any]:
    """Score ``segmenter`` on every query of ``samples``.

    Args:
        segmenter: has ``segment(image, query, mode=..., answer=...)`` (see module docstring).
        samples: e.g. :func:`lisa_agent.data.reasonseg.iter_samples`.
        answer: "forced" or "generated".
        prompt: "lisa" (LISA's two evaluation prompt forms) or "raw" (the query text as written).
        limit: stop after this many queries.
        failures_out: folder for PNG overlays of the ``n_failures`` lowest-IoU queries (+ index.json).
        max_new_tokens: generation limit passed to chat-mode calls (default: the segmenter's).
        progress: show a progress bar on stderr.
        subsets: subset names reported even when no query has them (default our four); the queries'
            own subsets ("short" / "long" for ReasonSeg, the split name for a referring split) are added.

    Returns:
        ``{"gIoU", "cIoU", "n", "intersection", "union", "subsets": {name: {"gIoU", "cIoU", "n", "mode", ...}},
        "right_object_rate", "no_mask_rate", "two_masks_rate", "one_mask_rate", "categories", "images",
        "seconds", ...}``; ``intersection`` / ``union`` are the exact pixel sums behind cIoU.
    """
    if answer not in ANSWER_MODES:
        raise ValueError(f"answer must be one of {ANSWER_MODES}; got {answer!r}")
    if prompt not in PROMPT_STYLES:
        raise ValueError(f"prompt must be one of {PROMPT_STYLES}; got {prompt!r}")
    overall = IoUMeter()
    meters: dict[str, IoUMeter] = {s: IoUMeter() for s in subsets}
    modes: dict[str, set[str]] = defaultdict(set)
    stats: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    categories: dict[str, IoUMeter] = defaultdict(IoUMeter)
    worst: list[tuple[float, int, _Failure]] = []
    n_images = 0
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=limit, unit="query", desc=f"eval ({answer})")
    for sample in samples:
        if limit is not None and overall.n >= limit:
            break
        n_images += 1
        for q in sample.queries:
            if limit is not None and overall.n >= limit:
                break
            text = lisa_eval_prompt(q.text, q.is_sentence) if prompt == "lisa" else q.text
            mode, result = _ask(segmenter, sample.image, text, q, answer, max_new_tokens)
            masks = np.asarray(result.masks, dtype=bool).reshape(-1, *sample.image.shape[:2])
            score = _score(masks, q)
            overall.add(score)
            meters.setdefault(q.subset, IoUMeter()).add(score)
            modes[q.subset].add(mode)
            _collect_stats(stats[q.subset], q, sample, masks, str(getattr(result, "text", "")), answer)
            if len(q.targets) == 1 and sample.object_names:
                categories[sample.object_names[q.targets[0]].split()[-1]].add(score)
            if failures_out is not None and n_failures > 0:
                _keep_worst(worst, n_failures, overall.n, score, sample, q, text, masks, result)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    report: dict[str, Any] = {**overall.summary(), "intersection": overall.inter, "union": overall.union,
                              "subsets": {}}
    for name, meter in meters.items():
        entry: dict[str, Any] = meter.summary()
        entry["mode"] = "+".join(sorted(modes[name])) if modes[name] else None
        for key, hits in sorted(stats[name].items()):
            entry[key] = _rate(hits)
        report["subsets"][name] = entry
    merged: dict[str, list[bool]] = defaultdict(list)
    for per in stats.values():
        for key, hits in per.items():
            merged[key].extend(hits)
    for key in ("right_object_rate", "no_mask_rate", "two_masks_rate", "one_mask_rate", "explained_rate"):
        report[key] = _rate(merged.get(key, []))
    report["categories"] = {k: {"gIoU": v.summary()["gIoU"], "n": v.n} for k, v in sorted(categories.items())}
    report.update({"answer": answer, "prompt": prompt, "images": n_images, "seconds": round(seconds, 3),
                   "queries_per_second": round(overall.n / seconds, 3) if seconds > 0 else None})
    if failures_out is not None:
        report["failures"] = _write_failures(Path(failures_out), sorted((f for _, _, f in worst), key=lambda f: f.iou))
    return report


def _ask(segmenter: Segmenter, image: np.ndarray, text: str, q: Query, answer: str,
         max_new_tokens: int | None) -> tuple[str, Any]:
    if answer == "forced" and q.subset != "no_target":
        return "fast", segmenter.segment(image, text, mode="fast", answer=forced_answer(len(q.target_masks)))
    kwargs: dict[str, Any] = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    return "chat", segmenter.segment(image, text, mode="chat", **kwargs)


def _score(masks: np.ndarray, q: Query) -> QueryScore:
    targets = list(q.target_masks) if len(q.target_masks) >= 2 else ([q.gt] if len(q.target_masks) == 1 else [])
    return score_query(masks, targets, shape=q.gt.shape)


def _collect_stats(stats: dict[str, list[bool]], q: Query, sample: Sample, masks: np.ndarray, text: str,
                   answer: str) -> None:
    n_targets = len(q.target_masks)
    if q.subset == "no_target":
        stats["no_mask_rate"].append(len(masks) == 0)
        return
    if n_targets >= 2:
        stats["two_masks_rate"].append(len(masks) == n_targets)
        return
    stats["one_mask_rate"].append(len(masks) == 1)
    if sample.object_masks is not None and len(q.targets) == 1:
        pred = np.asarray(masks.any(axis=0)) if len(masks) else np.zeros(q.gt.shape, dtype=bool)
        stats["right_object_rate"].append(right_object(pred, sample.object_masks, q.targets[0]))
    if q.explanatory and answer == "generated":
        tail = text.rsplit("[SEG]", 1)[-1].strip(" .") if "[SEG]" in text else ""
        stats["explained_rate"].append(len(tail.split()) >= 2)


def _keep_worst(worst: list[tuple[float, int, _Failure]], n: int, order: int, score: QueryScore, sample: Sample,
                q: Query, text: str, masks: np.ndarray, result: Any) -> None:
    key = (-score.iou, -order)
    if len(worst) >= n and key <= (worst[0][0], worst[0][1]):
        return
    pred = np.asarray(masks.any(axis=0)) if len(masks) else np.zeros(q.gt.shape, dtype=bool)
    gt = np.asarray(q.target_masks.any(axis=0)) if len(q.target_masks) else np.zeros(q.gt.shape, dtype=bool)
    fail = _Failure(score.iou, order, sample.image, text, str(getattr(result, "text", "")), q.subset, pred, gt,
                    sample.image_path.stem)
    item = (-score.iou, -order, fail)
    if len(worst) < n:
        heapq.heappush(worst, item)
    else:
        heapq.heapreplace(worst, item)


def render_failure(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, lines: list[str],
                   min_width: int = 512) -> np.ndarray:
    """Prediction vs ground truth over ``image`` (H x W x 3 uint8 RGB), with a caption below.

    Green: ground truth only (missed); red: prediction only (wrong); yellow: both. Small frames are
    enlarged (nearest neighbour) to at least ``min_width`` pixels. Returns RGB uint8.
    """
    out = image.astype(np.float32) * 0.6
    colours = {(True, False): (40, 220, 60), (False, True): (235, 40, 40), (True, True): (240, 220, 40)}
    for (g, p), c in colours.items():
        sel = (gt == g) & (pred == p)
        out[sel] = out[sel] * 0.4 + np.array(c, np.float32) * 0.6
    canvas = np.clip(out, 0, 255).astype(np.uint8)
    h, w = canvas.shape[:2]
    if w < min_width:
        k = int(np.ceil(min_width / w))
        canvas = cv2.resize(canvas, (w * k, h * k), interpolation=cv2.INTER_NEAREST)
    width = canvas.shape[1]
    chars = max(int(width / 8.5), 20)
    wrapped = [ln[i:i + chars] for ln in lines for i in range(0, max(len(ln), 1), chars)]
    line_h = 20
    caption = np.full((line_h * len(wrapped) + 8, width, 3), 255, np.uint8)
    for k, line in enumerate(wrapped):
        cv2.putText(caption, line, (4, line_h * (k + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([canvas, caption], axis=0)


def _write_failures(folder: Path, failures: list[_Failure]) -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for k, f in enumerate(failures):
        name = f"failure_{k:02d}_{f.name}.png"
        lines = [f"query: {f.query}", f"answer: {f.answer}", f"subset: {f.subset}   IoU: {f.iou:.3f}",
                 "green: missed  red: wrong  yellow: right"]
        img = render_failure(f.image, f.pred, f.gt, lines)
        cv2.imwrite(str(folder / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        index.append({"file": name, "image": f.name, "query": f.query, "answer": f.answer, "subset": f.subset,
                      "iou": round(f.iou, 4)})
    (folder / "index.json").write_text(json.dumps(index, indent=2))
    return index


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable table of :func:`evaluate`'s result."""
    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    rows = [f"{'subset':<11} {'n':>5} {'gIoU':>6} {'cIoU':>6}  mode   extra"]
    for name, e in report["subsets"].items():
        extra = ", ".join(f"{k} {f(v)}" for k, v in e.items() if k.endswith("_rate") and v is not None)
        rows.append(f"{name:<11} {e['n']:>5} {f(e['gIoU']):>6} {f(e['cIoU']):>6}  {f(e['mode']):<6} {extra}")
    rows.append(f"{'all':<11} {report['n']:>5} {f(report['gIoU']):>6} {f(report['cIoU']):>6}")
    counts = f"{report['images']} images" + (f", {report['refs']} refs" if "refs" in report else "")
    split = f"split {report['split']}, " if report.get("split") else ""
    rows.append(f"{split}answer {report['answer']}, prompt {report['prompt']}, {counts}, {report['seconds']} s")
    return "\n".join(rows)
