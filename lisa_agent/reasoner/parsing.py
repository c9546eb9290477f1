"""Reading a reasoner's output (``<think> ... </think><answer> JSON </answer>``) into boxes and points of the frame.

:func:`parse_output` has two behaviours:

- ``strict=True`` (faithful): what the public code does. VisionReasoner: ``json.loads`` of the first
  ``<answer> ... </answer>``, every item must have ``bbox_2d`` and ``point_2d``, and any error yields no
  object at all. Seg-Zero-7B: the first ``{...}`` of the whole text, its first key containing ``bbox`` and its
  first two keys containing ``points``; any error yields nothing. The think text is ``<think>([^<]+)</think>``.
- ``strict=False`` (ours, the default): tolerant. A truncated answer (no ``</answer>``: the token budget ran
  out), Python-literal dicts (single quotes), text around the JSON, items of the other style, a bad item among
  good ones: every object that can be read is kept, and :attr:`ParsedAnswer.notes` says what was dropped.

Both clip boxes and points into the frame (the public code passes them to SAM 2 as written; a robot wants
in-frame boxes) and order each box's corners; a box that lies wholly outside the frame is dropped. The result's
:attr:`ParsedAnswer.status` is typed: ``ok``, ``partial`` (some objects read, something dropped), ``empty``
(the answer is an empty list: the model found nothing), ``malformed`` (an answer that yields no object) or
``no_answer`` (no ``<answer>`` tag and no object-like JSON anywhere).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .templates import RESIZE, STYLES, PromptStyle, scale_factors

#: Statuses of a parsed answer (see the module docstring).
STATUSES = ("ok", "partial", "empty", "malformed", "no_answer")

_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_ANSWER_OPEN = re.compile(r"<answer>\s*(.*)$", re.DOTALL)
_THINK_PUBLIC = re.compile(r"<think>([^<]+)</think>")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_THINK_OPEN = re.compile(r"<think>(.*?)(?=<answer>|$)", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?(</think>|(?=<answer>)|$)", re.DOTALL)
_FLAT_OBJECT = re.compile(r"{[^{}]*}")
_SEG_ZERO_OBJECT = re.compile(r"{[^}]+}")


@dataclass(frozen=True)
class ReasonerObject:
    """One object of an answer, in frame pixels.

    Attributes:
        box: (x1, y1, x2, y2) ints, x1 <= x2 and y1 <= y2, clipped into [0, W-1] x [0, H-1].
        points: positive points (x, y) ints inside the frame (one for VisionReasoner, two for Seg-Zero-7B,
            none when the item had no readable point).
        model_box: the box as the model wrote it (coordinates of the resized square, floats).
        clipped: a coordinate lay outside the frame and was moved to its edge.
    """

    box: tuple[int, int, int, int]
    points: tuple[tuple[int, int], ...]
    model_box: tuple[float, float, float, float]
    clipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """``{"box": [x1, y1, x2, y2], "points": [[x, y], ...]}`` (frame pixels)."""
        return {"box": [int(v) for v in self.box], "points": [[int(x), int(y)] for x, y in self.points]}


@dataclass(frozen=True)
class ParsedAnswer:
    """What one output says.

    Attributes:
        objects: the objects read, in the answer's order.
        think: the reasoning (inside ``<think>``), stripped; "" when there is none.
        answer: the text inside ``<answer>`` (up to the end when unclosed), or "" without the tag.
        text: the output with the think block removed, stripped (what a user reads).
        status: one of :data:`STATUSES`.
        notes: what could not be read or was changed (dropped items, clipped coordinates).
    """

    objects: tuple[ReasonerObject, ...]
    think: str
    answer: str
    text: str
    status: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def found(self) -> bool:
        """True when at least one object was read."""
        return bool(self.objects)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _numbers(value: Any, count: int) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        return None
    numbers = [_number(v) for v in value]
    return None if any(n is None for n in numbers) else [n for n in numbers if n is not None]


def _load(text: str) -> Any:
    """``text`` as JSON, else as a Python literal (single-quoted dicts); raises ValueError."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(str(exc)) from None


def _items(region: str, notes: list[str]) -> tuple[list[Any], bool]:
    """The JSON items of ``region`` (a list, an object, or objects among other text) and whether the region was
    an empty list."""
    stripped = region.strip()
    if stripped:
        try:
            data = _load(stripped)
        except ValueError:
            data = None
        else:
            if isinstance(data, list):
                return data, not data
            if isinstance(data, dict):
                return [data], False
            notes.append(f"the answer is a {type(data).__name__}, not a list of objects")
            return [], False
    items = []
    for match in _FLAT_OBJECT.finditer(region):
        try:
            items.append(_load(match.group(0)))
        except ValueError:
            notes.append(f"unreadable object {match.group(0)[:60]!r}")
    if stripped and items:
        notes.append("the answer is not valid JSON; read the objects in it one by one")
    return items, False


def _point_values(item: dict[str, Any]) -> list[list[float]]:
    points = []
    for key, value in item.items():
        if "point" not in str(key).lower():
            continue
        pair = _numbers(value, 2)
        if pair is not None:
            points.append(pair)
        elif isinstance(value, (list, tuple)):
            points.extend(p for p in (_numbers(v, 2) for v in value) if p is not None)
    return points


def _box_value(item: dict[str, Any]) -> list[float] | None:
    for key, value in item.items():
        if "box" in str(key).lower():
            return _numbers(value, 4)
    return None


def _clip(value: int, last: int) -> tuple[int, bool]:
    """``value`` clipped into [0, last], and whether it had to be."""
    return min(max(value, 0), last), not 0 <= value <= last


class _Mapper:
    """Model coordinates (the resized square) -> frame pixels, clipped into the frame."""

    def __init__(self, style: PromptStyle, height: int, width: int, size: int):
        self.style = style
        self.fx, self.fy = scale_factors(height, width, size)
        self.last_x, self.last_y = width - 1, height - 1

    def box(self, b: Sequence[float]) -> tuple[tuple[int, int, int, int], bool, bool]:
        """The clipped, ordered box, whether it was clipped, and whether it lies wholly outside the frame."""
        to = self.style.to_frame
        x1, x2 = sorted((to(b[0], self.fx), to(b[2], self.fx)))
        y1, y2 = sorted((to(b[1], self.fy), to(b[3], self.fy)))
        outside = x2 < 0 or y2 < 0 or x1 > self.last_x or y1 > self.last_y
        (cx1, c1), (cx2, c2) = _clip(x1, self.last_x), _clip(x2, self.last_x)
        (cy1, c3), (cy2, c4) = _clip(y1, self.last_y), _clip(y2, self.last_y)
        return (cx1, cy1, cx2, cy2), c1 or c2 or c3 or c4, outside

    def point(self, p: Sequence[float]) -> tuple[tuple[int, int], bool]:
        """The clipped point and whether it was clipped."""
        (x, cx), (y, cy) = (_clip(self.style.to_frame(p[0], self.fx), self.last_x),
                            _clip(self.style.to_frame(p[1], self.fy), self.last_y))
        return (x, y), cx or cy


def _objects(items: list[Any], mapper: _Mapper, notes: list[str], max_points: int | None) -> list[ReasonerObject]:
    objects = []
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            notes.append(f"item {k} is a {type(item).__name__}, not an object")
            continue
        box = _box_value(item)
        if box is None:
            notes.append(f"item {k} has no readable box")
            continue
        (frame_box, clipped, outside) = mapper.box(box)
        if outside:
            notes.append(f"item {k}'s box {box} lies outside the frame")
            continue
        points = []
        for p in _point_values(item)[:max_points]:
            xy, c = mapper.point(p)
            clipped = clipped or c
            points.append(xy)
        if clipped:
            notes.append(f"item {k}'s coordinates were clipped into the frame")
        objects.append(ReasonerObject(frame_box, tuple(points), (box[0], box[1], box[2], box[3]), clipped))
    return objects


def _public(output: str, style: PromptStyle, mapper: _Mapper) -> list[ReasonerObject]:
    """The public code's extraction (any error: nothing), then our clipping."""
    try:
        if style.multi_object:
            match = _ANSWER.search(output)
            if not match:
                return []
            data = json.loads(match.group(1))
            boxes = [[float(v) for v in item["bbox_2d"][:4]] for item in data]
            points = [[[float(v) for v in item["point_2d"][:2]]] for item in data]
        else:
            match = _SEG_ZERO_OBJECT.search(output)
            if not match:
                return []
            data = json.loads(match.group(0))
            key = next((k for k in data if "bbox" in k.lower()), None)
            point_keys = [k for k in data if "points" in k.lower()][:2]
            if key is None or len(data[key]) != 4 or len(point_keys) != 2:
                return []
            boxes = [[float(v) for v in data[key]]]
            points = [[[float(v) for v in data[k][:2]] for k in point_keys]]
        if any(len(b) != 4 for b in boxes) or any(len(p) != 2 for ps in points for p in ps):
            return []
    except Exception:  # noqa: BLE001 - the public code catches everything here and returns nothing
        return []
    objects = []
    for box, pts in zip(boxes, points, strict=True):
        frame_box, clipped, outside = mapper.box(box)
        if outside:
            continue
        mapped = [mapper.point(p) for p in pts]
        objects.append(ReasonerObject(frame_box, tuple(xy for xy, _ in mapped), (box[0], box[1], box[2], box[3]),
                                      clipped or any(c for _, c in mapped)))
    return objects


def parse_output(output: str, height: int, width: int, *, style: PromptStyle | str = "vision_reasoner",
                 size: int = RESIZE, strict: bool = False) -> ParsedAnswer:
    """Read ``output`` (the decoded generation, special tokens skipped) for a ``height`` x ``width`` frame
    that the model saw resized to ``size`` x ``size``.

    Args:
        output: the model's text, e.g. ``'<think>...</think><answer>[{"bbox_2d": [...], "point_2d": [...]}]
            </answer>'``.
        height, width: the frame's size in pixels (the coordinates are mapped back to it and clipped into it).
        style: a :class:`~lisa_agent.reasoner.templates.PromptStyle` or its name (the coordinate rounding and,
            with ``strict``, the public extraction).
        size: the side of the square the model saw (840 in the public code).
        strict: the public code's extraction (see the module docstring); else tolerant.

    Never raises on any text.
    """
    style = STYLES[style] if isinstance(style, str) else style
    mapper = _Mapper(style, int(height), int(width), int(size))
    text = _THINK_BLOCK.sub("", output).strip()
    notes: list[str] = []
    empty_list = False
    if strict:
        think_match = _THINK_PUBLIC.search(output)
        think = think_match.group(1).strip() if think_match else ""
        match = _ANSWER.search(output)
        answer = match.group(1) if match else ""
        objects = _public(output, style, mapper)
        empty_list = answer.strip() == "[]"
        has_answer = "<answer>" in output or (not style.multi_object and _SEG_ZERO_OBJECT.search(output) is not None)
    else:
        think_match = _THINK.search(output) or _THINK_OPEN.search(output)
        think = think_match.group(1).strip() if think_match else ""
        match = _ANSWER.search(output)
        if match is None and (opened := _ANSWER_OPEN.search(output)) is not None:
            notes.append("the answer is not closed (</answer> missing: the token budget may have run out)")
            match = opened
        if match is not None:
            answer = match.group(1)
            region = answer
        else:
            answer = ""
            region = text  # the output without its think block
        items, empty_list = _items(region, notes)
        has_answer = match is not None or bool(items)
        objects = _objects(items, mapper, notes, None if style.multi_object else 2)
    if objects:
        status = "partial" if notes and not all(n.endswith("clipped into the frame") for n in notes) else "ok"
    elif empty_list:
        status = "empty"
    else:
        status = "malformed" if has_answer else "no_answer"
    return ParsedAnswer(tuple(objects), think, answer.strip(), text, status, tuple(notes))


__all__ = ["STATUSES", "ParsedAnswer", "ReasonerObject", "parse_output"]
