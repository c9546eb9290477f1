"""The console's state and its model calls, with no web code: what the page, the API and Foxglove share.

:class:`ConsoleCore` reads frames from a :class:`~lisa_agent.console.sources.FrameSource` in a thread of
its own (JPEG-encoding each once), answers instructions (:meth:`ConsoleCore.ask`, blocking: the web layer
runs it in a worker thread, never on its event loop), keeps the chosen target, and with the continuous
switch on gives every frame a mask through a :class:`~lisa_agent.tracking.StreamSegmenter` (LISA in a
background thread, a tracker in between). Whoever wants to hear about frames, answers, state changes and
errors registers a listener (:meth:`ConsoleCore.add_listener`): the WebSocket, the Foxglove publisher.

Model calls are serialized (one at a time on the engine, whichever caller: an instruction, the stream's
reasoning step, an instruction typed in Foxglove).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from ..backend import SegmentBackend
from ..errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidQueryError,
    NoFrameError,
    ServerBusyError,
    ShuttingDownError,
    SupersededError,
    UnknownTargetError,
    describe_error,
)
from ..frames import check_query
from ..images import encode_jpeg
from ..labels import mask_labels
from ..options import INTERACTIVE_MODES, QueryOptions, TrackOptions
from ..tracking import Follower, StreamSegmenter, make_tracker
from . import CONSOLE_QUERY_DEFAULTS
from .answers import Answer, FrameEvent, SerialBackend
from .sources import FrameSource, SourceFrame

log = logging.getLogger("lisa_agent.console")

#: Longest instruction accepted (characters).
MAX_INSTRUCTION_CHARS = 2000
#: Most instructions waiting for the model at once; more are refused as busy.
MAX_PENDING = 8


Listener = Callable[[str, Any], None]


class ConsoleCore:
    """The console: frames in, instructions answered, target chosen, the continuous switch.

    Args:
        backend: the model (:class:`~lisa_agent.engine.segmenter.LisaSegmenter` or a ``LisaClient``).
        source: where frames come from.
        query: how instructions are answered (:class:`~lisa_agent.options.QueryOptions`; an instruction may name
            its own mode); default: the library's, in chat mode (:data:`CONSOLE_QUERY_DEFAULTS`).
        track: when the continuous switch reasons again and what carries the masks in between, and what keeps
            the last answer's masks on their objects with the switch off (:class:`~lisa_agent.options.TrackOptions`).
        jpeg_quality: of the frames sent to the page and Foxglove.
        answer_timeout_s: how long an instruction waits for its answer (continuous mode) before failing.
        model_name: shown on the page.

    Use: :meth:`start`, then :meth:`ask`, :meth:`choose_target`, :meth:`set_continuous`, :meth:`state`;
    :meth:`close` at the end.

    Listener events (``listener(kind, payload)``, called from the console's threads; keep them short):
    ``frame`` (:class:`FrameEvent`), ``answer`` (:class:`Answer`), ``state`` (the :meth:`state` dict without
    ``last_result``), ``instruction`` (``{"request", "text", "mode"}``) and ``error`` (``{"request", "code",
    "message"}``).
    """

    def __init__(self, backend: SegmentBackend, source: FrameSource, *, query: QueryOptions | None = None,
                 track: TrackOptions | None = None, jpeg_quality: int = 80, answer_timeout_s: float = 600.0,
                 model_name: str = "") -> None:
        self.query = query if query is not None else QueryOptions().replace(**CONSOLE_QUERY_DEFAULTS)
        if self.query.mode not in INTERACTIVE_MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(INTERACTIVE_MODES)}; got {self.query.mode!r}")
        self.track = track or TrackOptions()
        if not 1 <= int(jpeg_quality) <= 100:
            raise InvalidArgumentError(f"jpeg_quality must be in [1, 100]; got {jpeg_quality!r}")
        self.backend = SerialBackend(backend, threading.Lock())
        self.source = source
        self.jpeg_quality = int(jpeg_quality)
        self.answer_timeout_s = float(answer_timeout_s)
        self.model_name = model_name
        self.source_name = source.describe()
        self._lock = threading.RLock()
        self._frame_ready = threading.Condition(self._lock)
        self._listeners: list[Listener] = []
        self._latest: FrameEvent | None = None
        self._instruction: str | None = None
        self._request = 0
        self._pending = 0
        self._last: Answer | None = None
        self._target: int | None = None
        self._error: dict[str, Any] | None = None
        self._continuous = False
        self._stream: Any = None  # a StreamSegmenter while the continuous switch is on with an instruction
        self._stream_request = 0
        self._stream_mark: tuple[Any, int] | None = None  # (reasoned_stamp, age_frames) of its last result
        #: the last answer and the follower carrying its masks when no stream runs
        self._follower: tuple[Follower, Answer] | None = None
        #: instructions waiting for the stream's first answer: request -> (future, when it was asked)
        self._waiters: dict[int, tuple[concurrent.futures.Future[Answer], float]] = {}
        self._counts = {"frames": 0, "requests": 0, "answers": 0, "errors": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> ConsoleCore:
        """Start reading frames (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._pump, name="lisa-console-frames", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop reading frames, end the continuous stream and close the source."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        with self._lock:
            stream, self._stream = self._stream, None
            waiters, self._waiters = dict(self._waiters), {}
        if stream is not None:
            stream.close(wait=False)
        for waiter, _ in waiters.values():
            if not waiter.done():
                waiter.set_exception(ShuttingDownError("the console is shutting down"))
        self.source.close()

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(kind, payload)`` on every event (see the class docstring)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _emit(self, kind: str, payload: Any) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(kind, payload)
            except Exception:  # a listener's failure never stops the console
                log.exception("console listener failed on %s", kind)

    # ------------------------------------------------------------------ frames
    def latest_frame(self) -> FrameEvent | None:
        """The newest frame (with its JPEG), or None before the first."""
        with self._lock:
            return self._latest

    def wait_for_frame(self, timeout: float = 10.0) -> FrameEvent:
        """Block until a frame has arrived; NoFrameError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._frame_ready:
            while self._latest is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoFrameError(f"no frame from {self.source_name} within {timeout:g} s")
                self._frame_ready.wait(left)
            return self._latest

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.source.read(timeout=0.5)
            except Exception as exc:  # a camera that fails now and then: say so, keep trying
                log.warning("frame source failed: %s", exc)
                self._stop.wait(0.5)
                continue
            if got is None:
                continue
            arrived = time.perf_counter()
            try:
                event = FrameEvent(got.seq, got.frame, encode_jpeg(got.frame.rgb, self.jpeg_quality))
            except Exception as exc:
                log.warning("frame %d skipped: %s", got.seq, exc)
                continue
            with self._frame_ready:
                self._latest = event
                self._counts["frames"] += 1
                self._frame_ready.notify_all()
                stream, follower = self._stream, self._follower
            self._emit("frame", event)
            if stream is not None and self._advance_stream(stream, got, arrived):
                continue
            if follower is not None:
                self._advance_follower(*follower, got, arrived)

    # ------------------------------------------------------------------ instructions
    def check_instruction(self, text: object, mode: object = None) -> tuple[str, QueryOptions]:
        """The instruction's text (stripped, spaces collapsed) and the query options it is answered with (its own
        ``mode`` when it names one), or InvalidQueryError / InvalidArgumentError."""
        if not isinstance(text, str):
            raise InvalidQueryError(f"text must be a string; got {type(text).__name__}")
        if len(text) > MAX_INSTRUCTION_CHARS:
            raise InvalidQueryError(f"instruction is {len(text)} characters; at most {MAX_INSTRUCTION_CHARS}")
        if not text.strip():
            raise InvalidQueryError("instruction is empty: say what to look for, e.g. 'grab something to cut with'")
        if mode is not None and mode not in INTERACTIVE_MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(INTERACTIVE_MODES)}; got {mode!r:.50}")
        return " ".join(check_query(text).split()), QueryOptions.of(self.query, mode=None if mode is None else str(mode))

    def ask(self, text: str, mode: str | None = None) -> Answer:
        """Answer ``text`` on the newest frame (blocking; run it off any event loop).

        With the continuous switch on, the instruction re-seeds the stream and this returns the stream's
        first answer to it. Raises a :class:`~lisa_agent.errors.LisaError` (InvalidQueryError /
        InvalidArgumentError for bad input, NoFrameError, ServerBusyError, SupersededError,
        DeadlineExceededError) or the model's own failure, after telling the listeners.
        """
        text, query = self.check_instruction(text, mode)
        latest = self.latest_frame()
        if latest is None:
            raise NoFrameError(f"no frame from {self.source_name} yet; try again in a moment")
        t0 = time.perf_counter()
        with self._lock:
            if self._pending >= MAX_PENDING:
                raise ServerBusyError(f"{self._pending} instructions are already waiting for the model; try again "
                                      "later")
            self._request += 1
            request = self._request
            self._counts["requests"] += 1
            self._pending += 1
            self._instruction, self.query = text, query
            self._target = None
            waiter = self._restart_stream(request, t0) if self._continuous else None
        self._emit("instruction", {"request": request, "text": text, "mode": query.mode})
        self._emit("state", self.state(include_result=False))
        try:
            if waiter is not None:
                try:
                    return waiter.result(timeout=self.answer_timeout_s)
                except concurrent.futures.TimeoutError:
                    raise self._fail(request, DeadlineExceededError(f"no answer within {self.answer_timeout_s:g} s")) \
                        from None
            try:
                result = self.backend.segment(latest.frame, text, options=query)
            except Exception as exc:  # told to the listeners; a model bug must not take the console down
                if not describe_error(exc).caller_fault:
                    log.warning("model failed on request %d: %s", request, describe_error(exc).message)
                raise self._fail(request, exc) from None
            labels = mask_labels(result.text, len(result))
            answer = Answer(request, "instruction", latest.seq, latest.frame, result, labels,
                            (time.perf_counter() - t0) * 1000.0, result.timings_ms.get("total"))
            self._publish(answer)
            with self._lock:
                if self._request == request and self._stream is None:  # the newest: its masks are the ones to follow
                    self._follower = self._follow(answer)
            return answer
        finally:
            with self._lock:
                self._pending -= 1
            self._emit("state", self.state(include_result=False))

    def _follow(self, answer: Answer) -> tuple[Follower, Answer] | None:
        """A follower that keeps ``answer``'s masks on their objects on later frames (None without masks)."""
        if not len(answer.result):
            return None
        return Follower(make_tracker(self.track.tracker, self.backend.backend), answer.frame, answer.result), answer

    def _fail(self, request: int, exc: BaseException) -> BaseException:
        """Tell the listeners that ``request`` failed with ``exc``; returns ``exc`` to raise."""
        info = describe_error(exc)
        error = {"request": request, "code": info.code, "message": " ".join(info.message.split())[:1000]}
        with self._lock:
            self._error = error
            self._counts["errors"] += 1
        self._emit("error", error)
        return exc

    def _publish(self, answer: Answer) -> None:
        with self._lock:
            if self._last is not None and self._last.request > answer.request:
                return  # a newer instruction has already answered: keep showing that one
            if self._last is None or self._last.request != answer.request:
                self._target = None
            elif self._target is not None and self._target >= len(answer.result):
                self._target = None
            self._last = answer
            self._error = None
            self._counts["answers"] += 1
        self._emit("answer", answer)

    # ------------------------------------------------------------------ continuous
    def set_continuous(self, on: bool) -> dict[str, Any]:
        """Switch continuous mode on (every frame gets masks for the current instruction) or off."""
        if not isinstance(on, bool):
            raise InvalidArgumentError(f"on must be true or false; got {on!r}")
        with self._lock:
            self._continuous = on
            if on and self._instruction is not None and self._stream is None:
                self._restart_stream(self._request, time.perf_counter())
            if not on and self._stream is not None:
                self._end_stream()
                if self._last is not None:  # keep its masks on their objects
                    self._follower = self._follow(self._last)
        self._emit("state", self.state(include_result=False))
        return self.state()

    def _restart_stream(self, request: int, asked_at: float) -> concurrent.futures.Future[Answer]:
        """(Lock held.) A new stream for the current instruction; returns the future of its first answer."""
        self._end_stream(SupersededError(f"instruction {request} replaced this one"))
        stream = StreamSegmenter(self.backend, self.track, query=self.query, background=True)
        stream.set_instruction(self._instruction)
        self._stream, self._stream_request, self._stream_mark = stream, request, None
        waiter: concurrent.futures.Future[Answer] = concurrent.futures.Future()
        self._waiters[request] = (waiter, asked_at)
        return waiter

    def _end_stream(self, reason: Exception | None = None) -> None:
        """(Lock held.) Stop the stream; instructions still waiting for it fail with ``reason``."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close(wait=False)
        waiters, self._waiters = self._waiters, {}
        for waiter, _ in waiters.values():
            if not waiter.done():
                waiter.set_exception(reason or SupersededError("the continuous switch was turned off"))

    def _advance_follower(self, follower: Follower, answer: Answer, got: SourceFrame, arrived: float) -> None:
        """Carry the last answer's masks to this frame and publish them."""
        try:
            result = follower.follow(got.frame)
        except Exception as exc:  # a tracker failure ends the following, never the console
            log.warning("tracking stopped: %s", exc)
            with self._lock:
                if self._follower is not None and self._follower[0] is follower:
                    self._follower = None
            return
        latency = (time.perf_counter() - arrived) * 1000.0
        self._publish(Answer(answer.request, "tracked", got.seq, got.frame, result, answer.labels, latency,
                             answer.result.timings_ms.get("total")))

    def _advance_stream(self, stream: Any, got: SourceFrame, arrived: float) -> bool:
        """Give the stream this frame and publish its masks (True when it had some); the first reasoning step
        answers the waiting request."""
        with self._lock:
            request = self._stream_request
        try:
            result = stream.process(got.frame)
        except Exception as exc:  # LISA failed in the background: stop the stream, say why
            with self._lock:
                if self._stream is stream:
                    self._stream = None
                    stream.close(wait=False)
                waiting = self._waiters.pop(request, None)
            self._fail(request, exc)
            if waiting is not None and not waiting[0].done():
                waiting[0].set_exception(exc)
            return False
        if result is None:
            return False
        track = result.track
        mark = (None if track is None else track.reasoned_stamp, 0 if track is None else track.age_frames)
        with self._lock:
            if self._stream is not stream:
                return False  # replaced while it ran
            self._follower = None  # the stream carries the masks now
            previous, self._stream_mark = self._stream_mark, mark
            fresh = previous is None or mark[0] != previous[0] or mark[1] < previous[1]
            waiting = self._waiters.pop(request, None) if fresh else None
        since = arrived if waiting is None else waiting[1]  # a frame's masks, or an instruction's answer
        answer = Answer(request, "continuous" if waiting is None else "instruction", got.seq, got.frame, result,
                        mask_labels(result.text, len(result)), (time.perf_counter() - since) * 1000.0,
                        self.backend.last_total_ms)
        self._publish(answer)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(answer)
        return True

    # ------------------------------------------------------------------ target
    def choose_target(self, index: int | None = None, point: tuple[float, float] | None = None) -> dict[str, Any]:
        """Choose mask ``index`` of the last answer, or the mask under pixel ``point`` (x, y) (the topmost
        where masks overlap); ``index=None`` and ``point=None`` clears the target. Returns the state."""
        with self._lock:
            answer = self._last
            if index is None and point is None:
                self._target = None
            elif answer is None:
                raise UnknownTargetError("there is no answer yet: send an instruction first")
            elif point is not None:
                self._target = self._mask_at(answer, point)
            else:
                n = len(answer.result)
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                    raise UnknownTargetError(f"no mask {index!r}: the last answer has {n} mask(s)"
                                             + (f" (0..{n - 1})" if n else ""))
                self._target = index
        self._emit("state", self.state(include_result=False))
        return self.state()

    @staticmethod
    def _mask_at(answer: Answer, point: tuple[float, float]) -> int:
        try:
            x, y = (float(v) for v in point)
        except (TypeError, ValueError):
            raise UnknownTargetError(f"point must be [x, y] in pixels; got {point!r}") from None
        h, w = answer.result.image_size
        if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < w and 0 <= y < h):
            raise UnknownTargetError(f"point ({x:g}, {y:g}) is outside the {w}x{h} frame")
        for k in range(len(answer.result) - 1, -1, -1):  # later masks lie on top
            if answer.result.masks[k][int(y), int(x)]:
                return k
        raise UnknownTargetError(f"no mask at ({x:g}, {y:g})")

    # ------------------------------------------------------------------ state
    def target(self) -> dict[str, Any] | None:
        """The chosen target: its index, label, box, centroid, score and 3D target; None when none is chosen."""
        with self._lock:
            answer, index = self._last, self._target
        if answer is None or index is None or index >= len(answer.result):
            return None
        inst = answer.result.instances[index].to_dict()
        point = answer.result.targets[index] if answer.result.targets is not None else None
        return {"index": index, "label": answer.labels[index], "request": answer.request, "bbox": inst["bbox"],
                "centroid": inst["centroid"], "score": inst["score"],
                "target": None if point is None else point.to_dict()}

    def state(self, include_result: bool = True) -> dict[str, Any]:
        """What ``GET /api/state`` returns (docs/console.md)."""
        with self._lock:
            answer, counts = self._last, dict(self._counts)
            out: dict[str, Any] = {
                "instruction": self._instruction, "mode": self.query.mode, "continuous": self._continuous,
                "busy": self._pending > 0, "request": self._request, "error": self._error,
                "source": self.source_name, "model": self.model_name, "counts": counts,
                "limits": {"max_instruction_chars": MAX_INSTRUCTION_CHARS, "modes": list(INTERACTIVE_MODES)},
            }
        target = self.target()
        out["target"] = target
        if include_result:
            out["last_result"] = None if answer is None else answer.to_dict(None if target is None else target["index"])
        return out
