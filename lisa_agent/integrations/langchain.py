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
``async_backend`` beside a sync one: a :class:`~lisa_agent.backend.SegmentBackend` (or its async
twin), which takes a :class:`~lisa_agent.frames.Frame` and returns a
:class:`~lisa_agent.SegmentationResult`. The tool builds the Frame (pixels, stamp, depth with its own
stamp, intrinsics); the engine computes the 3D targets and refuses depth from another instant.

The schemas and the text the model reads are in :mod:`lisa_agent.integrations.tool_io`.

Requires ``langchain-core`` (``pip install lisa-agent[langchain]``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from ..backend import AsyncSegmentBackend, SegmentBackend
from ..errors import InvalidArgumentError, InvalidImageError, LisaError, describe_error
from ..frames import DEPTH_TOLERANCE_S, Frame, check_query, intrinsics_of
from ..options import INTERACTIVE_MODES, QueryOptions, TrackOptions
from ..result import SegmentationResult
from ..tracking import StreamSegmenter
from .images import ImageAccess, load_image
from .tool_io import (
    EXPLAIN_DESCRIPTION,
    SEGMENT_DESCRIPTION,
    ExplainObjectsInput,
    SegmentObjectsInput,
    describe_result,
    given_image,
    validation_message,
)

__all__ = [
    "ExplainObjectsInput",
    "LisaExplainTool",
    "LisaSegmentTool",
    "SegmentObjectsInput",
    "describe_result",
    "lisa_tools",
]

log = logging.getLogger(__name__)


@dataclass
class _ToolRequest:
    """One prepared call: the frame to segment, the query, and where the frame came from."""

    frame: Frame
    query: str
    options: QueryOptions
    source: str
    load_ms: float = 0.0
    depth_note: str = ""  # why the frame has no depth although a depth source is configured


def _is_async_backend(backend: Any) -> bool:
    return isinstance(backend, AsyncSegmentBackend) and asyncio.iscoroutinefunction(backend.segment)


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
        backend: a ``LisaSegmenter``, ``LisaClient`` or ``AsyncLisaClient``
            (:class:`~lisa_agent.frames.SegmentBackend` or its async twin).
        async_backend: optional ``AsyncLisaClient`` used by ``ainvoke`` beside a sync ``backend``.
        image_source: optional callable returning the current frame as an HxWx3 uint8 RGB array,
            or a ``(frame, stamp)`` tuple, or None when no frame has arrived yet. Used when the
            caller passes no ``image``.
        depth_source: optional callable returning a depth image aligned with ``image_source``'s
            frames (HxW, or ``(depth, stamp)``); with ``intrinsics`` each object gets a 3D point.
            Depth stamped more than ``depth_tolerance_s`` away from the colour frame's stamp is
            refused (no 3D points, and the text says why).
        intrinsics: (fx, fy, cx, cy) in pixels, a :class:`lisa_agent.geometry.Intrinsics`, or a
            callable returning either (e.g. from the latest camera info; None while unknown).
        depth_scale: metres per depth unit; None: uint16 depth is millimetres, float depth metres.
        depth_tolerance_s: seconds between colour and depth stamps still treated as the same instant.
        query_options: how the model answers (:class:`~lisa_agent.options.QueryOptions`: the mode when the
            caller names none, ``max_new_tokens``, the forced ``answer`` of fast mode); the caller's ``mode``
            replaces its mode.
        image_folders: folders whose image files the model may name (default: none, so no files).
        image_hosts: URL hosts the model may name (default: none, so no URLs; ``"*"`` for any host);
            redirects are followed only within them, and private addresses only when listed as such
            (see :class:`lisa_agent.integrations.images.ImageAccess`). Data URIs are always accepted.
        url_timeout: seconds to wait for an image URL.
        track: a session over the camera stream (:class:`~lisa_agent.options.TrackOptions`; default None: every
            call runs LISA): a call repeating the previous call's query on a newer camera frame is answered by
            the tracker, carrying LISA's last masks to that frame, unless ``reason_every`` calls or
            ``reason_period_s`` seconds have passed since LISA last ran, or the tracker lost confidence; the
            text then says the masks were tracked and how old the reasoning is. Sync backends only.

    Output (``invoke`` with a ToolCall returns a ``ToolMessage``): ``content`` is the text above;
    ``artifact`` is a dict: ``result`` (the result schema, ``docs/result.md``: answer, per mask bbox,
    area, centroid, score, 3D ``target`` and COCO ``rle``, the frame's stamp, timings), and the
    envelope keys ``segmentation`` (the :class:`~lisa_agent.SegmentationResult`), ``masks`` (N x H x W
    bool), ``frame`` (the HxWx3 uint8 RGB frame used), ``image`` (where it came from) and
    ``tool_ms`` (``image``: loading the frame, ``total``: the whole call).
    Errors come back as a ToolMessage with ``status="error"``, an actionable ``content`` and no
    artifact.
    """

    name: str = "segment_objects"
    description: str = SEGMENT_DESCRIPTION
    args_schema: type[BaseModel] = SegmentObjectsInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool = True
    handle_validation_error: Any = validation_message

    backend: Any  # SegmentBackend | AsyncSegmentBackend (checked below; pydantic cannot check Protocols)
    async_backend: Any = None
    image_source: Callable[[], Any] | None = None
    depth_source: Callable[[], Any] | None = None
    intrinsics: Any = None
    depth_scale: float | None = None
    depth_tolerance_s: float = DEPTH_TOLERANCE_S
    query_options: QueryOptions = Field(default_factory=QueryOptions)
    image_folders: list[str | Path] = Field(default_factory=list)
    image_hosts: list[str] = Field(default_factory=list)
    url_timeout: float = 10.0
    track: TrackOptions | None = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _stream: StreamSegmenter | None = PrivateAttr(default=None)
    #: Word the text as an explanation (LISA's answer first) rather than a search result.
    _explain: bool = False

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, value: Any) -> Any:
        if not isinstance(value, (SegmentBackend, AsyncSegmentBackend)):
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

    @field_validator("query_options")
    @classmethod
    def _check_query_options(cls, value: Any) -> Any:
        if not isinstance(value, QueryOptions):
            raise ValueError(f"query_options must be a lisa_agent.options.QueryOptions; got {type(value).__name__}")
        if value.mode not in INTERACTIVE_MODES:
            raise ValueError(f"query_options.mode must be one of {', '.join(INTERACTIVE_MODES)}; got {value.mode!r}")
        return value

    @field_validator("track")
    @classmethod
    def _check_track(cls, value: Any, info: Any) -> Any:
        if value is not None and not isinstance(value, TrackOptions):
            raise ValueError(f"track must be a lisa_agent.options.TrackOptions or None; got {type(value).__name__}")
        backend = info.data.get("backend")
        if value is not None and backend is not None and _is_async_backend(backend):
            raise ValueError("track needs a sync backend (LisaSegmenter or LisaClient); the session runs LISA "
                             "and the tracker in the tool's thread")
        return value

    @field_validator("intrinsics")
    @classmethod
    def _check_intrinsics(cls, value: Any) -> Any:
        if value is None or callable(value):
            return value
        try:
            return intrinsics_of(value)
        except InvalidArgumentError as exc:
            raise ValueError(str(exc)) from None

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
            request = self._prepare(query, image, mode)
            if _is_async_backend(self.backend):
                result = _run_coroutine_blocking(lambda: self._call_async(self.backend, request))
            else:
                result = self._call_sync(request)
            return self._finish(request, result, t0)

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
            request = await loop.run_in_executor(None, functools.partial(self._prepare, query, image, mode))
            backend = self.async_backend or self.backend
            if _is_async_backend(backend):
                result = await self._call_async(backend, request)
            else:
                result = await loop.run_in_executor(None, self._call_sync, request)
            return self._finish(request, result, t0)

    def _prepare(self, query: str, image: str | None, mode: str | None) -> _ToolRequest:
        text = check_query(query)
        if mode is not None and mode not in INTERACTIVE_MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(INTERACTIVE_MODES)}; got {mode!r}")
        options = QueryOptions.of(self.query_options, mode=mode)
        t0 = time.perf_counter()
        image = given_image(image)
        if image is not None:
            access = ImageAccess.of(self.image_folders, self.image_hosts)
            array = load_image(image, access=access, timeout=self.url_timeout)
            kind = "data URI" if image.lstrip()[:5].lower() == "data:" else repr(image.strip()[:80])
            return _ToolRequest(Frame(array), text, options, f"the image {kind}", load_ms=_ms(t0))
        if self.image_source is None:
            raise ToolException(
                "No image was given and this tool has no camera configured: pass `image` as a file path, "
                "an http(s) URL or a data URI.")
        pixels, stamp = _split_stamped(self._call_source(self.image_source, "image source"))
        if pixels is None:
            raise ToolException("The camera has not delivered a frame yet; wait a moment and call the tool "
                                "again, or pass `image`.")
        try:
            frame = Frame(pixels, stamp=stamp)
        except (InvalidImageError, InvalidArgumentError) as exc:
            raise ToolException(f"The camera frame is unusable ({exc}); this is a setup problem of the robot, "
                                "not of your request.") from exc
        frame, depth_note = self._with_depth(frame)
        return _ToolRequest(frame, text, options, "the newest camera frame", load_ms=_ms(t0), depth_note=depth_note)

    def _with_depth(self, frame: Frame) -> tuple[Frame, str]:
        """``frame`` with the depth source's newest depth, stamp and the intrinsics; without them (and a
        note saying why) when there is none or it is unusable: the 2D answer is still worth giving."""
        if self.depth_source is None:
            return frame, ""
        try:
            depth, depth_stamp = _split_stamped(self.depth_source())
            if depth is None:
                return frame, "no depth image has arrived yet"
            intrinsics = self.intrinsics() if callable(self.intrinsics) else self.intrinsics
            return replace(frame, depth=np.asarray(depth), depth_stamp=depth_stamp, depth_scale=self.depth_scale,
                           intrinsics=intrinsics, depth_tolerance_s=self.depth_tolerance_s), ""
        except LisaError as exc:
            return frame, f"the depth image is unusable ({exc})"
        except Exception as exc:
            log.exception("depth source failed")
            return frame, f"the depth source failed ({type(exc).__name__}: {exc})"

    @staticmethod
    def _call_source(source: Callable[[], Any], what: str) -> Any:
        try:
            return source()
        except Exception as exc:
            log.exception("%s failed", what)
            raise ToolException(f"The {what} failed ({type(exc).__name__}: {exc}); try again, or pass `image` "
                                "explicitly.") from exc

    def _call_sync(self, request: _ToolRequest) -> SegmentationResult:
        # One query at a time per tool: engines and ZeroMQ sockets are not thread-safe.
        with self._lock:
            if self.track is not None and request.source == "the newest camera frame":
                return self._tracked(request)
            result: SegmentationResult = self.backend.segment(request.frame, request.query, options=request.options)
            return result

    def _tracked(self, request: _ToolRequest) -> SegmentationResult:
        """The camera session: the tracker answers a repeated query, LISA a new one (or when due)."""
        stream = self._stream
        if stream is None or stream.query != request.options:
            stream = StreamSegmenter(self.backend, self.track, query=request.options)
            self._stream = stream
        if stream.instruction != request.query:
            stream.set_instruction(request.query)
        result = stream.process(request.frame)
        assert result is not None  # synchronous: every frame gets an answer
        return result

    async def _call_async(self, backend: AsyncSegmentBackend, request: _ToolRequest) -> SegmentationResult:
        return await backend.segment(request.frame, request.query, options=request.options)

    def _finish(self, request: _ToolRequest, result: SegmentationResult, t0: float) -> tuple[str, dict[str, Any]]:
        if not isinstance(result, SegmentationResult):
            raise ToolException(f"The LISA backend returned {type(result).__name__}, not a SegmentationResult; "
                                "the tool is misconfigured.")
        h, w = request.frame.size
        if tuple(result.image_size) != (h, w) or (len(result.masks) and tuple(result.masks.shape[1:]) != (h, w)):
            raise ToolException(f"The LISA backend answered for a {result.image_size[0]}x{result.image_size[1]} "
                                f"frame, not the {h}x{w} one it was given; the tool is misconfigured.")
        content = describe_result(result, source=request.source, note=request.depth_note, explain=self._explain)
        artifact = {
            "result": result.to_dict(),
            "segmentation": result,
            "masks": result.masks,
            "frame": request.frame.rgb,
            "image": request.source,
            "tool_ms": {"image": request.load_ms, "total": _ms(t0)},
        }
        return content, artifact

    @contextmanager
    def _tool_errors(self) -> Iterator[None]:
        """Turn every failure into a ToolException whose message tells the model what to do (the library's one
        error description: :func:`lisa_agent.errors.describe_error`)."""
        try:
            yield
        except ToolException:
            raise
        except Exception as exc:
            if not isinstance(exc, LisaError):
                log.exception("%s failed", self.name)
            raise ToolException(describe_error(exc).sentence()) from exc


class LisaExplainTool(LisaSegmentTool):
    """``explain_objects``: LISA in chat mode, for answers that explain, with the masks they refer to."""

    name: str = "explain_objects"
    description: str = EXPLAIN_DESCRIPTION
    args_schema: type[BaseModel] = ExplainObjectsInput
    query_options: QueryOptions = Field(default_factory=lambda: QueryOptions(mode="chat"))
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
            ``depth_source``, ``intrinsics``, ``depth_scale``, ``depth_tolerance_s``, ``query_options``,
            ``image_folders``, ``image_hosts``, ...).
    """
    tools: list[BaseTool] = [LisaSegmentTool(backend=backend, image_source=image_source, **options)]
    if explain:
        tools.append(LisaExplainTool(backend=backend, image_source=image_source, **options))
    return tools


def _split_stamped(value: Any) -> tuple[Any, Any]:
    """``frame`` -> (frame, None); ``(frame, stamp)`` -> (frame, stamp)."""
    if isinstance(value, tuple) and len(value) == 2:
        return value[0], value[1]
    return value, None


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
