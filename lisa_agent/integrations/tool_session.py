"""What the MCP server's tools act on, with no MCP code: the model, the frame source's recent frames, the tracking
stream and the latest answer.

:class:`ToolSession` reads a :class:`~lisa_agent.console.sources.FrameSource` (the console's sources:
``synthetic``, ``camera:N``, ``video:FILE``, ``ros:TOPIC``) in a thread of its own and keeps its newest frame
and the last :data:`KEEP_FRAMES` frames it handed to a caller, numbered by the source (``frame_seq``), so a
caller can ask about the frame it looked at however fast the camera runs. :meth:`ToolSession.segment` answers an instruction on the newest frame, on a recent frame by its
number, or on an image the caller passes (a data URI, or a file or URL where allowed: the LangChain tool's
rules, :class:`~lisa_agent.integrations.images.ImageAccess`, size checked before decoding).
:meth:`ToolSession.track` starts (or stops) a :class:`~lisa_agent.tracking.StreamSegmenter` on the source:
LISA now and then in a worker thread, a tracker on every frame; a :meth:`~ToolSession.segment` call with the
tracked instruction is then answered with the masks tracked to the newest frame, and their age.

Model calls are serialized (one at a time on the engine, whichever caller: a tool call, the stream's
reasoning step). Every failure is a :class:`~lisa_agent.errors.LisaError` (the one error vocabulary).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backend import SegmentBackend
from ..console.answers import SerialBackend
from ..console.core import MAX_INSTRUCTION_CHARS, MAX_PENDING
from ..console.sources import FrameSource, SourceFrame
from ..errors import (
    InvalidArgumentError,
    InvalidQueryError,
    NoFrameError,
    ServerBusyError,
    SourceError,
)
from ..frames import Frame, check_query
from ..options import INTERACTIVE_MODES, QueryOptions, TrackOptions
from ..result import SegmentationResult
from ..tracking import StreamSegmenter
from .images import ImageAccess, load_image
from .tool_io import given_image

log = logging.getLogger("lisa_agent.mcp")

#: Frames handed to callers (by ``look`` or an answer on the newest frame) kept, so a caller can name the frame
#: it looked at (``frame_seq``). Counted in frames handed out, not camera frames: a host's model may think for
#: seconds between ``look`` and ``segment_objects``, while a 30 Hz camera moves on by a hundred frames.
KEEP_FRAMES = 16
#: Largest image a caller may pass inline (decoded bytes; a data URI's base64 is checked before decoding). A
#: protocol message is held in memory whole, and a camera frame is a few hundred kilobytes.
MAX_INLINE_IMAGE_BYTES = 16 * 1024 * 1024


@dataclass
class ToolAnswer:
    """One answer: the model's result, the frame it is for, and where that frame came from.

    Attributes:
        result: the model's result (:class:`~lisa_agent.SegmentationResult`; ``track`` set when tracked).
        frame: the frame (HxWx3 uint8 RGB pixels in ``frame.rgb``).
        source: where the frame came from, in words ("camera frame 12", "the image passed inline").
        frame_seq: the source's number of the frame, or None for an image passed in.
        load_ms: reading the frame (decoding an inline image, fetching a URL).
        created: when the answer was made (``time.time()``).
    """

    result: SegmentationResult
    frame: Frame
    source: str
    frame_seq: int | None
    load_ms: float = 0.0
    created: float = field(default_factory=time.time)


class ToolSession:
    """The model, the frames and the tracking stream the MCP tools share.

    Args:
        backend: the model (a :class:`~lisa_agent.LisaSegmenter`, or a ``LisaClient`` of a model server).
        source: where camera frames come from (None: no camera; only images passed in are answered).
        query: how instructions are answered (:class:`~lisa_agent.options.QueryOptions`; a call may name its own
            ``mode``); default: the library's (``fast``).
        track: how :meth:`track` carries masks between reasoning steps (:class:`~lisa_agent.options.TrackOptions`).
        image_folders: folders whose image files a caller may name (default: none, so no files).
        image_hosts: URL hosts a caller may name (default: none, so no URLs; ``"*"`` any host).
        url_timeout: seconds to wait for an image URL.
        max_image_bytes: largest image a caller may pass (encoded bytes).
        keep_frames: frames handed to callers kept for ``frame_seq`` (besides the newest).
        model_name: the model, in words (for the server's instructions and logs).

    Use: :meth:`start`, then :meth:`latest`, :meth:`segment`, :meth:`track`; :meth:`close` at the end.
    """

    def __init__(self, backend: SegmentBackend, source: FrameSource | None, *, query: QueryOptions | None = None,
                 track: TrackOptions | None = None, image_folders: Iterable[str | Path] = (),
                 image_hosts: Iterable[str] = (), url_timeout: float = 10.0,
                 max_image_bytes: int = MAX_INLINE_IMAGE_BYTES, keep_frames: int = KEEP_FRAMES,
                 model_name: str = "") -> None:
        self.query = query if query is not None else QueryOptions()
        if self.query.mode not in INTERACTIVE_MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(INTERACTIVE_MODES)}; got {self.query.mode!r}")
        if not 1 <= int(keep_frames) <= 10_000:
            raise InvalidArgumentError(f"keep_frames must be in [1, 10000]; got {keep_frames!r}")
        self.track_options = track or TrackOptions()
        self.backend = SerialBackend(backend, threading.Lock())
        self.source = source
        self.source_name = "no camera" if source is None else source.describe()
        self.model_name = model_name
        self.access = ImageAccess.of(image_folders, image_hosts)
        self.url_timeout = float(url_timeout)
        self.max_image_bytes = int(max_image_bytes)
        self._newest: SourceFrame | None = None
        self._keep = int(keep_frames)
        self._handed: collections.OrderedDict[int, SourceFrame] = collections.OrderedDict()  # seq -> frame
        self._lock = threading.Condition(threading.RLock())
        self._stream: StreamSegmenter | None = None
        self._tracked: ToolAnswer | None = None  # the stream's newest masks
        self._stream_error: BaseException | None = None
        self._last: ToolAnswer | None = None  # the newest answer of a tool call
        self._pending = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> ToolSession:
        """Start reading frames (idempotent; nothing to read without a source)."""
        if self.source is not None and self._thread is None:
            self._thread = threading.Thread(target=self._pump, name="lisa-mcp-frames", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop reading frames, end the tracking stream and close the source."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        with self._lock:
            stream, self._stream = self._stream, None
            self._lock.notify_all()
        if stream is not None:
            stream.close(wait=False)
        if self.source is not None:
            self.source.close()

    def _pump(self) -> None:
        assert self.source is not None
        while not self._stop.is_set():
            try:
                got = self.source.read(timeout=0.5)
            except Exception as exc:  # a camera that fails now and then: say so, keep trying
                log.warning("frame source failed: %s", exc)
                self._stop.wait(0.5)
                continue
            if got is None:
                continue
            with self._lock:
                self._newest = got
                stream = self._stream
                self._lock.notify_all()
            if stream is not None:
                self._advance(stream, got)

    def _advance(self, stream: StreamSegmenter, got: SourceFrame) -> None:
        """Give the tracking stream this frame; keep its masks (or the error that ended it)."""
        try:
            result = stream.process(got.frame)
        except Exception as exc:  # LISA failed in the background: the stream ends, the next call says why
            log.warning("tracking stopped: %s", exc)
            with self._lock:
                if self._stream is stream:
                    self._stream, self._stream_error = None, exc
                self._lock.notify_all()
            stream.close(wait=False)
            return
        if result is None:
            return
        with self._lock:
            if self._stream is stream:
                self._tracked = ToolAnswer(result, got.frame, f"camera frame {got.seq}", got.seq)
            self._lock.notify_all()

    # ------------------------------------------------------------------ frames
    def latest(self, timeout: float = 10.0) -> SourceFrame:
        """The newest camera frame, waiting up to ``timeout`` seconds for the first; NoFrameError without one.

        The frame is kept (with the last :data:`KEEP_FRAMES` others handed out), so :meth:`frame` finds it later.
        """
        if self.source is None:
            raise NoFrameError("this server has no camera (--source none): pass an image instead",
                               advice="Pass the image as a data URI (data:image/png;base64,...).")
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._newest is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    raise NoFrameError(f"no frame from {self.source_name} within {timeout:g} s")
                self._lock.wait(left)
            got = self._newest
            self._handed[got.seq] = got
            self._handed.move_to_end(got.seq)
            while len(self._handed) > self._keep:
                self._handed.popitem(last=False)
            return got

    def frame(self, seq: int) -> SourceFrame:
        """Frame number ``seq`` (one handed out, or the newest); InvalidArgumentError naming those kept otherwise."""
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise InvalidArgumentError(f"frame_seq must be a whole number; got {seq!r:.50}")
        if self.source is None:
            raise InvalidArgumentError("this server has no camera (--source none), so no frame numbers: pass an "
                                       "image instead")
        with self._lock:
            kept = dict(self._handed)
            if self._newest is not None:
                kept[self._newest.seq] = self._newest
        if seq in kept:
            return kept[seq]
        held = f"frames {', '.join(str(k) for k in sorted(kept))}" if kept else "no frames yet"
        raise InvalidArgumentError(f"frame {seq} is not one of the {len(kept)} frames kept ({held}: the newest and "
                                   f"the last {self._keep} handed out)",
                                   advice="Leave frame_seq out to use the newest frame, or call look for a "
                                          "current frame number.")

    # ------------------------------------------------------------------ queries
    def check_instruction(self, text: object, mode: object = None) -> tuple[str, QueryOptions]:
        """The instruction (stripped, spaces collapsed) and the query options it is answered with."""
        if not isinstance(text, str):
            raise InvalidQueryError(f"instruction must be a string; got {type(text).__name__}")
        if len(text) > MAX_INSTRUCTION_CHARS:
            raise InvalidQueryError(f"instruction is {len(text)} characters; at most {MAX_INSTRUCTION_CHARS}")
        if mode is not None and mode not in INTERACTIVE_MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(INTERACTIVE_MODES)}; got {mode!r:.50}")
        return " ".join(check_query(text).split()), QueryOptions.of(self.query, mode=None if mode is None else str(mode))

    def segment(self, instruction: str, *, frame_seq: int | None = None, image: str | None = None,
                mode: str | None = None, wait_s: float = 10.0) -> ToolAnswer:
        """Masks for ``instruction`` (blocking; run it off any event loop).

        On the newest camera frame (waiting up to ``wait_s`` for the first), on recent frame ``frame_seq``, or on
        ``image`` (a data URI, or an allowed file path or URL). While :meth:`track` follows this instruction and
        neither ``frame_seq`` nor ``image`` is given, the answer is the stream's masks of the newest frame
        (``result.track`` says whether reasoned or tracked, and how old). Raises a
        :class:`~lisa_agent.errors.LisaError`.
        """
        text, options = self.check_instruction(instruction, mode)
        image = given_image(image)
        if frame_seq is not None and image:
            raise InvalidArgumentError("pass frame_seq or image, not both")
        t0 = time.perf_counter()
        if image:
            pixels = load_image(image, access=self.access, timeout=self.url_timeout, max_bytes=self.max_image_bytes)
            kind = "the image passed inline" if image.lstrip()[:5].lower() == "data:" else f"the image {image[:80]!r}"
            frame, source, seq = Frame(pixels), kind, None
        else:
            tracked = self._tracked_answer(text, options) if frame_seq is None else None
            if tracked is not None:
                self._remember(tracked)
                return tracked
            got = self.latest(wait_s) if frame_seq is None else self.frame(frame_seq)
            frame, source, seq = got.frame, f"camera frame {got.seq}", got.seq
        load_ms = (time.perf_counter() - t0) * 1000.0
        with self._lock:
            if self._pending >= MAX_PENDING:
                raise ServerBusyError(f"{self._pending} calls are already waiting for the model; try again later")
            self._pending += 1
        try:
            result = self.backend.segment(frame, text, options=options)
        finally:
            with self._lock:
                self._pending -= 1
        return self._remember(ToolAnswer(result, frame, source, seq, load_ms))

    def _remember(self, answer: ToolAnswer) -> ToolAnswer:
        with self._lock:
            self._last = answer
        return answer

    def _tracked_answer(self, text: str, options: QueryOptions) -> ToolAnswer | None:
        """The stream's masks of the newest frame when it follows ``text`` with ``options``, else None."""
        with self._lock:
            stream = self._stream
            if stream is None or stream.instruction != text or stream.query.mode != options.mode:
                return None
            return self._tracked

    def last_answer(self) -> ToolAnswer | None:
        """The newest answer: of a tool call, or the tracking stream's masks of a newer frame."""
        with self._lock:
            last, tracked = self._last, self._tracked if self._stream is not None else None
        if tracked is not None and (last is None or tracked.created > last.created):
            return tracked
        return last

    # ------------------------------------------------------------------ tracking
    def track(self, instruction: str | None, *, mode: str | None = None, wait_s: float = 600.0) -> ToolAnswer | None:
        """Follow ``instruction`` on every frame from now on (None: stop; returns None then).

        Returns the stream's first masks, waiting up to ``wait_s`` seconds for LISA's first reasoning step (an
        event: the wait ends when it arrives). Raises SourceError without a camera, or LISA's error.
        """
        if instruction is None:
            with self._lock:
                stream, self._stream, self._tracked = self._stream, None, None
            if stream is not None:
                stream.close(wait=False)
            return None
        text, options = self.check_instruction(instruction, mode)
        if self.source is None:
            raise SourceError("tracking needs a camera, and this server has none (--source none)")
        stream = StreamSegmenter(self.backend, self.track_options, query=options, background=True)
        stream.set_instruction(text)
        with self._lock:
            previous, self._stream, self._tracked, self._stream_error = self._stream, stream, None, None
        if previous is not None:
            previous.close(wait=False)
        deadline = time.monotonic() + wait_s
        with self._lock:
            while self._tracked is None:
                if self._stream is not stream:
                    error = self._stream_error
                    if error is not None and self._stream is None:
                        raise error
                    raise InvalidArgumentError("tracking was stopped or replaced by another call before its "
                                               "first answer")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoFrameError(f"no tracked masks within {wait_s:g} s")
                self._lock.wait(left)
            return self._remember(self._tracked)

    def tracking(self) -> dict[str, Any]:
        """What is tracked: ``{"instruction", "mode", "options"}`` (``instruction`` None when nothing is)."""
        with self._lock:
            stream = self._stream
        return {"instruction": None if stream is None else stream.instruction,
                "mode": None if stream is None else stream.query.mode,
                "options": self.track_options.to_dict()}
