"""The ``Segment`` action (and service) of ``lisa_node``, and its typed ``~/segmentation`` topic.

A goal names an instruction and either carries an image (with optional aligned depth and CameraInfo) or asks
for the node's newest camera frame (at most ``max_age_s`` old, waited for up to ``frame_timeout_s``). The
server answers it with feedback at each stage (``queued``, ``waiting_for_frame``, ``encoding``, ``reasoning``,
``decoding``) and a result: ``code`` ``ok`` with a ``lisa_interfaces/Segmentation``, ``canceled`` (goal status
CANCELED) or one of the library's error codes (:mod:`lisa_agent.errors`; goal status ABORTED) with message and
advice. A bad goal never stops the node: every failure becomes a result.

Concurrency (``action_policy``): ``queue`` runs goals one at a time in arrival order, with at most one
waiting (a third is rejected); ``preempt`` lets a new goal replace the running one, which ends ABORTED with
``superseded`` at its next stage boundary (the model call itself is not interrupted).

Threads: the action and the service live on a companion node (``<node>_segment``, same namespace, no global
remappings) spun by its own multi-threaded executor in a background thread, with a reentrant callback group:
a goal waiting for a frame or running the model blocks neither a cancel, nor a second goal, nor the main node,
whose single-threaded executor keeps serving the camera at frame rate (a multi-threaded executor on the main
node cost ~0.1-0.15 CPU-s/s more at 30 Hz of 240x320 frames). Names are absolute under the main node's:
``<node>/segment``. The model is shared with the topic interface under the node's ``engine_lock``.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import rclpy
from lisa_interfaces.action import Segment
from lisa_interfaces.msg import Segmentation
from lisa_interfaces.srv import Segment as SegmentService
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor

from lisa_agent.errors import (
    Code,
    LimitExceededError,
    LisaError,
    NoFrameError,
    ShuttingDownError,
    SupersededError,
    describe_error,
)
from lisa_agent.frames import Frame, Stamp, check_query
from lisa_agent.options import QueryOptions
from lisa_agent.result import SegmentationResult
from lisa_agent.serving.framing import Limits

from . import parameters
from .conversions import camera_info_intrinsics, depth_to_meters_array, image_to_rgb
from .typed import segmentation_msg

if TYPE_CHECKING:  # pragma: no cover
    from .lisa_node import LisaNode

#: Longest instruction a goal may carry (the model server's limit).
MAX_INSTRUCTION_CHARS = Limits().max_query_chars


class _Canceled(Exception):
    """The caller canceled the goal."""


@dataclass
class _Run:
    """One goal (or service call) in progress."""

    goal: Any  # Segment.Goal or SegmentService.Request (same fields)
    handle: Any  # ServerGoalHandle, or None for a service call
    t0: float
    superseded: bool = False
    stage: str = ""

    def feedback(self, stage: str) -> None:
        self.stage = stage
        if self.handle is not None:
            self.handle.publish_feedback(Segment.Feedback(stage=stage, elapsed_s=time.monotonic() - self.t0))


class SegmentServer:
    """The action server and service ``<node>/segment`` (on a companion node with its own executor thread) and the
    publisher of ``~/segmentation`` (on the node)."""

    def __init__(self, node: LisaNode) -> None:
        self.node = node
        self.group = ReentrantCallbackGroup()
        self._cond = threading.Condition()
        self._runs: list[_Run] = []  # entered runs, in order; the first one holds the turn
        self._admitted = 0  # goals accepted and not finished (queue policy: at most 2)
        self._closing = False
        self.publisher = node.create_publisher(Segmentation, "~/segmentation", parameters.RELIABLE)
        name = f"{node.get_fully_qualified_name()}/segment"
        self.companion = rclpy.create_node(f"{node.get_name()}_segment", namespace=node.get_namespace(),
                                           context=node.context, use_global_arguments=False,
                                           start_parameter_services=False)
        self.action = ActionServer(self.companion, Segment, name, execute_callback=self._execute,
                                   goal_callback=self._on_goal, cancel_callback=self._on_cancel,
                                   callback_group=self.group)
        self.service = self.companion.create_service(SegmentService, name, self._on_service, callback_group=self.group)
        self.executor = MultiThreadedExecutor(num_threads=4, context=node.context)
        self.executor.add_node(self.companion)
        self._stop_spinning = threading.Event()
        self._spin = threading.Thread(target=self._spin_companion, name="lisa-segment-action", daemon=True)
        self._spin.start()

    def _spin_companion(self) -> None:
        """Hand the companion node's ready callbacks to the executor's threads until :meth:`close`.

        Waits of at most 0.1 s, so the thread is never inside a wait on entities that :meth:`close` destroys (an
        unbounded ``executor.spin()`` could still be waiting after a shutdown raced its loop check)."""
        try:
            while not self._stop_spinning.is_set() and self.node.context.ok():
                self.executor.spin_once(timeout_sec=0.1)
        except Exception:  # the context shut down (SIGINT): nothing left to serve
            pass

    @property
    def policy(self) -> str:
        return str(self.node.get_parameter("action_policy").value)

    def close(self) -> None:
        """Stop serving: running goals end with ``shutting_down`` at their next stage, then the companion node's
        executor stops and the node is destroyed."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._stop_spinning.set()
        self._spin.join(30.0)  # at most one 0.1 s wait away
        self.executor.shutdown(timeout_sec=30.0)  # the executor's threads finish their callbacks and join
        if self._spin.is_alive():  # never seen; destroying what a live thread may use could crash the process
            self.node.get_logger().error("the Segment action's thread did not stop; its server is left to the exit")
            return
        self.action.destroy()
        self.companion.destroy_node()
        self.node.destroy_publisher(self.publisher)

    def publish(self, result: SegmentationResult, header: Any, latency_ms: float, result_json: str | None = None,
                inference_ms: float | None = None) -> Any:
        """Publish (and return) the typed ``Segmentation`` of one answered frame on ``~/segmentation``."""
        msg = segmentation_msg(result, header, latency_ms=latency_ms, inference_ms=inference_ms,
                               result_json=result_json)
        self.publisher.publish(msg)
        return msg

    # ------------------------------------------------------------------ rclpy callbacks
    def _on_goal(self, goal: Any) -> GoalResponse:
        with self._cond:
            if self.policy == "queue" and self._admitted >= 2:
                self.node.get_logger().warning("Segment goal rejected: one goal runs and one waits already "
                                               "(action_policy queue)")
                return GoalResponse.REJECT
            self._admitted += 1
        return GoalResponse.ACCEPT

    def _on_cancel(self, handle: Any) -> CancelResponse:
        with self._cond:
            self._cond.notify_all()
        return CancelResponse.ACCEPT

    def _execute(self, handle: Any) -> Any:
        run = _Run(handle.request, handle, time.monotonic())
        try:
            code, message, advice, seg = self._serve(run)
        finally:
            with self._cond:
                self._admitted -= 1
        result = Segment.Result(code=code, message=message, advice=advice)
        if seg is not None:
            result.segmentation = seg
        if code == "ok":
            handle.succeed()
        elif code == "canceled":
            handle.canceled()
        else:
            handle.abort()
        return result

    def _on_service(self, request: Any, response: Any) -> Any:
        code, message, advice, seg = self._serve(_Run(request, None, time.monotonic()))
        response.code, response.message, response.advice = code, message, advice
        if seg is not None:
            response.segmentation = seg
        return response

    # ------------------------------------------------------------------ serving one goal
    def _serve(self, run: _Run) -> tuple[str, str, str, Any]:
        """(code, message, advice, Segmentation or None) of one goal; never raises."""
        log = self.node.get_logger()
        try:
            self._enter(run)
            try:
                seg = self._segment(run)
            finally:
                self._leave(run)
            return "ok", "", "", seg
        except _Canceled:
            log.info(f"Segment goal canceled while {run.stage or 'starting'}")
            return "canceled", f"canceled by the caller while {run.stage or 'starting'}", "", None
        except Exception as exc:  # every failure is a result; the node keeps serving
            info = describe_error(exc)
            if not isinstance(exc, LisaError):
                log.error(f"Segment goal failed unexpectedly:\n{traceback.format_exc()}")
            else:
                log.warning(f"Segment goal aborted ({info.code}): {info.message}")
            return info.code, info.message, info.advice, None

    def _check(self, run: _Run) -> None:
        """Raise when the goal must end now: canceled, superseded, or the node stops."""
        if run.handle is not None and run.handle.is_cancel_requested:
            raise _Canceled()
        if run.superseded:
            raise SupersededError(f"a newer Segment goal replaced this one while {run.stage} (action_policy preempt)")
        if self.node.stopping or self._closing:
            raise ShuttingDownError("lisa_node is shutting down (or was deactivated)")

    def _enter(self, run: _Run) -> None:
        """Wait for this goal's turn (queue: in order; preempt: at once, superseding the others)."""
        with self._cond:
            if self.policy == "preempt":
                for other in self._runs:
                    other.superseded = True
                self._cond.notify_all()
            self._runs.append(run)
            first = True
            while self._runs[0] is not run:
                if first:
                    run.feedback("queued")
                    first = False
                try:
                    self._check(run)
                except BaseException:
                    self._runs.remove(run)
                    self._cond.notify_all()
                    raise
                self._cond.wait(0.1)

    def _leave(self, run: _Run) -> None:
        with self._cond:
            if run in self._runs:
                self._runs.remove(run)
            self._cond.notify_all()

    def _options(self, goal: Any) -> QueryOptions:
        """The node's query parameters with the goal's non-empty fields over them (InvalidArgumentError)."""
        base = parameters.query_options(self.node)
        return QueryOptions.of(base, mode=goal.mode or None, max_new_tokens=goal.max_new_tokens or None,
                               answer=goal.answer or None)

    def _segment(self, run: _Run) -> Any:
        goal, node = run.goal, self.node
        self._check(run)
        text = check_query(goal.instruction)
        if len(text) > MAX_INSTRUCTION_CHARS:
            raise LimitExceededError(f"instruction has {len(text)} characters; at most {MAX_INSTRUCTION_CHARS}")
        options = self._options(goal)
        if len(goal.image.data):
            frame, header, received_ns = self._goal_frame(goal), goal.image.header, node.now_ns()
        else:
            frame, header, received_ns = self._camera_frame(run, goal)
        backend = node.backend
        if backend is None:
            raise LisaError("the model is not loaded (a lifecycle node loads it on configure)", code=Code.UNAVAILABLE)
        with node.engine_lock:
            self._check(run)
            t0 = time.perf_counter()
            encode = getattr(backend, "encode", None)
            image: Any = frame
            if callable(encode):  # in-process engine: encoding is a stage of its own
                run.feedback("encoding")
                image = encode(frame)
                self._check(run)
            run.feedback("reasoning")
            result = backend.segment(image, text, options=options)
            inference_ms = (time.perf_counter() - t0) * 1000.0
        self._check(run)
        run.feedback("decoding")
        stamp_ns = int(header.stamp.sec) * 10**9 + int(header.stamp.nanosec)
        latency_ms = (node.now_ns() - (stamp_ns if stamp_ns > 0 else received_ns)) / 1e6
        return self.publish(result, header, latency_ms, inference_ms=inference_ms)

    def _goal_frame(self, goal: Any) -> Frame:
        """The goal's own image (and depth + CameraInfo when given) as a Frame (InvalidImageError)."""
        header = goal.image.header
        rgb = image_to_rgb(goal.image)
        frame = Frame(rgb, frame_id=str(header.frame_id), stamp=header.stamp)
        if len(goal.depth.data):
            depth = depth_to_meters_array(goal.depth)
            intrinsics = None
            if any(goal.camera_info.k):
                intrinsics, info_size = camera_info_intrinsics(goal.camera_info)
                h, w = frame.size
                if info_size[0] and info_size[1] and info_size != (h, w):
                    intrinsics = intrinsics.scaled(w / info_size[1], h / info_size[0])
            d = goal.depth.header.stamp
            frame = Frame(rgb, frame_id=frame.frame_id, stamp=frame.stamp, depth=depth, intrinsics=intrinsics,
                          depth_stamp=Stamp(int(d.sec), int(d.nanosec)) if (d.sec or d.nanosec) else None,
                          depth_tolerance_s=float(self.node.get_parameter("sync_tolerance").value))
        return frame

    def _camera_frame(self, run: _Run, goal: Any) -> tuple[Frame, Any, int]:
        """The newest camera frame at most ``max_age_s`` old, waited for up to ``frame_timeout_s`` (NoFrameError),
        with the node's depth attached as for the topics; and its header and arrival time (ns)."""
        node = self.node
        max_age = goal.max_age_s or float(node.get_parameter("action_max_age").value)
        timeout = goal.frame_timeout_s or float(node.get_parameter("action_frame_timeout").value)
        deadline = time.monotonic() + timeout
        run.feedback("waiting_for_frame")
        next_feedback = time.monotonic() + 1.0
        while True:
            arrival = node.newest_arrival()
            age = node.arrival_age_s(arrival) if arrival is not None else None
            if arrival is not None and age is not None and age <= max_age:
                break
            self._check(run)
            now = time.monotonic()
            if now > deadline:
                newest = ("none has arrived" if arrival is None
                          else f"the newest is {age:.1f} s old, max_age_s {max_age:g}")
                raise NoFrameError(f"no camera frame on {node.image_topic} within {timeout:g} s ({newest})")
            if now >= next_feedback:
                run.feedback("waiting_for_frame")
                next_feedback = now + 1.0
            node.wait_for_frame(0.1)
        header = arrival.msg.header
        frame = Frame(node.decode(arrival.msg), frame_id=str(header.frame_id), stamp=header.stamp)
        frame, _missing = node.with_depth(frame)
        return frame, header, arrival.received_ns
