"""Run LISA over a recorded rosbag2 and write masks, overlays and results into a new bag.

Reads and writes real rosbag2 files (sqlite3 or MCAP) with ``rosbags`` (pure Python; no ROS
installation, no rclpy). For every frame on the image topic (sensor_msgs/Image or
CompressedImage) the output bag gets, with the frame's header and log time:

* ``<prefix>/mask``: sensor_msgs/Image ``mono8``, value k+1 inside instance k;
* ``<prefix>/overlay``: sensor_msgs/Image ``rgb8`` (unless disabled);
* ``<prefix>/result``: std_msgs/String, JSON: the result schema (``docs/result.md``; ``stamp`` and
  ``frame_id`` from the frame's header, masks without RLE: the mask image carries them) plus the
  envelope keys ``frame_index`` (the frame's index on the image topic) and ``inference_ms``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..backend import SegmentBackend
from ..errors import InvalidArgumentError, LisaError
from ..frames import Frame, Stamp
from ..options import QueryOptions

if TYPE_CHECKING:
    from rosbags.typesys.stores.latest import sensor_msgs__msg__CompressedImage, sensor_msgs__msg__Image

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")


@dataclass
class BagReport:
    """What :func:`process_bag` did: frame counts, per-topic message counts of the output, timings."""

    out_path: Path
    storage: str
    frames: int = 0
    processed: int = 0
    skipped: list[str] = field(default_factory=list)
    written: dict[str, int] = field(default_factory=dict)
    inference_ms: list[float] = field(default_factory=list)

    def summary(self) -> str:
        mean = sum(self.inference_ms) / len(self.inference_ms) if self.inference_ms else float("nan")
        topics = ", ".join(f"{t} x{n}" for t, n in sorted(self.written.items()))
        return (f"{self.processed}/{self.frames} frames segmented (mean {mean:.0f} ms), {len(self.skipped)} skipped; "
                f"wrote {self.out_path} ({self.storage}): {topics}")


def _storage_plugin(name: str) -> Any:
    from rosbags.rosbag2 import StoragePlugin

    plugins = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
    if name not in plugins:
        raise InvalidArgumentError(f"storage must be sqlite3 or mcap; got {name!r}")
    return plugins[name]


def _input_storage(path: Path) -> str:
    """``mcap`` or ``sqlite3``: the storage of the bag at ``path`` (a bag folder or a single file)."""
    files = [path] if path.is_file() else list(path.iterdir())
    return "mcap" if any(f.suffix == ".mcap" for f in files) else "sqlite3"


def process_bag(in_path: str | Path, out_path: str | Path, *, image_topic: str, query: str, backend: SegmentBackend,
                options: QueryOptions | None = None, prefix: str = "/lisa", overlay: bool = True, every: int = 1,
                max_frames: int | None = None, storage: str | None = None, copy_input: bool = False,
                progress: Callable[[int, Any], None] | None = None) -> BagReport:
    """Segment every ``every``-th frame of ``image_topic`` in the bag at ``in_path``; write ``out_path``.

    Args:
        backend: the model (any :class:`~lisa_agent.backend.SegmentBackend`).
        options: how it answers (:class:`~lisa_agent.options.QueryOptions`; None: the defaults).
        storage: ``sqlite3`` or ``mcap`` for the output (default: the input's).
        copy_input: also copy every input topic (raw) into the output, so it plays back alone.
        progress: called with (frame index, result) after each segmented frame.

    Raises:
        InvalidArgumentError: missing input, existing output, unknown topic or wrong message type.
    """
    from rosbags.rosbag2 import Reader, Writer
    from rosbags.typesys import Stores, get_typestore

    from ..frames import check_query
    from .image_messages import (
        MalformedImageError,
        UnsupportedEncodingError,
        compressed_to_rgb,
        image_fields,
        image_to_rgb,
    )

    query = check_query(query)
    if every < 1:
        raise InvalidArgumentError(f"every must be >= 1; got {every}")
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.exists():
        raise InvalidArgumentError(f"input bag {in_path} does not exist")
    if out_path.exists():
        raise InvalidArgumentError(f"output {out_path} already exists; choose a new path (rosbag2 never overwrites)")
    prefix = "/" + prefix.strip("/")
    typestore = get_typestore(Stores.LATEST)
    Img = typestore.types["sensor_msgs/msg/Image"]
    Str = typestore.types["std_msgs/msg/String"]

    with Reader(in_path) as reader:
        connections = [c for c in reader.connections if c.topic == image_topic]
        if not connections:
            found = sorted({c.topic for c in reader.connections if c.msgtype in IMAGE_TYPES})
            raise InvalidArgumentError(f"no topic {image_topic!r} in {in_path}; image topics there: "
                                       f"{', '.join(found) or 'none'}")
        if connections[0].msgtype not in IMAGE_TYPES:
            raise InvalidArgumentError(f"{image_topic} carries {connections[0].msgtype}, not an image "
                                       f"({' or '.join(IMAGE_TYPES)})")
        chosen = storage or _input_storage(in_path)
        report = BagReport(out_path=out_path, storage=chosen)
        writer = Writer(out_path, version=9, storage_plugin=_storage_plugin(chosen))
        with writer:
            outs = {"mask": writer.add_connection(f"{prefix}/mask", Img.__msgtype__, typestore=typestore),
                    "result": writer.add_connection(f"{prefix}/result", Str.__msgtype__, typestore=typestore)}
            if overlay:
                outs["overlay"] = writer.add_connection(f"{prefix}/overlay", Img.__msgtype__, typestore=typestore)
            copies = {}
            if copy_input:
                for conn in reader.connections:
                    copies[conn.id] = writer.add_connection(conn.topic, conn.msgtype, msgdef=conn.msgdef.data,
                                                            rihs01=conn.digest, typestore=typestore)

            def put(key: str, timestamp: int, message: Any, msgtype: str) -> None:
                writer.write(outs[key], timestamp, typestore.serialize_cdr(message, msgtype))
                topic = outs[key].topic
                report.written[topic] = report.written.get(topic, 0) + 1

            wanted = list(reader.connections) if copy_input else connections
            for conn, timestamp, raw in reader.messages(connections=wanted):
                if copy_input:
                    writer.write(copies[conn.id], timestamp, raw)
                    report.written[conn.topic] = report.written.get(conn.topic, 0) + 1
                if conn.topic != image_topic:
                    continue
                index = report.frames
                report.frames += 1
                if index % every or (max_frames is not None and report.processed >= max_frames):
                    continue
                # the image topic's type is one of IMAGE_TYPES (checked above)
                msg = cast("sensor_msgs__msg__Image | sensor_msgs__msg__CompressedImage",
                           typestore.deserialize_cdr(raw, conn.msgtype))
                header = msg.header
                try:
                    rgb = compressed_to_rgb(msg) if conn.msgtype.endswith("CompressedImage") else image_to_rgb(msg)
                except (UnsupportedEncodingError, MalformedImageError) as exc:
                    report.skipped.append(f"frame {index}: {exc}")
                    continue
                t0 = time.perf_counter()
                try:
                    frame = Frame(rgb, frame_id=str(header.frame_id), stamp=Stamp.of(header.stamp))
                    result = backend.segment(frame, query, options=options)
                except LisaError as exc:
                    report.skipped.append(f"frame {index}: {exc}")
                    continue
                ms = (time.perf_counter() - t0) * 1000.0
                report.inference_ms.append(ms)
                report.processed += 1
                labels = result.label_mask()
                put("mask", timestamp, _image(Img, header, image_fields(labels, "mono8")), Img.__msgtype__)
                if overlay:
                    put("overlay", timestamp, _image(Img, header, image_fields(result.overlay(rgb), "rgb8")),
                        Img.__msgtype__)
                payload = {**result.to_dict(include_rle=False), "frame_index": index, "inference_ms": round(ms, 2)}
                put("result", timestamp, Str(data=json.dumps(payload)), Str.__msgtype__)
                if progress is not None:
                    progress(index, result)
    return report


def _image(cls: Any, header: Any, fields: dict[str, Any]) -> Any:
    import numpy as np

    data = np.frombuffer(fields.pop("data"), dtype=np.uint8)
    return cls(header=header, data=data, **fields)
