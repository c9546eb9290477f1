"""Foxglove live view and MCAP recording (foxglove-sdk; no ROS needed): what the console and the ROS node show.

:class:`FoxglovePublisher` runs a Foxglove WebSocket server (the app's "Foxglove WebSocket" connection, or
Lichtblick's) and/or writes an MCAP file, both through one foxglove-sdk context of its own. Topics:

==========================  ===========================  ==========================================================
topic                       schema                       what
==========================  ===========================  ==========================================================
``/lisa/image``             ``foxglove.CompressedImage`` the frames (JPEG), stamped as the source stamped them
``/lisa/annotations``       ``foxglove.ImageAnnotations`` per mask its outline (closed polygons), a label and the
                                                         centroid; the chosen target drawn thicker, in white
``/lisa/answer``            JSON ``lisa.Answer``         ``{"data": answer text, "request", "labels", "declined",
                                                         "message", "latency_ms"}``
``/lisa/result``            JSON                         the result schema plus the door's envelope (docs/result.md)
``/lisa/targets``           ``foxglove.SceneUpdate``     a sphere and a label at each mask's 3D point (frames with depth)
``/lisa/request``           JSON ``lisa.Request``        each instruction: ``{"data", "mode", "request", "origin"}``
``/lisa/log``               ``foxglove.Log``             refusals and errors
==========================  ===========================  ==========================================================

Annotations carry the timestamp of the frame their masks are for, so the Image panel can match them to
their frame. With the client-publish capability an operator answers from Foxglove's Publish panel:
topic ``/lisa/instruction``, JSON ``{"data": "grab something to cut with"}`` (a bare JSON string works too);
the text goes to ``on_instruction`` in a worker thread (never on the SDK's own thread) and a refusal comes
back as a status message in the app.

The Foxglove WebSocket protocol has no authentication (no token to carry): the server binds loopback, and
another address needs ``insecure=True`` (``--insecure``). foxglove-sdk's server cannot check who connects, so
it listens on a random loopback port with TLS behind a :class:`~lisa_agent.serving.gate.WebSocketGate` that
refuses web pages of other sites (their ``Origin``; ``origins`` lists the apps allowed, by default the
Foxglove web app) and, on loopback, a ``Host`` that is not this machine's (DNS rebinding).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import foxglove
import numpy as np
from foxglove.channels import (
    CompressedImageChannel,
    ImageAnnotationsChannel,
    LogChannel,
    SceneUpdateChannel,
)
from foxglove.messages import (
    CircleAnnotation,
    Color,
    CompressedImage,
    ImageAnnotations,
    Log,
    LogLevel,
    Point2,
    PointsAnnotation,
    PointsAnnotationType,
    Pose,
    Quaternion,
    SceneEntity,
    SceneEntityDeletion,
    SceneEntityDeletionType,
    SceneUpdate,
    SpherePrimitive,
    TextAnnotation,
    TextPrimitive,
    Timestamp,
    Vector3,
)
from foxglove.websocket import Capability, ChannelView, Client, ClientChannel, ServerListener

from ..errors import InvalidArgumentError
from ..frames import Stamp
from ..result import SegmentationResult
from ..serving.gate import WebSocketGate, loopback_certificate
from ..serving.security import is_loopback_host

log = logging.getLogger("lisa_agent.integrations.foxglove")

INSTRUCTION_TOPIC = "/lisa/instruction"
#: Browser origins allowed to open the live view besides clients that send none (the desktop apps).
FOXGLOVE_ORIGINS = ("https://app.foxglove.dev",)
#: Mask colours (RGB 0..1), the page's palette.
PALETTE = [(1.0, 0.42, 0.34), (0.26, 0.84, 0.78), (0.96, 0.73, 0.26), (0.66, 0.55, 1.0), (0.48, 0.83, 0.35),
           (0.31, 0.66, 1.0), (1.0, 0.54, 0.85), (0.79, 0.84, 0.35)]
#: Most polygons per mask, and points per polygon, in the annotations.
MAX_POLYGONS = 8
MAX_POINTS = 400
_ANSWER_SCHEMA = {"type": "object", "title": "lisa.Answer", "properties": {
    "data": {"type": "string"}, "request": {"type": "integer"}, "labels": {"type": "array", "items": {"type": "string"}},
    "declined": {"type": "boolean"}, "message": {"type": ["string", "null"]}, "latency_ms": {"type": "number"}}}
_REQUEST_SCHEMA = {"type": "object", "title": "lisa.Request", "properties": {
    "data": {"type": "string"}, "mode": {"type": "string"}, "request": {"type": "integer"},
    "origin": {"type": "string"}}}


def _color(k: int, alpha: float = 1.0) -> Color:
    r, g, b = PALETTE[k % len(PALETTE)]
    return Color(r=r, g=g, b=b, a=alpha)


def _stamp(stamp: Stamp | None) -> tuple[Timestamp, int]:
    """A message timestamp and a log time (ns) from a frame's stamp (now when it has none)."""
    ns = stamp.ns if stamp is not None and stamp.ns > 0 else time.time_ns()
    return Timestamp(ns // 1_000_000_000, ns % 1_000_000_000), ns


def mask_polygons(mask: np.ndarray, max_polygons: int = MAX_POLYGONS, max_points: int = MAX_POINTS
                  ) -> list[list[tuple[float, float]]]:
    """Outlines of a bool HxW mask as closed polygons of (x, y) image coordinates (origin at the top-left
    corner of the top-left pixel, as Foxglove draws them): the largest ``max_polygons`` outer contours,
    simplified to at most ``max_points`` points each."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    contours = sorted(contours, key=cv2.contourArea, reverse=True)[:max_polygons]
    out = []
    for contour in contours:
        epsilon = 0.75
        poly = cv2.approxPolyDP(contour, epsilon, True)
        while len(poly) > max_points:
            epsilon *= 2.0
            poly = cv2.approxPolyDP(contour, epsilon, True)
        if len(poly) >= 3:
            out.append([(float(x) + 0.5, float(y) + 0.5) for x, y in poly[:, 0, :]])
    return out


class FoxglovePublisher:
    """A Foxglove WebSocket server and/or MCAP recorder for the console's (or the ROS node's) outputs.

    Args:
        port: WebSocket port (0: any free port, :attr:`port` tells which); None: no server (recording only).
        host: address the server binds (loopback by default: the protocol has no authentication).
        record: MCAP file to write the session to (overwritten if it exists); None: no recording.
        on_instruction: called with the text an operator publishes on ``/lisa/instruction`` (in a worker
            thread, one at a time); an exception it raises is shown in the app as a warning.
        name: the server's name in the app.
        origins: browser origins (``scheme://host[:port]``) allowed to connect besides :data:`FOXGLOVE_ORIGINS`.
        insecure: allow a ``host`` other than a loopback address (anyone who reaches it sees the camera and
            can send instructions).
        header_timeout_s: a connection that has not sent its request head by then is dropped.
    """

    def __init__(self, *, port: int | None = None, host: str = "127.0.0.1", record: str | Path | None = None,
                 on_instruction: Callable[[str], Any] | None = None, name: str = "lisa-agent",
                 origins: Sequence[str] = (), insecure: bool = False, header_timeout_s: float = 10.0) -> None:
        check_foxglove_bind(port, host, insecure=insecure)
        if port is None and record is None:
            raise InvalidArgumentError("FoxglovePublisher needs a port, a recording file, or both")
        self.context = foxglove.Context()
        self.on_instruction = on_instruction
        self._lock = threading.Lock()
        self._client_topics: dict[tuple[int, int], str] = {}
        self._had_targets = False
        self._closed = False
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lisa-foxglove")
        self.image = CompressedImageChannel("/lisa/image", context=self.context)
        self.annotations = ImageAnnotationsChannel("/lisa/annotations", context=self.context)
        self.answer = foxglove.Channel("/lisa/answer", schema=_ANSWER_SCHEMA, context=self.context)
        self.result = foxglove.Channel("/lisa/result", message_encoding="json", context=self.context)
        self.targets = SceneUpdateChannel("/lisa/targets", context=self.context)
        self.request = foxglove.Channel("/lisa/request", schema=_REQUEST_SCHEMA, context=self.context)
        self.log = LogChannel("/lisa/log", context=self.context)
        self.recording: Path | None = None
        self._writer: Any = None
        if record is not None:
            self.recording = Path(record)
            self._writer = foxglove.open_mcap(self.recording, allow_overwrite=True, context=self.context)
        self._server: Any = None
        self._gate: WebSocketGate | None = None
        self.port: int | None = None
        if port is not None:
            cert, key = loopback_certificate()  # the gate is the only client that trusts it
            self._server = foxglove.start_server(
                name=name, host="127.0.0.1", port=0, capabilities=[Capability.ClientPublish],
                supported_encodings=["json"], server_listener=_Listener(self), context=self.context,
                tls_cert=cert, tls_key=key)
            try:
                self._gate = WebSocketGate(int(self._server.port), cert, host=host, port=port,
                                           origins=[*FOXGLOVE_ORIGINS, *origins],
                                           header_timeout_s=header_timeout_s).start()
            except BaseException:
                self.close()
                raise
            self.port = self._gate.port
        self.host = host

    # ------------------------------------------------------------------ publishing
    def publish_image(self, jpeg: bytes, stamp: Stamp | None, frame_id: str | None) -> None:
        """One frame (JPEG bytes) on ``/lisa/image``."""
        ts, ns = _stamp(stamp)
        self.image.log(CompressedImage(timestamp=ts, frame_id=frame_id or "camera", data=jpeg, format="jpeg"),
                       log_time=ns)

    def publish_result(self, result: SegmentationResult, labels: Sequence[str] | None = None, *,
                       target: int | None = None, request: int = 0, declined: bool = False,
                       message: str | None = None, latency_ms: float = 0.0, envelope: dict[str, Any] | None = None
                       ) -> None:
        """The masks as annotations, the answer text, the result JSON and (with depth) the 3D targets, all
        stamped with the stamp of the frame the result is for."""
        ts, ns = _stamp(result.stamp)
        n = len(result)
        names = list(labels) if labels is not None else [f"mask {k + 1}" for k in range(n)]
        points, texts, circles = [], [], []
        for k in range(n):
            chosen = target == k
            outline = Color(r=1.0, g=1.0, b=1.0, a=1.0) if chosen else _color(k)
            for poly in mask_polygons(result.masks[k]):
                points.append(PointsAnnotation(
                    timestamp=ts, type=PointsAnnotationType.LineLoop, points=[Point2(x=x, y=y) for x, y in poly],
                    outline_color=outline, fill_color=_color(k, 0.3), thickness=4.0 if chosen else 2.0))
            inst = result.instances[k]
            if inst.area > 0:
                cx, cy = inst.centroid
                circles.append(CircleAnnotation(timestamp=ts, position=Point2(x=cx + 0.5, y=cy + 0.5), diameter=8.0,
                                                thickness=2.0, fill_color=_color(k), outline_color=outline))
                x1, y1 = inst.bbox[0], inst.bbox[1]
                texts.append(TextAnnotation(
                    timestamp=ts, position=Point2(x=float(x1), y=float(max(14, y1 - 4))),
                    text=f"{k + 1} {names[k]} {inst.score:.2f}" + (" (target)" if chosen else ""), font_size=14.0,
                    text_color=Color(r=0.05, g=0.05, b=0.05, a=1.0), background_color=_color(k, 0.9)))
        self.annotations.log(ImageAnnotations(timestamp=ts, points=points, texts=texts, circles=circles), log_time=ns)
        self.answer.log({"data": result.text, "request": int(request), "labels": names, "declined": bool(declined),
                         "message": message, "latency_ms": round(float(latency_ms), 1)}, log_time=ns)
        payload = result.to_dict()
        payload.update(envelope or {})
        self.result.log(json.dumps(payload, allow_nan=False).encode(), log_time=ns)
        self._publish_targets(result, names, target, ts, ns)

    def _publish_targets(self, result: SegmentationResult, names: Sequence[str], target: int | None, ts: Timestamp,
                         ns: int) -> None:
        entities = []
        for k, point in enumerate(result.targets or []):
            if point is None or point.point is None:
                continue
            x, y, z = (float(v) for v in point.point)
            pose = Pose(position=Vector3(x=x, y=y, z=z), orientation=Quaternion(x=0.0, y=0.0, z=0.0, w=1.0))
            above = Pose(position=Vector3(x=x, y=y - 0.04, z=z), orientation=Quaternion(x=0.0, y=0.0, z=0.0, w=1.0))
            size = 0.04 if target == k else 0.025
            entities.append(SceneEntity(
                timestamp=ts, frame_id=result.frame_id or "camera", id=f"lisa/mask/{k}", frame_locked=True,
                spheres=[SpherePrimitive(pose=pose, size=Vector3(x=size, y=size, z=size), color=_color(k))],
                texts=[TextPrimitive(pose=above, billboard=True, font_size=14.0, scale_invariant=True,
                                     color=Color(r=1.0, g=1.0, b=1.0, a=1.0), text=f"{k + 1} {names[k]}")]))
        if not entities and not self._had_targets:
            return
        self._had_targets = bool(entities)
        deletions = [SceneEntityDeletion(timestamp=ts, type=SceneEntityDeletionType.All)]
        self.targets.log(SceneUpdate(deletions=deletions, entities=entities), log_time=ns)

    def publish_request(self, text: str, mode: str, request: int, origin: str = "console") -> None:
        """An instruction as it was given (recordings show what was asked, and when)."""
        self.request.log({"data": text, "mode": mode, "request": int(request), "origin": origin},
                         log_time=time.time_ns())

    def publish_log(self, message: str, level: str = "warning") -> None:
        """A refusal or error, on ``/lisa/log`` and (with a server) as a status message in the app."""
        levels = {"info": LogLevel.Info, "warning": LogLevel.Warning, "error": LogLevel.Error}
        ns = time.time_ns()
        self.log.log(Log(timestamp=Timestamp(ns // 1_000_000_000, ns % 1_000_000_000),
                         level=levels.get(level, LogLevel.Warning), message=message, name="lisa-agent"), log_time=ns)
        if self._server is not None:
            status = {"info": foxglove.StatusLevel.Info, "error": foxglove.StatusLevel.Error}.get(
                level, foxglove.StatusLevel.Warning)
            try:
                self._server.publish_status(message[:500], status)
            except Exception:  # a stopped server: nothing to tell
                pass

    def console_listener(self, kind: str, payload: Any) -> None:
        """A :class:`~lisa_agent.console.core.ConsoleCore` listener: frames, answers, instructions, errors."""
        if self._closed:
            return
        if kind == "frame":
            self.publish_image(payload.jpeg, payload.frame.stamp, payload.frame.frame_id)
        elif kind == "answer":
            envelope = payload.to_dict(include_rle=False)
            for key in list(envelope):
                if key in ("schema_version", "text", "query", "mode", "image_size", "frame_id", "stamp", "cached",
                           "masks", "depth_note", "track", "timings_ms"):
                    del envelope[key]
            target = envelope.get("target")
            self.publish_result(payload.result, payload.labels, target=target, request=payload.request,
                                declined=payload.declined, message=payload.message, latency_ms=payload.latency_ms,
                                envelope=envelope)
        elif kind == "instruction":
            self.publish_request(payload["text"], payload["mode"], payload["request"])
        elif kind == "error":
            self.publish_log(f"request {payload['request']}: {payload['message']}", "error")

    # ------------------------------------------------------------------ client channels (the SDK's threads)
    def client_advertised(self, client_id: int, channel_id: int, topic: str) -> None:
        with self._lock:
            self._client_topics[(client_id, channel_id)] = topic

    def client_unadvertised(self, client_id: int, channel_id: int) -> None:
        with self._lock:
            self._client_topics.pop((client_id, channel_id), None)

    def client_message(self, client_id: int, channel_id: int, data: bytes) -> None:
        """A message an operator published: an instruction on ``/lisa/instruction`` is answered, the rest ignored."""
        with self._lock:
            topic = self._client_topics.get((client_id, channel_id))
        if topic != INSTRUCTION_TOPIC or self.on_instruction is None or self._closed:
            return
        try:
            decoded = json.loads(bytes(data).decode("utf-8"))
            text = decoded.get("data") if isinstance(decoded, dict) else decoded
            if not isinstance(text, str):
                raise ValueError('expected {"data": "an instruction"}')
        except (UnicodeDecodeError, ValueError) as exc:
            self.publish_log(f"{INSTRUCTION_TOPIC}: not an instruction ({exc})", "warning")
            return
        try:
            self._worker.submit(self._answer, text)
        except RuntimeError:  # closing
            pass

    def _answer(self, text: str) -> None:
        assert self.on_instruction is not None
        try:
            self.on_instruction(text)
        except Exception as exc:  # a refusal (empty, too long, no frame, model error): tell the operator
            self.publish_log(f"instruction {text[:80]!r} refused: {exc}", "warning")

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Stop the server and finish the MCAP file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self._gate is not None:
            self._gate.close()
        if self._server is not None:
            self._server.stop()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> FoxglovePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_foxglove_bind(port: int | None, host: str, *, insecure: bool) -> None:
    """Refuse (:class:`InvalidArgumentError`) a bad port, or a non-loopback ``host`` without ``insecure``: the
    Foxglove protocol cannot carry a token, so the web console's token rule cannot apply to it."""
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        raise InvalidArgumentError(f"foxglove port must be in [0, 65535]; got {port!r}")
    if port is not None and not is_loopback_host(host) and not insecure:
        raise InvalidArgumentError(
            f"refusing to serve the Foxglove live view on {host}: the Foxglove protocol has no authentication, "
            "so anyone who reaches it would see the camera and could send instructions. Keep it on 127.0.0.1 "
            "(reach it through an SSH tunnel), or pass --insecure on a trusted network")


class _Listener(ServerListener):
    """The SDK's callbacks (its own threads), handed to the publisher."""

    def __init__(self, publisher: FoxglovePublisher) -> None:
        self.publisher = publisher

    def on_client_advertise(self, client: Client, channel: ClientChannel) -> None:
        self.publisher.client_advertised(int(client.id), int(channel.id), str(channel.topic))

    def on_client_unadvertise(self, client: Client, client_channel_id: int) -> None:
        self.publisher.client_unadvertised(int(client.id), int(client_channel_id))

    def on_subscribe(self, client: Client, channel: ChannelView) -> None:
        return None

    def on_unsubscribe(self, client: Client, channel: ChannelView) -> None:
        return None

    def on_message_data(self, client: Client, client_channel_id: int, data: bytes) -> None:
        self.publisher.client_message(int(client.id), int(client_channel_id), data)
