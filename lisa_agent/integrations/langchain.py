"""LISA as LangChain tools that LLM agents can call.

``segment_objects`` answers "where is something to cut with?" with what an agent can act on: for
each object a bounding box, its share of the image, its centroid, a 3D point when depth is known,
and LISA's answer. The text goes to the model; masks, boxes and timings ride along as the
``ToolMessage.artifact``. ``explain_objects`` asks LISA in chat mode for an explanatory answer.

Example::

    from langchain.agents import create_agent
    from lisa_agent import LisaSegmenter
    from lisa_agent.integrations.langchain import lisa_tools

    seg = LisaSegmenter.from_pretrained("xinlai/LISA-7B-v1", dtype="bf16", device="cuda")
    agent = create_agent(chat_model, lisa_tools(seg, image_source=camera.latest))
    agent.invoke({"messages": [("user", "Grab something to cut with.")]})

Backends: a :class:`~lisa_agent.LisaSegmenter` (in-process; async calls run it in a worker
thread) or a :class:`~lisa_agent.LisaClient` (remote model server); an ``AsyncLisaClient`` (its
``segment`` is a coroutine function) serves ``ainvoke`` natively, given as ``backend`` or as
``async_backend`` beside a sync one. Every backend takes ``segment(image, query, mode=...)`` and
returns a :class:`~lisa_agent.SegmentationResult`.

Requires ``langchain-core`` (``pip install lisa-agent[langchain]``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from ..encoders import mask_to_rle
from ..errors import InvalidArgumentError, InvalidImageError, InvalidQueryError, LisaError
from ..frames import check_image, check_query
from ..geometry import Intrinsics, depth_to_meters, mask_target_point
from ..result import SegmentationResult
from .images import load_image

__all__ = [
    "ExplainObjectsInput",
    "LisaExplainTool",
    "LisaSegmentTool",
    "SegmentObjectsInput",
    "describe_result",
    "lisa_tools",
]

log = logging.getLogger(__name__)

class SegmentObjectsInput(BaseModel):
    """Arguments the calling model passes to ``segment_objects``."""

    query: str = Field(
        description=(
            "What to find, in natural language. Name the object ('the red mug') or describe it by "
            "use or property ('something to cut with', 'the item that holds liquid'). One request "
            "per call; the answer lists every object that matches."
        ),
    )
    image: str | None = Field(
        default=None,
        description=(
            "Optional image to look at: a local file path, an http(s) URL or a data URI "
            "(data:image/png;base64,...). Leave it out to use the newest camera frame."
        ),
    )
    mode: Literal["fast", "chat"] | None = Field(
        default=None,
        description=(
            "'fast' (default): one quick pass that returns the masks. 'chat': the vision model "
            "writes its own answer first (slower); use it when its wording matters."
        ),
    )


class ExplainObjectsInput(BaseModel):
    """Arguments the calling model passes to ``explain_objects``."""

    query: str = Field(
        description=(
            "A question or instruction about the scene that needs reasoning, e.g. 'What here could "
            "I use to cut the rope, and why?'. The answer explains and points at the objects."
        ),
    )
    image: str | None = Field(
        default=None,
        description=(
            "Optional image: a local file path, an http(s) URL or a data URI. Leave it out to use "
            "the newest camera frame."
        ),
    )


@dataclass
class _Frame:
    """One prepared request: the validated frame and where it came from."""

    image: np.ndarray
    query: str
    mode: str
    source: str
    stamp: Any = None
    depth: np.ndarray | None = None
    load_ms: float = 0.0
    depth_note: str = ""


def describe_result(
    result: SegmentationResult,
    *,
    source: str,
    stamp: str | None = None,
    points: Sequence[tuple[float, float, float] | None] | None = None,
    note: str = "",
    explain: bool = False,
    max_listed: int = 10,
) -> str:
    """The short text an LLM reads: how many objects and, for each, bbox, share, centroid, 3D point.

    Objects are numbered as the masks (``Object k`` is ``artifact["objects"][k - 1]``). Masks with no
    pixels (LISA emitted ``[SEG]`` but nothing was segmented) do not count as found. ``explain``
    leads with LISA's answer (the ``explain_objects`` wording); at most ``max_listed`` objects are
    described, the rest are only counted.
    """
    h, w = result.image_size
    found = [k for k, inst in enumerate(result.instances) if inst.area > 0]
    answer = result.text.strip()
    where = f"{source} ({w}x{h} px" + (f", stamp {stamp})" if stamp else ")")
    if explain:
        lines = [f"LISA answered: {answer!r}."]
        lines.append(f"It points at {len(found)} object{'s' if len(found) != 1 else ''} in {where}"
                     + ("." if found else "; no mask to report."))
    elif found:
        lines = [f"Found {len(found)} object{'s' if len(found) != 1 else ''} for \"{result.query}\" in {where}. "
                 f"LISA answered: {answer!r}."]
    else:
        lines = [f"No object matched \"{result.query}\" in {where}."]
        if answer:
            lines.append(f"LISA answered: {answer!r}.")
    empty = len(result.instances) - len(found)
    if empty:
        lines.append(f"{empty} of LISA's {len(result.instances)} mask(s) came out empty.")
    for k in found[:max_listed]:
        inst = result.instances[k]
        cx, cy = inst.centroid
        parts = [
            f"Object {k + 1}: bbox [x1, y1, x2, y2] = [{', '.join(str(int(v)) for v in inst.bbox)}] px",
            f"{_share(inst.area, h * w)} of the image",
            f"centroid (x={cx:.1f}, y={cy:.1f}) px",
            f"mask score {inst.score:.2f}",
        ]
        point = points[k] if points is not None and k < len(points) else None
        if point is not None:
            parts.append("3D point (x={:.3f}, y={:.3f}, z={:.3f}) m in the camera frame".format(*point))
        lines.append(", ".join(parts) + ".")
    if len(found) > max_listed:
        lines.append(f"{len(found) - max_listed} more object(s) are in the artifact only.")
    if note:
        lines.append(note)
    return "\n".join(lines)


def _share(area: int, total: int) -> str:
    pct = 100.0 * area / max(total, 1)
    return f"{pct:.1f}%" if pct >= 1.0 else f"{pct:.2f}%"


def _validation_message(error: ValidationError) -> str:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'input'}: {e.get('msg')}"
                         for e in error.errors())
    return (f"Invalid arguments ({problems}). Call the tool with "
            '{"query": "<what to find, e.g. something to cut with>"} and optionally "image" '
            "(file path, http(s) URL or data URI).")


def _is_async_backend(backend: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(backend, "segment", None))


def _run_coroutine_blocking(make_coro: Callable[[], Any]) -> Any:
    """Run a coroutine to completion from sync code, even when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


class LisaSegmentTool(BaseTool):
    """``segment_objects``: find the objects a natural-language request refers to, with masks.

    Args (constructor keywords):
        backend: a ``LisaSegmenter``, ``LisaClient`` or ``AsyncLisaClient``: anything with
            ``segment(image, query, *, mode=..., **segment_options) -> SegmentationResult``
            (a coroutine function for async clients).
        async_backend: optional ``AsyncLisaClient`` used by ``ainvoke`` beside a sync ``backend``.
        image_source: optional callable returning the current frame as an HxWx3 uint8 RGB array,
            or a ``(frame, stamp)`` tuple, or None when no frame has arrived yet. Used when the
            caller passes no ``image``.
        depth_source: optional callable returning a depth image aligned with ``image_source``'s
            frames (HxW, or ``(depth, stamp)``); with ``intrinsics`` each object gets a 3D point.
        intrinsics: (fx, fy, cx, cy) in pixels, a :class:`lisa_agent.geometry.Intrinsics`, or a
            callable returning either (e.g. from the latest camera info; None while unknown).
        depth_scale: metres per depth unit; None: uint16 depth is millimetres, float depth metres.
        default_mode: mode used when the caller passes none (``fast`` or ``chat``).
        segment_options: extra keywords for ``backend.segment`` (e.g. ``max_new_tokens``, or
            ``answer`` to set the teacher-forced answer of fast mode).
        allow_files / allow_urls: whether the model may name local files / http(s) URLs.
        url_timeout: seconds to wait for an image URL.

    Output (``invoke`` with a ToolCall returns a ``ToolMessage``): ``content`` is the text above;
    ``artifact`` is a dict with ``query``, ``mode``, ``answer`` (LISA's text), ``image_size``
    [H, W], ``image`` (where the frame came from), ``frame`` (the HxWx3 uint8 RGB frame used),
    ``stamp`` (the image source's stamp or None), ``masks`` (N x H x W bool), ``boxes`` (N XYXY
    inclusive pixel boxes), ``objects`` (per mask: ``bbox``, ``area``, ``share`` of the image in
    [0, 1], ``centroid`` [x, y], ``score``, ``empty``, ``point_3d`` [x, y, z] metres or None,
    ``rle`` COCO RLE), ``timings_ms`` (the engine's stages plus ``tool_image_ms`` and
    ``tool_total_ms``) and ``result`` (the :class:`~lisa_agent.SegmentationResult`).
    Errors come back as a ToolMessage with ``status="error"``, an actionable ``content`` and no
    artifact.
    """

    name: str = "segment_objects"
    description: str = (
        "Locate objects in the robot's camera image (or a given image) from a natural-language "
        "description, including implicit ones such as 'something to cut with' or 'what I can drink "
        "from'. Returns how many objects match and, for each, its bounding box [x1, y1, x2, y2] in "
        "pixels, its share of the image, its centroid, a 3D point in the camera frame when depth is "
        "available, and the vision model's answer. Call it before acting on or talking about an "
        "object's position."
    )
    args_schema: type[BaseModel] = SegmentObjectsInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool = True
    handle_validation_error: Any = _validation_message

    backend: Any
    async_backend: Any = None
    image_source: Callable[[], Any] | None = None
    depth_source: Callable[[], Any] | None = None
    intrinsics: Any = None
    depth_scale: float | None = None
    default_mode: Literal["fast", "chat"] = "fast"
    segment_options: dict[str, Any] = Field(default_factory=dict)
    allow_files: bool = True
    allow_urls: bool = True
    url_timeout: float = 10.0

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    #: Word the text as an explanation (LISA's answer first) rather than a search result.
    _explain: bool = False

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, value: Any) -> Any:
        if not callable(getattr(value, "segment", None)):
            raise ValueError(
                f"backend must have a segment(image, query, mode=...) method (LisaSegmenter, LisaClient or "
                f"AsyncLisaClient); got {type(value).__name__}")
        return value

    @field_validator("async_backend")
    @classmethod
    def _check_async_backend(cls, value: Any) -> Any:
        if value is not None and not _is_async_backend(value):
            raise ValueError(f"async_backend must have an async segment(...) method (AsyncLisaClient); "
                             f"got {type(value).__name__}")
        return value

    @field_validator("intrinsics")
    @classmethod
    def _check_intrinsics(cls, value: Any) -> Any:
        if value is None or callable(value) or isinstance(value, Intrinsics):
            return value
        values = tuple(float(v) for v in value)
        if len(values) != 4:
            raise ValueError(f"intrinsics must be (fx, fy, cx, cy) in pixels; got {value!r}")
        return Intrinsics(*values)

    # ---- the one code path: prepare -> backend -> finish, errors mapped once ----

    def _run(
        self,
        query: str,
        image: str | None = None,
        mode: str | None = None,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, dict[str, Any]]:
        t0 = time.perf_counter()
        with self._tool_errors():
            frame = self._prepare(query, image, mode)
            if _is_async_backend(self.backend):
                result = _run_coroutine_blocking(lambda: self._call_async(self.backend, frame))
            else:
                result = self._call_sync(frame)
            return self._finish(frame, result, t0)

    async def _arun(
        self,
        query: str,
        image: str | None = None,
        mode: str | None = None,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
    ) -> tuple[str, dict[str, Any]]:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        with self._tool_errors():
            # Loading may read a file or fetch a URL: keep it off the event loop.
            frame = await loop.run_in_executor(None, functools.partial(self._prepare, query, image, mode))
            backend = self.async_backend or self.backend
            if _is_async_backend(backend):
                result = await self._call_async(backend, frame)
            else:
                result = await loop.run_in_executor(None, self._call_sync, frame)
            return self._finish(frame, result, t0)

    def _prepare(self, query: str, image: str | None, mode: str | None) -> _Frame:
        text = check_query(query)
        mode = mode or self.default_mode
        if mode not in ("fast", "chat"):
            raise InvalidArgumentError(f"mode must be 'fast' or 'chat'; got {mode!r}")
        t0 = time.perf_counter()
        if image is not None and image.strip() and image.strip().lower() not in ("none", "null", "camera"):
            array = load_image(image, timeout=self.url_timeout, allow_files=self.allow_files,
                               allow_urls=self.allow_urls)
            kind = "data URI" if image.lstrip()[:5].lower() == "data:" else repr(image.strip()[:80])
            return _Frame(array, text, mode, f"the image {kind}", load_ms=_ms(t0))
        if self.image_source is None:
            raise ToolException(
                "No image was given and this tool has no camera configured: pass `image` as a file path, "
                "an http(s) URL or a data URI.")
        frame, stamp = _split_stamped(self._call_source(self.image_source, "image source"))
        if frame is None:
            raise ToolException("The camera has not delivered a frame yet; wait a moment and call the tool "
                                "again, or pass `image`.")
        try:
            array = check_image(frame)
        except InvalidImageError as exc:
            raise ToolException(f"The camera frame is unusable ({exc}); this is a setup problem of the robot, "
                                "not of your request.") from exc
        depth, depth_note = None, ""
        if self.depth_source is not None:
            try:  # without depth the 2D answer is still worth giving
                depth, _ = _split_stamped(self.depth_source())
                depth = None if depth is None else np.asarray(depth)
                depth_note = "" if depth is not None else "3D points unavailable: no depth image has arrived yet."
            except Exception as exc:
                log.exception("depth source failed")
                depth_note = f"3D points unavailable: the depth source failed ({type(exc).__name__}: {exc})."
        return _Frame(array, text, mode, "the newest camera frame", stamp=stamp, depth=depth, load_ms=_ms(t0),
                      depth_note=depth_note)

    @staticmethod
    def _call_source(source: Callable[[], Any], what: str) -> Any:
        try:
            return source()
        except Exception as exc:
            log.exception("%s failed", what)
            raise ToolException(f"The {what} failed ({type(exc).__name__}: {exc}); try again, or pass `image` "
                                "explicitly.") from exc

    def _options(self, frame: _Frame) -> dict[str, Any]:
        return {"mode": frame.mode, **self.segment_options}

    def _call_sync(self, frame: _Frame) -> SegmentationResult:
        # One query at a time per tool: engines and ZeroMQ sockets are not thread-safe.
        with self._lock:
            return self.backend.segment(frame.image, frame.query, **self._options(frame))

    async def _call_async(self, backend: Any, frame: _Frame) -> SegmentationResult:
        return await backend.segment(frame.image, frame.query, **self._options(frame))

    def _finish(self, frame: _Frame, result: SegmentationResult, t0: float) -> tuple[str, dict[str, Any]]:
        if not isinstance(result, SegmentationResult):
            raise ToolException(f"The LISA backend returned {type(result).__name__}, not a SegmentationResult; "
                                "the tool is misconfigured.")
        h, w = frame.image.shape[:2]
        if len(result.masks) and tuple(result.masks.shape[1:]) != (h, w):
            raise ToolException(f"The LISA backend returned masks of size {tuple(result.masks.shape[1:])} for a "
                                f"{h}x{w} frame; the tool is misconfigured.")
        if tuple(result.image_size) != (h, w):
            result.image_size = (h, w)
        points, note = self._points(frame, result)
        content = describe_result(result, source=frame.source, points=points, note=note,
                                  stamp=None if frame.stamp is None else _fmt_stamp(frame.stamp),
                                  explain=self._explain)
        objects = []
        for k, inst in enumerate(result.instances):
            cx, cy = inst.centroid
            objects.append({
                "bbox": [int(v) for v in inst.bbox],
                "area": int(inst.area),
                "share": inst.area / float(h * w),
                "centroid": None if math.isnan(cx) else [float(cx), float(cy)],
                "score": float(inst.score),
                "empty": inst.area == 0,
                "point_3d": None if points is None or points[k] is None else list(points[k]),
                "rle": mask_to_rle(result.masks[k]),
            })
        timings = {k: float(v) for k, v in result.timings_ms.items()}
        timings["tool_image_ms"] = frame.load_ms
        timings["tool_total_ms"] = _ms(t0)
        artifact = {
            "query": frame.query,
            "mode": frame.mode,
            "answer": result.text,
            "image_size": [h, w],
            "image": frame.source,
            "frame": frame.image,
            "stamp": frame.stamp,
            "masks": result.masks,
            "boxes": [o["bbox"] for o in objects],
            "objects": objects,
            "timings_ms": timings,
            "result": result,
        }
        return content, artifact

    def _points(self, frame: _Frame, result: SegmentationResult) -> tuple[list | None, str]:
        """3D points per mask when the frame came with depth and intrinsics, plus a note if not."""
        if frame.depth is None:
            return None, frame.depth_note
        intrinsics = self.intrinsics() if callable(self.intrinsics) else self.intrinsics
        if intrinsics is None:
            return None, "3D points unavailable: the camera intrinsics are not known yet."
        if not isinstance(intrinsics, Intrinsics):
            intrinsics = Intrinsics(*(float(v) for v in intrinsics))
        depth = frame.depth[..., 0] if frame.depth.ndim == 3 else frame.depth
        if depth.shape != frame.image.shape[:2]:
            return None, (f"3D points unavailable: the depth image is {depth.shape[0]}x{depth.shape[1]}, "
                          f"not aligned with the {frame.image.shape[0]}x{frame.image.shape[1]} colour frame.")
        if self.depth_scale is not None:
            depth_m = depth.astype(np.float32) * np.float32(self.depth_scale)
            depth_m[~np.isfinite(depth_m) | (depth_m <= 0)] = np.nan
        else:
            depth_m = depth_to_meters(depth)
        points: list[tuple[float, float, float] | None] = []
        for mask in result.masks:
            target = mask_target_point(depth_m, mask, intrinsics)
            points.append(None if target is None else target.point)
        missing = sum(1 for p, inst in zip(points, result.instances, strict=True) if p is None and inst.area > 0)
        note = f"{missing} object(s) have no valid depth inside the mask, so no 3D point." if missing else ""
        return points, note

    @contextmanager
    def _tool_errors(self) -> Iterator[None]:
        """Turn every failure into a ToolException whose message tells the model what to do."""
        try:
            yield
        except ToolException:
            raise
        except InvalidQueryError as exc:
            hint = "" if "e.g." in str(exc) else " Describe the object in words, e.g. 'something to cut with'."
            raise ToolException(f"Invalid query: {exc}.{hint}") from exc
        except InvalidImageError as exc:
            raise ToolException(f"Could not use the image: {exc}") from exc
        except InvalidArgumentError as exc:
            raise ToolException(f"Invalid argument: {exc}") from exc
        except LisaError as exc:
            code = getattr(exc, "code", LisaError.code)
            advice = _SERVICE_ADVICE.get(code, "Tell the user that the vision model failed.")
            raise ToolException(f"The LISA vision model failed ({code}): {exc}. {advice}") from exc
        except Exception as exc:
            log.exception("segment_objects failed")
            raise ToolException(f"The LISA segmentation model failed unexpectedly ({type(exc).__name__}: {exc}). "
                                "Do not retry with the same input; tell the user.") from exc


class LisaExplainTool(LisaSegmentTool):
    """``explain_objects``: LISA in chat mode, for answers that explain, with the masks they refer to."""

    name: str = "explain_objects"
    description: str = (
        "Ask the vision model a question about the robot's camera image (or a given image) that needs "
        "reasoning, e.g. 'What here could I use to cut the rope, and why?'. Returns the model's answer in "
        "words and the bounding boxes of the objects it points at. Slower than segment_objects; use "
        "segment_objects when you only need where an object is."
    )
    args_schema: type[BaseModel] = ExplainObjectsInput
    default_mode: Literal["fast", "chat"] = "chat"
    _explain: bool = True

    def _run(  # type: ignore[override]
        self, query: str, image: str | None = None, run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, dict[str, Any]]:
        return super()._run(query, image, "chat", run_manager=run_manager)

    async def _arun(  # type: ignore[override]
        self, query: str, image: str | None = None, run_manager: AsyncCallbackManagerForToolRun | None = None,
    ) -> tuple[str, dict[str, Any]]:
        return await super()._arun(query, image, "chat", run_manager=run_manager)


def lisa_tools(
    backend: Any,
    image_source: Callable[[], Any] | None = None,
    *,
    explain: bool = True,
    **options: Any,
) -> list[BaseTool]:
    """The LISA tools, ready for ``langchain.agents.create_agent(model, tools)`` or a LangGraph ``ToolNode``.

    Args:
        backend: ``LisaSegmenter``, ``LisaClient`` or ``AsyncLisaClient``.
        image_source: callable returning the current HxWx3 uint8 RGB frame (or ``(frame, stamp)``).
        explain: also return ``explain_objects`` (LISA's chat mode, for explanatory answers).
        **options: further :class:`LisaSegmentTool` fields shared by both tools (``async_backend``,
            ``depth_source``, ``intrinsics``, ``depth_scale``, ``segment_options``, ``allow_files``,
            ``allow_urls``, ...).
    """
    tools: list[BaseTool] = [LisaSegmentTool(backend=backend, image_source=image_source, **options)]
    if explain:
        tools.append(LisaExplainTool(backend=backend, image_source=image_source, **options))
    return tools


#: What the calling model should do after a backend error, by ``LisaError.code``.
_SERVICE_ADVICE = {
    "unavailable": "The vision model server is down or unreachable; retrying now will not help. Tell the "
                   "user that the vision model is unavailable.",
    "queue_full": "The vision model server is busy; wait a moment and call the tool again.",
    "deadline_exceeded": "The vision model server was too slow; call the tool again.",
    "superseded": "A newer camera frame replaced this request; call the tool again.",
    "shutting_down": "The vision model server is shutting down. Tell the user that the vision model is "
                     "unavailable.",
}


def _split_stamped(value: Any) -> tuple[Any, Any]:
    """``frame`` -> (frame, None); ``(frame, stamp)`` -> (frame, stamp)."""
    if isinstance(value, tuple) and len(value) == 2:
        return value[0], value[1]
    return value, None


def _fmt_stamp(stamp: Any) -> str:
    if isinstance(stamp, float):
        return f"{stamp:.3f}"
    text = str(stamp)
    return text if len(text) <= 60 else text[:57] + "..."


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
