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
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError, InvalidQueryError, LimitExceededError, LisaError
from ..frames import Frame, SegmentBackend, check_query
from ..integrations.image_messages import encode_jpeg
from ..result import SegmentationResult
from .sources import FrameSource, SourceFrame

log = logging.getLogger("lisa_agent.console")

#: Modes the console offers (``reference`` is for parity tests, not operators).
MODES = ("fast", "chat")
#: Trackers the continuous switch may use (``sam`` needs the in-process engine's internals; not offered).
CONSOLE_TRACKERS = ("flow", "none")
#: Longest instruction accepted (characters).
MAX_INSTRUCTION_CHARS = 2000
#: Most instructions waiting for the model at once; more are refused as busy.
MAX_PENDING = 8


class ConsoleError(LisaError):
    """A request the console cannot carry out; ``code`` names the kind (also the API's error code)."""

    code = "console_error"


class NoFrameError(ConsoleError):
    """No frame has arrived from the source yet."""

    code = "no_frame"


class UnknownTargetError(ConsoleError):
    """The chosen target is not a mask of the last answer."""

    code = "unknown_target"


class BusyError(ConsoleError):
    """Too many instructions are already waiting for the model."""

    code = "busy"


class SupersededError(ConsoleError):
    """A newer instruction replaced this one before the model answered it (continuous mode)."""

    code = "superseded"


class ModelFailedError(ConsoleError):
    """The model (or the model server) failed on this instruction; the message says how."""

    code = "model_error"


@dataclass(frozen=True)
class FrameEvent:
    """A frame as the console hands it to listeners: the source's number, the frame, its JPEG bytes."""

    seq: int
    frame: Frame
    jpeg: bytes


@dataclass
class Answer:
    """One answer the console shows: the model's result for one frame and the console's envelope.

    Attributes:
        request: the instruction's number (1, 2, ...); continuous answers carry their instruction's.
        origin: ``instruction`` (LISA answered this instruction on this frame) or ``continuous`` (a
            frame of the continuous stream: reasoned or tracked, see ``result.track``).
        frame_seq: the source's number of the frame the masks are for.
        frame: that frame.
        result: the engine's result.
        labels: a short name per mask, from the answer's words before each ``[SEG]`` (``mask k`` when
            the answer names nothing, as in fast mode).
        latency_ms: instruction: from the request's arrival to the answer; continuous: from the frame's
            arrival to its masks.
        model_ms: the model's own time for the reasoning step these masks come from (``timings_ms`` of a
            tracked frame are the tracker's).
    """

    request: int
    origin: str
    frame_seq: int
    frame: Frame
    result: SegmentationResult
    labels: list[str]
    latency_ms: float
    model_ms: float | None = None
    created: float = field(default_factory=time.time)

    @property
    def declined(self) -> bool:
        """The model said no: an answer starting "Sorry" with no mask (the presence gate's refusal)."""
        return is_declined(self.result)

    @property
    def message(self) -> str | None:
        """What the page shows beside the answer when there is no mask to show, else None."""
        return answer_message(self.result)

    def to_dict(self, target: int | None = None, include_rle: bool = True) -> dict[str, Any]:
        """The result schema (``SegmentationResult.to_dict``) plus the console's envelope keys."""
        out = self.result.to_dict(include_rle=include_rle)
        out.update({"request": self.request, "origin": self.origin, "frame_seq": self.frame_seq,
                    "labels": list(self.labels), "declined": self.declined, "message": self.message,
                    "latency_ms": round(float(self.latency_ms), 1), "target": target,
                    "model_ms": None if self.model_ms is None else round(float(self.model_ms), 1)})
        return out


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


def error_code(exc: BaseException) -> str:
    """The API's error code of an exception: ``invalid_query``, ``invalid_argument``, ``too_large``, a
    :class:`ConsoleError`'s own code, else ``model_error``."""
    if isinstance(exc, ConsoleError):
        return exc.code
    if isinstance(exc, InvalidQueryError):
        return "invalid_query"
    if isinstance(exc, LimitExceededError):
        return "too_large"
    if isinstance(exc, (InvalidArgumentError, ValueError)):
        return "invalid_argument"
    return ModelFailedError.code


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


class _SerialBackend:
    """The model with one call at a time (the engine is not re-entrant; a ZeroMQ socket neither)."""

    def __init__(self, backend: SegmentBackend, lock: threading.Lock) -> None:
        self.backend = backend
        self.lock = lock
        #: ``timings_ms["total"]`` of the last call (the continuous stream's reasoning steps report it)
        self.last_total_ms: float | None = None

    def segment(self, image: Any, query: str, **kwargs: Any) -> SegmentationResult:
        with self.lock:
            result = self.backend.segment(image, query, **kwargs)
            self.last_total_ms = result.timings_ms.get("total")
            return result

    def info(self) -> dict[str, Any]:
        return self.backend.info()


class _Follower:
    """Carries one answer's masks to the frames after it with a tracker, without asking LISA again (so the
    masks stay on their objects while the camera moves); the answer's text, labels and scores are kept."""

    def __init__(self, tracker: str, request: int, frame: Frame, result: SegmentationResult, labels: list[str]) -> None:
        from ..tracking import make_tracker

        self.tracker = make_tracker(tracker)
        self.tracker.start(frame, result)
        self.request, self.frame, self.result, self.labels = request, frame, result, labels
        self.frames = 0
        self.started = time.monotonic()

    def follow(self, frame: Frame) -> SegmentationResult:
        """The answer's masks carried to ``frame`` (``track.source`` is ``tracked``)."""
        from ..tracking import TrackInfo

        t0 = time.perf_counter()
        masks, confidence = self.tracker.update(frame)
        ms = (time.perf_counter() - t0) * 1000.0
        self.frames += 1
        seed = self.frame.stamp
        age = (frame.stamp.ns - seed.ns) / 1e9 if seed is not None and frame.stamp is not None \
            else time.monotonic() - self.started
        info = TrackInfo("tracked", self.tracker.name, self.frames, max(0.0, age), tuple(float(c) for c in confidence),
                         None if seed is None else seed.to_dict())
        r = self.result
        return SegmentationResult.from_frame(
            frame, masks, [inst.score for inst in r.instances], text=r.text, query=r.query, mode=r.mode,
            prompt=r.prompt, input_ids=r.input_ids, output_ids=r.output_ids, cached=False,
            timings_ms={"track": ms, "total": ms}, track=info)


Listener = Callable[[str, Any], None]


class ConsoleCore:
    """The console: frames in, instructions answered, target chosen, the continuous switch.

    Args:
        backend: the model (:class:`~lisa_agent.engine.segmenter.LisaSegmenter` or a ``LisaClient``).
        source: where frames come from.
        mode: the default mode of instructions that name none (``fast`` or ``chat``).
        max_new_tokens: answer length limit in chat mode.
        tracker: what carries masks between reasoning steps with the continuous switch on (``flow``, ``none``).
        reason_every: with the switch on, LISA runs at least every this many frames.
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

    def __init__(self, backend: SegmentBackend, source: FrameSource, *, mode: str = "chat", max_new_tokens: int = 48,
                 tracker: str = "flow", reason_every: int = 50, jpeg_quality: int = 80, answer_timeout_s: float = 600.0,
                 model_name: str = "") -> None:
        if mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if tracker not in CONSOLE_TRACKERS:
            raise InvalidArgumentError(f"tracker must be one of {', '.join(CONSOLE_TRACKERS)}; got {tracker!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 1024:
            raise InvalidArgumentError(f"max_new_tokens must be a whole number in [1, 1024]; got {max_new_tokens!r}")
        if not 1 <= int(jpeg_quality) <= 100:
            raise InvalidArgumentError(f"jpeg_quality must be in [1, 100]; got {jpeg_quality!r}")
        self.backend = _SerialBackend(backend, threading.Lock())
        self.source = source
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.tracker = tracker
        self.reason_every = int(reason_every)
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
        self._follower: _Follower | None = None  # carries the last answer's masks when no stream runs
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
                waiter.set_exception(ConsoleError("the console is shutting down"))
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
                self._advance_follower(follower, got, arrived)

    # ------------------------------------------------------------------ instructions
    @staticmethod
    def check_instruction(text: object, mode: object = None) -> tuple[str, str | None]:
        """The instruction's stripped text and mode, or InvalidQueryError / InvalidArgumentError."""
        if not isinstance(text, str):
            raise InvalidQueryError(f"text must be a string; got {type(text).__name__}")
        if len(text) > MAX_INSTRUCTION_CHARS:
            raise InvalidQueryError(f"instruction is {len(text)} characters; at most {MAX_INSTRUCTION_CHARS}")
        if not text.strip():
            raise InvalidQueryError("instruction is empty: say what to look for, e.g. 'grab something to cut with'")
        if mode is not None and mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        return " ".join(check_query(text).split()), None if mode is None else str(mode)

    def ask(self, text: str, mode: str | None = None) -> Answer:
        """Answer ``text`` on the newest frame (blocking; run it off any event loop).

        With the continuous switch on, the instruction re-seeds the stream and this returns the stream's
        first answer to it. Raises InvalidQueryError / InvalidArgumentError (bad input), NoFrameError,
        BusyError, SupersededError, ModelFailedError (one line saying what failed).
        """
        text, chosen = self.check_instruction(text, mode)
        mode = chosen or self.mode
        latest = self.latest_frame()
        if latest is None:
            raise NoFrameError(f"no frame from {self.source_name} yet; try again in a moment")
        t0 = time.perf_counter()
        with self._lock:
            if self._pending >= MAX_PENDING:
                raise BusyError(f"{self._pending} instructions are already waiting for the model; try again later")
            self._request += 1
            request = self._request
            self._counts["requests"] += 1
            self._pending += 1
            self._instruction, self.mode = text, mode
            self._target = None
            waiter = self._restart_stream(request, t0) if self._continuous else None
        self._emit("instruction", {"request": request, "text": text, "mode": mode})
        self._emit("state", self.state(include_result=False))
        try:
            if waiter is not None:
                try:
                    return waiter.result(timeout=self.answer_timeout_s)
                except concurrent.futures.TimeoutError:
                    raise ModelFailedError(f"no answer within {self.answer_timeout_s:g} s") from None
            try:
                result = self.backend.segment(latest.frame, text, mode=mode, max_new_tokens=self.max_new_tokens)
            except (InvalidQueryError, InvalidArgumentError, LimitExceededError) as exc:
                self._fail(request, error_code(exc), str(exc))
                raise
            except LisaError as exc:
                raise self._fail(request, ModelFailedError.code, f"{type(exc).__name__}: {exc}") from exc
            except Exception as exc:  # a model bug must not take the console down
                log.exception("model failed on request %d", request)
                raise self._fail(request, ModelFailedError.code, f"{type(exc).__name__}: {exc}") from exc
            labels = mask_labels(result.text, len(result))
            answer = Answer(request, "instruction", latest.seq, latest.frame, result, labels,
                            (time.perf_counter() - t0) * 1000.0, result.timings_ms.get("total"))
            self._publish(answer)
            follower = _Follower(self.tracker, request, latest.frame, result, labels) if len(result) else None
            with self._lock:
                if self._request == request and self._stream is None:  # the newest: its masks are the ones to follow
                    self._follower = follower
            return answer
        finally:
            with self._lock:
                self._pending -= 1
            self._emit("state", self.state(include_result=False))

    def _fail(self, request: int, code: str, message: str) -> ModelFailedError:
        message = " ".join(message.split())[:1000]
        error = {"request": request, "code": code, "message": message}
        with self._lock:
            self._error = error
            self._counts["errors"] += 1
        self._emit("error", error)
        return ModelFailedError(message)

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
                last = self._last
                if last is not None and len(last.result):  # keep its masks on their objects
                    self._follower = _Follower(self.tracker, last.request, last.frame, last.result, last.labels)
        self._emit("state", self.state(include_result=False))
        return self.state()

    def _restart_stream(self, request: int, asked_at: float) -> concurrent.futures.Future[Answer]:
        """(Lock held.) A new stream for the current instruction; returns the future of its first answer."""
        from ..tracking import StreamSegmenter

        self._end_stream(SupersededError(f"instruction {request} replaced this one"))
        stream = StreamSegmenter(self.backend, self.tracker, reason_every=max(1, self.reason_every),
                                 mode=self.mode, max_new_tokens=self.max_new_tokens, background=True)
        stream.set_instruction(self._instruction)
        self._stream, self._stream_request, self._stream_mark = stream, request, None
        waiter: concurrent.futures.Future[Answer] = concurrent.futures.Future()
        self._waiters[request] = (waiter, asked_at)
        return waiter

    def _end_stream(self, reason: ConsoleError | None = None) -> None:
        """(Lock held.) Stop the stream; instructions still waiting for it fail with ``reason``."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close(wait=False)
        waiters, self._waiters = self._waiters, {}
        for waiter, _ in waiters.values():
            if not waiter.done():
                waiter.set_exception(reason or SupersededError("the continuous switch was turned off"))

    def _advance_follower(self, follower: _Follower, got: SourceFrame, arrived: float) -> None:
        """Carry the last answer's masks to this frame and publish them."""
        try:
            result = follower.follow(got.frame)
        except Exception as exc:  # a tracker failure ends the following, never the console
            log.warning("tracking stopped: %s", exc)
            with self._lock:
                if self._follower is follower:
                    self._follower = None
            return
        latency = (time.perf_counter() - arrived) * 1000.0
        self._publish(Answer(follower.request, "tracked", got.seq, got.frame, result, follower.labels, latency,
                             follower.result.timings_ms.get("total")))

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
            error: Exception = self._fail(request, error_code(exc), f"continuous: {type(exc).__name__}: {exc}")
            if isinstance(exc, (InvalidQueryError, InvalidArgumentError, LimitExceededError)):
                error = exc  # the instruction's fault: the API answers 400, not 500
            if waiting is not None and not waiting[0].done():
                waiting[0].set_exception(error)
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
                "instruction": self._instruction, "mode": self.mode, "continuous": self._continuous,
                "busy": self._pending > 0, "request": self._request, "error": self._error,
                "source": self.source_name, "model": self.model_name, "counts": counts,
                "limits": {"max_instruction_chars": MAX_INSTRUCTION_CHARS, "modes": list(MODES)},
            }
        target = self.target()
        out["target"] = target
        if include_result:
            out["last_result"] = None if answer is None else answer.to_dict(None if target is None else target["index"])
        return out

    def last_answer(self) -> Answer | None:
        with self._lock:
            return self._last
