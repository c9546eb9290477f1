"""sensor_msgs <-> numpy conversions on real message objects (rclpy wheels and rosbags)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from lisa_agent.errors import InvalidImageError
from ros_nodes.conversions import (
    MalformedImageError,
    UnsupportedEncodingError,
    camera_info_intrinsics,
    compressed_to_rgb,
    depth_to_meters_array,
    encode_jpeg,
    image_fields,
    image_to_array,
    image_to_rgb,
    to_image_msg,
)

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)


def make_image(pixels: np.ndarray, encoding: str, *, pad: int = 0, big_endian: bool = False) -> Image:
    """An Image whose rows are ``pixels`` (HxW or HxWxC) followed by ``pad`` junk bytes."""
    h, w = pixels.shape[:2]
    dtype = pixels.dtype.newbyteorder(">" if big_endian else "<")
    raw = np.ascontiguousarray(pixels, dtype=dtype).reshape(h, -1).view(np.uint8)
    rows = np.full((h, raw.shape[1] + pad), 0xEE, dtype=np.uint8)
    rows[:, : raw.shape[1]] = raw
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=int(big_endian), step=rows.shape[1])
    msg.data = rows.tobytes()
    return msg


def wire(msg):
    """The message after a trip through real CDR bytes, as a subscriber receives it."""
    return deserialize_message(serialize_message(msg), type(msg))


@pytest.mark.parametrize("pad", [0, 5, 64])
def test_rgb8_with_row_padding(pad):
    msg = wire(make_image(RGB, "rgb8", pad=pad))
    out = image_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == (6, 9, 3)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("pad", [0, 3])
def test_bgr8_is_swapped_to_rgb(pad):
    msg = wire(make_image(RGB[:, :, ::-1], "bgr8", pad=pad))
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)


def test_rgba8_and_bgra8_drop_alpha():
    alpha = np.full((6, 9, 1), 77, dtype=np.uint8)
    np.testing.assert_array_equal(image_to_rgb(wire(make_image(np.concatenate([RGB, alpha], 2), "rgba8", pad=2))), RGB)
    bgra = np.concatenate([RGB[:, :, ::-1], alpha], 2)
    np.testing.assert_array_equal(image_to_rgb(wire(make_image(bgra, "bgra8"))), RGB)


def test_mono8_becomes_grey_rgb():
    grey = RGB[:, :, 0]
    out = image_to_rgb(wire(make_image(grey, "mono8", pad=7)))
    assert out.shape == (6, 9, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_decoded_frames_are_writable_copies():
    msg = make_image(RGB, "rgb8")
    out = image_to_rgb(msg)
    assert out.flags.writeable and out.flags.c_contiguous
    out[:] = 0
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)  # the message is untouched


@pytest.mark.parametrize("big_endian", [False, True])
def test_16uc1_depth_in_millimetres(big_endian):
    mm = np.array([[0, 500, 1000], [1234, 65535, 2]], dtype=np.uint16)
    msg = wire(make_image(mm, "16UC1", pad=4, big_endian=big_endian))
    np.testing.assert_array_equal(image_to_array(msg), mm)
    m = depth_to_meters_array(msg)
    assert np.isnan(m[0, 0]) and m[0, 1] == pytest.approx(0.5) and m[1, 0] == pytest.approx(1.234)


def test_32fc1_depth_in_metres():
    depth = np.array([[0.5, np.nan], [2.25, 0.0]], dtype=np.float32)
    m = depth_to_meters_array(wire(make_image(depth, "32FC1", pad=8, big_endian=True)))
    assert m[0, 0] == pytest.approx(0.5) and m[1, 0] == pytest.approx(2.25)
    assert np.isnan(m[0, 1]) and np.isnan(m[1, 1])


def test_jpeg_and_png_compressed_images():
    smooth = np.zeros((32, 48, 3), dtype=np.uint8)
    smooth[:, :24] = (200, 40, 30)
    smooth[:, 24:] = (20, 60, 220)
    msg = CompressedImage(format="jpeg")
    msg.data = encode_jpeg(smooth, quality=95)
    out = compressed_to_rgb(wire(msg))
    assert out.shape == smooth.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - smooth).mean() < 4  # lossy, but the colours are RGB, not BGR
    import cv2

    png = CompressedImage(format="png")
    png.data = cv2.imencode(".png", RGB[:, :, ::-1])[1].tobytes()
    np.testing.assert_array_equal(compressed_to_rgb(wire(png)), RGB)


@pytest.mark.parametrize("encoding", ["yuv422", "bayer_rggb8", "64FC1"])
def test_unsupported_encodings_raise_a_named_error(encoding):
    msg = Image(height=2, width=2, encoding=encoding, step=4)
    msg.data = bytes(8)
    with pytest.raises(UnsupportedEncodingError, match=encoding):
        image_to_rgb(msg)


def test_depth_encoding_is_not_a_colour_image_and_vice_versa():
    with pytest.raises(UnsupportedEncodingError, match="colour"):
        image_to_rgb(make_image(np.zeros((2, 2), np.uint16), "16UC1"))
    with pytest.raises(UnsupportedEncodingError, match="depth"):
        depth_to_meters_array(make_image(RGB, "rgb8"))


def test_malformed_sizes_raise():
    short = make_image(RGB, "rgb8")
    short.data = bytes(short.data)[:-1]
    with pytest.raises(MalformedImageError, match="bytes"):
        image_to_rgb(short)
    narrow = make_image(RGB, "rgb8")
    narrow.step = 9 * 3 - 1
    with pytest.raises(MalformedImageError, match="step"):
        image_to_rgb(narrow)
    with pytest.raises(MalformedImageError, match="empty"):
        image_to_rgb(Image(height=0, width=0, encoding="rgb8"))


def test_garbage_compressed_bytes_raise():
    msg = CompressedImage(format="jpeg")
    msg.data = b"not a jpeg at all"
    with pytest.raises(UnsupportedEncodingError, match="does not decode"):
        compressed_to_rgb(msg)


@pytest.mark.parametrize("encoding,array", [
    ("mono8", RGB[:, :, 1]),
    ("rgb8", RGB),
    ("bgr8", RGB),
    ("16UC1", (RGB[:, :, 0].astype(np.uint16) * 200)),
    ("32FC1", RGB[:, :, 2].astype(np.float32) / 7.0),
])
def test_to_image_msg_round_trips(encoding, array):
    msg = wire(to_image_msg(array, encoding))
    assert (msg.height, msg.width, msg.encoding) == (6, 9, encoding)
    back = image_to_rgb(msg) if encoding in ("rgb8", "bgr8") else image_to_array(msg)
    np.testing.assert_array_equal(back, array)
    if encoding == "bgr8":  # stored as BGR on the wire
        np.testing.assert_array_equal(np.frombuffer(bytes(msg.data), np.uint8).reshape(6, 9, 3), RGB[:, :, ::-1])


def test_image_fields_refuse_wrong_shapes():
    with pytest.raises(ValueError, match="HxWx3"):
        image_fields(RGB[:, :, 0], "rgb8")
    with pytest.raises(UnsupportedEncodingError):
        image_fields(RGB, "yuv422")


def test_camera_info_intrinsics():
    info = CameraInfo(height=480, width=640)
    info.k = [600.0, 0.0, 320.0, 0.0, 610.0, 240.0, 0.0, 0.0, 1.0]
    intrinsics, size = camera_info_intrinsics(wire(info))
    assert (intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy) == (600.0, 610.0, 320.0, 240.0)
    assert size == (480, 640)
    with pytest.raises(ValueError, match="focal"):
        camera_info_intrinsics(CameraInfo())  # all-zero K: no calibration


def test_rosbags_messages_decode_the_same():
    """The bag tool reads rosbags message objects with the same functions."""
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.LATEST)
    raw = bytes(serialize_message(make_image(RGB[:, :, ::-1], "bgr8", pad=3)))
    msg = store.deserialize_cdr(raw, "sensor_msgs/msg/Image")
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)


# ---------------------------------------------------------------------------------------------- fuzzing
_ENCODINGS = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "16UC1", "32FC1", "8UC3", "yuv422", "", "RGB8"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoding=st.sampled_from(_ENCODINGS), height=st.integers(-2, 40), width=st.integers(-2, 40),
       step=st.integers(-4, 200), big=st.booleans(), data=st.binary(max_size=2000))
def test_fuzz_image_messages_decode_or_raise_a_named_error(encoding, height, width, step, big, data):
    """Any field values a publisher may send: a correctly shaped array, or one of the two named errors."""
    msg = SimpleNamespace(encoding=encoding, height=height, width=width, step=step, is_bigendian=big, data=data)
    for convert in (image_to_rgb, image_to_array, depth_to_meters_array):
        try:
            out = convert(msg)
        except (UnsupportedEncodingError, MalformedImageError):
            continue
        assert out.shape[:2] == (height, width)
        if convert is image_to_rgb:
            assert out.dtype == np.uint8 and out.shape[2] == 3 and out.flags.c_contiguous


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=3000),
                      st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]).flatmap(
                          lambda magic: st.binary(max_size=3000).map(lambda rest: magic + rest)),
                      st.integers(0, 400).map(lambda n: encode_jpeg(RGB)[:n])),
       fmt=st.sampled_from(["jpeg", "png", "rgb8; jpeg compressed bgr8", "16UC1; compressedDepth", ""]))
def test_fuzz_compressed_images_decode_or_raise_a_named_error(data, fmt):
    msg = SimpleNamespace(format=fmt, data=data)
    try:
        out = compressed_to_rgb(msg)
    except InvalidImageError:  # UnsupportedEncodingError, MalformedImageError, ImageTooLargeError: all named
        return
    assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
