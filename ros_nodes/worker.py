"""The topic interface's worker: one thread answers instructions on the newest camera frame (a mixin of
:class:`ros_nodes.lisa_node.LisaNode`).

An instruction on ``instruction_topic`` becomes a request; the worker takes the newest frame when one is
pending (callbacks only store messages), segments it under the node's ``engine_lock`` (or lets a tracker carry
the masks between reasoning steps, ``track``), and publishes every output: the original topics
(:class:`ros_nodes.publishing.ResultPublisher`) and, where ``lisa_interfaces`` is built, the typed
``~/segmentation``.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from rclpy.node import Node
from sensor_msgs.msg import CompressedImage

from lisa_agent.backend import SegmentBackend
from lisa_agent.errors import InvalidImageError, InvalidQueryError, LisaError, describe_error
from lisa_agent.frames import Frame, Stamp
from lisa_agent.tracking import StreamSegmenter

from . import depth_sync, outputs, parameters
from .conversions import compressed_to_rgb, image_to_rgb


@dataclass
class _Arrival:
    """A camera message as it arrived (decoded only when the worker takes it)."""

    msg: Any  # sensor_msgs Image or CompressedImage
    seq: int  # arrival counter
    received_ns: int  # node clock at arrival


@dataclass
class _Request:
    text: str
    seq: int
    continuous: bool
    last_frame_seq: int = -1  # frames with seq <= this are not eligible for this request
    stream: StreamSegmenter | None = None  # continuous with a tracker: masks for every frame


class TopicWorker(Node):
    """The worker half of the node: the state it shares with the callbacks, declared here for the type checker."""

    _backend: SegmentBackend | None
    engine_lock: threading.Lock
    _cond: threading.Condition
    _frame: _Arrival | None
    _frame_taken: bool
    _request: _Request | None
    _bad_frame_seq: int
    _depth: collections.deque[tuple[int, Any]]
    _camera_info: Any
    _depth_warned: tuple[str, float]
    _stopping: bool
    _counts: dict[str, int]
    _latency: collections.deque[float]
    _last_latency_ms: float
    _outputs: Any
    segment_server: Any

    # ------------------------------------------------------------------ worker
    def _make_stream(self, req: _Request) -> StreamSegmenter:
        """A background-reasoning stream for a continuous request with a tracker (parameters read now)."""
        assert self._backend is not None
        stream = StreamSegmenter(self._backend, parameters.track_options(self), query=parameters.query_options(self),
                                 background=True)
        stream.set_instruction(req.text)
        return stream

    def _work(self) -> None:
        last_start = 0.0
        active_stream: StreamSegmenter | None = None
        while True:
            with self._cond:
                job: tuple[_Request, _Arrival] | None = None
                while not self._stopping:
                    req, latest = self._request, self._frame
                    if (req is not None and latest is not None and latest.seq > req.last_frame_seq
                            and latest.seq != self._bad_frame_seq):
                        rate = float(self.get_parameter("max_rate").value)
                        tracked = req.continuous and bool(self.get_parameter("track").value)
                        wait = (last_start + 1.0 / rate - time.monotonic()) if (req.continuous and rate > 0
                                                                                and not tracked) else 0
                        if wait <= 0:
                            job = (req, latest)
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait(0.5)
                if self._stopping or job is None:
                    if active_stream is not None:
                        active_stream.close(wait=False)
                    return
                req, arrival = job
                self._frame_taken = True
                req.last_frame_seq = arrival.seq
                if not req.continuous:
                    self._request = None
            if active_stream is not None and active_stream is not req.stream:
                active_stream.close(wait=False)  # the instruction changed or stopped: its reasoning thread ends
                active_stream = None
            if req.continuous and req.stream is None and bool(self.get_parameter("track").value):
                req.stream = self._make_stream(req)
            active_stream = req.stream or active_stream
            last_start = time.monotonic()
            try:
                outcome = self._answer(req, arrival)
            except Exception:  # keep serving whatever happens to one frame
                if not self.context.ok():
                    # SIGINT shut the context down while this frame was in inference: its publishers are
                    # gone with it, so the result cannot be published; that is shutdown, not a failure
                    self._stopping = True
                    return
                outcome = "error"
                self.get_logger().error(f"request {req.seq}: unexpected failure on frame {arrival.seq}:\n"
                                        f"{traceback.format_exc()}")
            with self._cond:
                if outcome == "ok":
                    self._counts["frames_processed"] += 1
                elif outcome == "bad_frame":
                    self._counts["frames_bad"] += 1
                    self._bad_frame_seq = arrival.seq  # not retried by later requests
                    if not req.continuous and self._request is None:
                        self._request = req  # a once request waits for the next usable frame
                else:
                    self._counts["errors"] += 1

    def decode(self, msg: Any) -> Any:
        """HxWx3 uint8 RGB of a camera message (InvalidImageError)."""
        return compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else image_to_rgb(msg)

    def _answer(self, req: _Request, arrival: _Arrival) -> str:
        """Segment one frame for one request and publish everything; returns ok / bad_frame / error."""
        header = arrival.msg.header
        log = self.get_logger()
        try:
            frame = Frame(self.decode(arrival.msg), frame_id=str(header.frame_id), stamp=header.stamp)
        except InvalidImageError as exc:
            log.warning(f"frame {arrival.seq} ({_describe(header)}) skipped: {exc}")
            return "bad_frame"
        frame, depth_missing = self.with_depth(frame)
        t0 = time.perf_counter()
        queue_ms = (self.get_clock().now().nanoseconds - arrival.received_ns) / 1e6
        assert self._backend is not None
        try:
            if req.stream is not None:
                tracked = req.stream.process(frame)
                if tracked is None:  # the first reasoning step is still running: nothing to publish yet
                    return "ok"
                result = tracked
            else:
                with self.engine_lock:
                    result = self._backend.segment(frame, req.text, options=parameters.query_options(self))
        except InvalidImageError as exc:
            log.warning(f"frame {arrival.seq} ({_describe(header)}) skipped: {exc}")
            return "bad_frame"
        except InvalidQueryError as exc:
            log.warning(f"request {req.seq} {req.text[:200]!r} refused: {exc}")
            with self._cond:
                if self._request is req:
                    self._request = None
            return "error"
        except LisaError as exc:
            info = describe_error(exc)
            log.warning(f"request {req.seq} failed on frame {arrival.seq}: {info.code}: {info.message}")
            return "error"
        inference_ms = (time.perf_counter() - t0) * 1000.0
        if result.depth_note:
            self._warn_depth(result.depth_note)
        self._publish(req, arrival, frame, result, depth_missing, queue_ms, inference_ms)
        return "ok"

    def _warn_depth(self, note: str) -> None:
        """Log why 3D targets are missing (:func:`ros_nodes.depth_sync.throttled_warning`)."""
        self._depth_warned = depth_sync.throttled_warning(self.get_logger(), note, self._depth_warned)

    def with_depth(self, frame: Frame) -> tuple[Frame, str | None]:
        """``frame`` with the depth image closest in time and the CameraInfo intrinsics
        (:func:`ros_nodes.depth_sync.attach_depth`), or unchanged and why not."""
        if not self.get_parameter("depth_topic").value or not self.get_parameter("camera_info_topic").value:
            return frame, None  # 3D targets are not configured: nothing is missing
        with self._cond:
            info = self._camera_info
            candidates = list(self._depth)
        return depth_sync.attach_depth(frame, info, candidates, float(self.get_parameter("sync_tolerance").value),
                                       self.get_logger())

    def _publish(self, req: _Request, arrival: _Arrival, frame: Frame, result: Any, depth_missing: str | None,
                 queue_ms: float, inference_ms: float) -> None:
        now_ns = self.get_clock().now().nanoseconds
        stamp_ns = frame.stamp.ns if frame.stamp is not None else 0
        latency_ms = (now_ns - (stamp_ns if stamp_ns > 0 else arrival.received_ns)) / 1e6
        with self._cond:
            self._latency.append(latency_ms)
            self._last_latency_ms = latency_ms
            counters = dict(self._counts)
        counters["frames_processed"] += 1  # this one
        report = outputs.FrameReport(request=req.seq, frame_seq=arrival.seq, latency_ms=latency_ms,
                                     queue_ms=queue_ms, inference_ms=inference_ms, counters=counters)
        text = outputs.result_json(result, report, depth_missing=depth_missing)  # ~/result and ~/segmentation's
        self._outputs.publish(result, frame.rgb, arrival.msg.header, report,
                              overlay=bool(self.get_parameter("publish_overlay").value), depth_missing=depth_missing,
                              result_json=text)
        server = self.segment_server
        if server is not None and server.publisher.get_subscription_count() > 0:  # its masks: a full frame each
            server.publish(result, arrival.msg.header, latency_ms, inference_ms=inference_ms, result_json=text)
        log = self.get_logger()
        summary = (f"request {req.seq} frame {arrival.seq} ({frame.describe()}): {len(result.instances)} mask(s), "
                   f"latency {latency_ms:.0f} ms (inference {inference_ms:.0f} ms), dropped "
                   f"{counters['frames_dropped']}")
        if req.continuous:
            log.info(summary, throttle_duration_sec=5.0)
        else:
            log.info(f"{summary}: {result.text[:200]!r}")


def _stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _describe(header: Any) -> str:
    """``frame_id @ sec.nanosec`` of a ROS header, for logs."""
    return f"{header.frame_id or '?'} @ {Stamp.of(header.stamp)}"
