"""ROS image messages <-> numpy, without importing ROS (``cv_bridge`` and ``ros2-numpy`` are not usable here).

Everything here is duck-typed: decoding reads only message fields (``height``, ``width``, ``encoding``, ``is_bigendian``,
``step``, ``data``; ``format`` and ``data`` for CompressedImage; ``k``/``width``/``height`` for
CameraInfo), so it works on rclpy messages and on ``rosbags`` messages alike. Building a message
returns its fields as a dict (``image_fields``); ``ros_nodes.conversions.to_image_msg`` turns that into
an rclpy ``sensor_msgs.msg.Image``. The bag tool (rosbags messages) and the ROS node (rclpy messages)
share this module.

Supported encodings:

* colour in: ``rgb8``, ``bgr8``, ``rgba8``, ``bgra8``, ``mono8`` (grey repeated to RGB), with any row
  padding (``step`` >= width * bytes per pixel);
* depth in: ``16UC1`` / ``mono16`` (millimetres) and ``32FC1`` (metres), either byte order;
* out: ``mono8``, ``rgb8``, ``bgr8``, ``16UC1``, ``32FC1`` (tightly packed, little-endian).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, MalformedImageError, UnsupportedEncodingError

#: encoding -> (numpy dtype, channels)
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "8UC1": (np.dtype(np.uint8), 1),
    "8UC3": (np.dtype(np.uint8), 3),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
}
COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")


def image_to_array(msg: Any) -> np.ndarray:
    """Pixel buffer of a ``sensor_msgs/Image`` as an array, row padding removed, native byte order.

    Returns:
        HxW (one channel) or HxWxC array with the encoding's dtype (uint8, uint16 or float32),
        channels in the message's order (no BGR -> RGB swap here).

    Raises:
        UnsupportedEncodingError: unknown encoding.
        MalformedImageError: size fields inconsistent with ``data``.
    """
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise UnsupportedEncodingError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(sorted(ENCODINGS))}")
    dtype, channels = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise MalformedImageError(f"image has an empty size {height}x{width}")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise MalformedImageError(f"step {step} is smaller than width*bytes per pixel = {row_bytes} ({encoding})")
    buf = np.frombuffer(_as_bytes(msg.data), dtype=np.uint8)
    needed = step * (height - 1) + row_bytes
    if buf.size < needed:
        raise MalformedImageError(f"image data has {buf.size} bytes; {height}x{width} {encoding} with step "
                                  f"{step} needs {needed}")
    rows = np.lib.stride_tricks.as_strided(buf, shape=(height, row_bytes), strides=(step, 1))
    big = bool(msg.is_bigendian)
    # Always our own copy: the rows may be a (writable) view of the message's buffer.
    array = rows.copy().view(dtype.newbyteorder(">" if big else "<"))
    array = array.astype(dtype, copy=False)  # native byte order
    return array.reshape(height, width) if channels == 1 else array.reshape(height, width, channels)


def image_to_rgb(msg: Any) -> np.ndarray:
    """A colour ``sensor_msgs/Image`` (rgb8, bgr8, rgba8, bgra8, mono8) as HxWx3 uint8 RGB (a copy)."""
    encoding = str(msg.encoding)
    if encoding not in COLOR_ENCODINGS:
        raise UnsupportedEncodingError(
            f"unsupported colour encoding {encoding!r}; use one of {', '.join(COLOR_ENCODINGS)}")
    array = image_to_array(msg)
    if encoding == "mono8":
        return np.repeat(array[:, :, None], 3, axis=2)
    if encoding in ("bgr8", "bgra8"):
        return np.ascontiguousarray(array[:, :, 2::-1])
    return np.ascontiguousarray(array[:, :, :3])


def compressed_to_rgb(msg: Any, *, max_side: int | None = None) -> np.ndarray:
    """A ``sensor_msgs/CompressedImage`` (JPEG or PNG, colour or grey, 8 or 16 bit) as HxWx3 uint8 RGB,
    through the one decoder every door uses (:func:`lisa_agent.images.decode_image_bytes`; pixels as
    encoded, no EXIF rotation). The size is read from the header first: a frame with a side over
    ``max_side`` (default: the engine's largest) is refused before it is decoded.

    Raises:
        UnsupportedEncodingError: the bytes do not decode as an image (or are a compressed depth
            stream, which this node does not read).
        ImageTooLargeError: the image is larger than ``max_side`` (code ``too_large``, as through every door).
    """
    from ..errors import ImageTooLargeError, InvalidImageError
    from ..frames import MAX_SIDE
    from ..images import decode_image_bytes

    fmt = str(getattr(msg, "format", ""))
    if "compressedDepth" in fmt:
        raise UnsupportedEncodingError(f"compressed depth ({fmt!r}) is not a colour image")
    data = bytes(_as_bytes(msg.data))
    label = f"compressed image ({fmt or 'unknown format'}, {len(data)} bytes)"
    try:
        return decode_image_bytes(data, max_side=MAX_SIDE if max_side is None else max_side, exif=False, label=label)
    except ImageTooLargeError:
        raise
    except InvalidImageError:
        raise UnsupportedEncodingError(f"{label} does not decode as an image (JPEG, PNG, ...)") from None


def depth_to_meters_array(msg: Any) -> np.ndarray:
    """A depth ``sensor_msgs/Image`` (16UC1/mono16 in mm, 32FC1 in m) as HxW float32 metres, NaN invalid."""
    from lisa_agent.geometry import depth_to_meters

    encoding = str(msg.encoding)
    if encoding not in DEPTH_ENCODINGS:
        raise UnsupportedEncodingError(
            f"unsupported depth encoding {encoding!r}; use 16UC1 (millimetres) or 32FC1 (metres)")
    return depth_to_meters(image_to_array(msg))


def camera_info_intrinsics(msg: Any) -> tuple[Any, tuple[int, int]]:
    """``sensor_msgs/CameraInfo`` -> (:class:`lisa_agent.geometry.Intrinsics` from ``k``, (height, width))."""
    from lisa_agent.geometry import Intrinsics

    return Intrinsics.from_k(list(msg.k)), (int(msg.height), int(msg.width))


def image_fields(array: np.ndarray, encoding: str) -> dict[str, Any]:
    """Fields of a ``sensor_msgs/Image`` (all but ``header``) holding ``array``, tightly packed.

    Args:
        array: HxW (mono8, 16UC1, 32FC1) or HxWx3 (rgb8, bgr8) array; converted to the encoding's
            dtype. For ``bgr8`` the array is RGB and is swapped here.
        encoding: one of mono8, rgb8, bgr8, 16UC1, 32FC1.

    Returns:
        dict with ``height``, ``width``, ``encoding``, ``is_bigendian`` (0), ``step`` and ``data``
        (bytes).
    """
    if encoding not in ("mono8", "rgb8", "bgr8", "16UC1", "32FC1"):
        raise UnsupportedEncodingError(f"cannot write encoding {encoding!r}")
    dtype, channels = ENCODINGS[encoding]
    array = np.asarray(array)
    expected_ndim = 2 if channels == 1 else 3
    if array.ndim != expected_ndim or (channels == 3 and array.shape[2] != 3):
        raise InvalidArgumentError(f"{encoding} needs an array of shape {'HxW' if channels == 1 else 'HxWx3'}; "
                         f"got {array.shape}")
    if encoding == "bgr8":
        array = array[:, :, ::-1]
    packed = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<"))
    height, width = packed.shape[:2]
    return {"height": int(height), "width": int(width), "encoding": encoding, "is_bigendian": 0,
            "step": int(width * channels * dtype.itemsize), "data": packed.tobytes()}


def _as_bytes(data: Any) -> bytes | bytearray | memoryview:
    """The raw bytes of a message's ``data`` (bytes, array.array, list of ints or numpy array)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return data
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data, dtype=np.uint8).data.cast("B")
    try:
        return memoryview(data).cast("B")  # array.array('B') (rclpy)
    except TypeError:
        return bytes(bytearray(data))
