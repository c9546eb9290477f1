"""Wire format v1 without sockets: request validation, image coding, error mapping, bind rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lisa_agent.errors import (
    Code,
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidImageError,
    InvalidQueryError,
    ProtocolError,
    RemoteError,
    ServerBusyError,
    SupersededError,
)
from lisa_agent.errors import error_from_dict as error_from_reply
from lisa_agent.serving.codecs import decode_image, encode_depth, encode_image
from lisa_agent.serving.framing import (
    ERROR_CODES,
    PROTOCOL_VERSION,
    Limits,
    build_header,
    encode_reply,
    parse_reply,
)
from lisa_agent.serving.protocol import parse_request
from lisa_agent.serving.security import check_bind, is_loopback_endpoint


def frame(h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def segment_frames(image: np.ndarray, encoding: str = "raw", **fields) -> list[bytes]:
    spec, data = encode_image(image, encoding)
    fields.setdefault("query", "the cup")
    return [build_header("r1", "segment", image=spec, **fields), data]


def code_of(frames: list[bytes], limits: Limits | None = None) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_request(frames, limits)
    return info.value.code


def test_valid_segment_request_round_trips_the_image():
    img = frame()
    req = parse_request(segment_frames(img, options={"mode": "chat", "max_new_tokens": 8, "frame_id": 7}))
    assert (req.id, req.op, req.query) == ("r1", "segment", "the cup")
    assert req.query_options.mode == "chat" and req.query_options.max_new_tokens == 8
    assert req.options["frame_id"] == "7" and req.options["latest_only"] is False
    out = req.image(Limits())
    np.testing.assert_array_equal(out, img)
    assert out.flags.writeable


def test_png_is_lossless_and_jpeg_close():
    img = np.zeros((40, 48, 3), np.uint8)
    img[10:30, 12:40] = (200, 30, 60)
    spec, data = encode_image(img, "png")
    np.testing.assert_array_equal(decode_image(spec, data), img)
    spec, data = encode_image(img, "jpeg")
    assert data[:2] == b"\xff\xd8"
    decoded = decode_image(spec, data)
    assert decoded.shape == img.shape
    assert np.abs(decoded.astype(int) - img.astype(int)).mean() < 6  # channel order kept (RGB, not BGR)


def test_frame_key_is_the_pixels_whatever_the_client_names_them():
    img = frame()
    a = parse_request(segment_frames(img))
    b = parse_request(segment_frames(img, query="another query", options={"frame_id": "f9", "stream": "cam1"}))
    assert a.frame_key() == b.frame_key()  # same bytes, same features, whatever the ids
    c = parse_request(segment_frames(frame(24, 40)))
    assert c.frame_key() != a.frame_key()
    # another client reusing this client's frame id and stream for other pixels gets another key: no
    # request can be answered from features (or batched with a frame) computed from other pixels
    named = parse_request(segment_frames(img, options={"frame_id": "f1", "stream": "cam0"}))
    black = parse_request(segment_frames(np.zeros_like(img), options={"frame_id": "f1", "stream": "cam0"}))
    assert named.frame_key() != black.frame_key()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([], Code.BAD_REQUEST),
        ([b"{not json"], Code.BAD_REQUEST),
        ([b"\xff\xfe"], Code.BAD_REQUEST),
        ([b"[1, 2]"], Code.BAD_REQUEST),
        ([json.dumps({"v": 2, "op": "health"}).encode()], Code.BAD_REQUEST),  # no id
        ([json.dumps({"v": 99, "id": "a", "op": "health"}).encode()], Code.UNSUPPORTED_VERSION),
        ([json.dumps({"v": 2, "id": "a", "op": "explode"}).encode()], Code.UNKNOWN_OP),
        ([json.dumps({"v": 2, "id": "a", "op": "health", "extra": 1}).encode()], Code.BAD_REQUEST),
        ([build_header("a", "health"), b"surplus"], Code.BAD_REQUEST),
    ],
)
def test_malformed_headers_have_typed_codes(frames, code):
    assert code_of(frames) == code


def test_segment_validation_codes():
    img = frame()
    spec, data = encode_image(img)
    hdr = {"image": spec, "query": "cup"}
    assert code_of([build_header("a", "segment", **hdr)]) == Code.BAD_REQUEST  # image frame missing
    assert code_of([build_header("a", "segment", **hdr), data, b"x"]) == Code.BAD_REQUEST  # surplus frame
    assert code_of([build_header("a", "segment", **hdr), data[:-1]]) == Code.INVALID_IMAGE  # byte count
    assert code_of([build_header("a", "segment", image=spec, query="  "), data]) == Code.INVALID_QUERY
    assert code_of([build_header("a", "segment", image=spec), data]) == Code.INVALID_QUERY
    bad_shape = dict(spec, shape=[24, 32, 4])
    assert code_of([build_header("a", "segment", image=bad_shape, query="q"), data]) == Code.INVALID_IMAGE
    bad_dtype = dict(spec, dtype="float32")
    assert code_of([build_header("a", "segment", image=bad_dtype, query="q"), data]) == Code.INVALID_IMAGE
    bad_fmt = dict(spec, format="bmp")
    assert code_of([build_header("a", "segment", image=bad_fmt, query="q"), data]) == Code.INVALID_IMAGE
    for opts, code in [({"mode": "turbo"}, Code.INVALID_ARGUMENT), ({"max_new_tokens": 0}, Code.INVALID_ARGUMENT),
                       ({"colour": "red"}, Code.INVALID_ARGUMENT), ({"latest_only": "yes"}, Code.INVALID_ARGUMENT),
                       ({"intrinsics": [0, 1, 2, 3]}, Code.INVALID_ARGUMENT)]:
        assert code_of(segment_frames(img, options=opts)) == code, opts
    assert code_of(segment_frames(img, timeout_ms=-5)) == Code.INVALID_ARGUMENT


def test_limits_give_too_large():
    img = frame(24, 32)
    assert code_of(segment_frames(img), Limits(max_side=16)) == Code.TOO_LARGE
    assert code_of(segment_frames(img), Limits(max_frame_bytes=1000)) == Code.TOO_LARGE
    assert code_of([b" " * 70_000], Limits()) == Code.TOO_LARGE
    # the encoded image's own header is checked before its pixels are decoded
    spec, data = encode_image(img, "png")
    spec.pop("shape")
    req = parse_request([build_header("a", "segment", image=spec, query="q"), data], Limits(max_side=16))
    with pytest.raises(ProtocolError) as info:
        req.image(Limits(max_side=16))
    assert info.value.code == Code.TOO_LARGE


def test_undecodable_and_mislabelled_images():
    img = frame()
    spec, data = encode_image(img, "jpeg")
    for payload in (data[: len(data) // 3], b"\xff\xd8\xff" + b"\x00" * 100):
        req = parse_request([build_header("a", "segment", image=spec, query="q"), payload])
        with pytest.raises(ProtocolError) as info:
            req.image(Limits())
        assert info.value.code == Code.INVALID_IMAGE
    _, png = encode_image(img, "png")
    with pytest.raises(ProtocolError, match="not JPEG"):
        decode_image(spec, png)
    with pytest.raises(ProtocolError, match="header says"):
        decode_image(dict(spec, shape=[10, 10, 3]), data)


def test_depth_frame_validation_and_metres():
    img = frame()
    dspec, ddata = encode_depth(np.full((24, 32), 1500, np.uint16))
    frames = segment_frames(img, depth=dspec) + [ddata]
    req = parse_request(frames)
    depth = req.depth((24, 32))
    assert depth.dtype == np.float32 and np.allclose(depth, 1.5)
    assert code_of(segment_frames(img, depth=dspec)) == Code.BAD_REQUEST  # depth frame missing
    assert code_of(segment_frames(img, depth=dspec) + [ddata[:-2]]) == Code.INVALID_IMAGE
    wrong = dict(dspec, shape=[12, 16])
    assert code_of(segment_frames(img, depth=wrong) + [ddata[: 12 * 16 * 2]]) == Code.INVALID_IMAGE
    assert code_of(segment_frames(img, depth=dict(dspec, dtype="int8")) + [ddata]) == Code.INVALID_IMAGE


def test_client_side_encoders_refuse_bad_arrays():
    with pytest.raises(InvalidImageError):
        encode_image(np.zeros((24, 32), np.uint8))
    with pytest.raises(InvalidArgumentError):
        encode_image(frame(), "gif")
    with pytest.raises(InvalidImageError):
        encode_depth(np.zeros((4, 4), np.int32))


def test_replies_and_error_mapping():
    frames = encode_reply("x", {"text": "hi"})
    assert parse_reply(frames) == {"v": PROTOCOL_VERSION, "id": "x", "ok": True, "result": {"text": "hi"}}
    err = parse_reply(encode_reply("x", error=ProtocolError(Code.QUEUE_FULL, "full")))
    assert err["ok"] is False and err["error"] == {"code": "queue_full", "message": "full",
                                                   "advice": "The vision model is busy; wait a moment and call again."}
    assert isinstance(error_from_reply({"code": "invalid_image", "message": "m"}), InvalidImageError)
    assert isinstance(error_from_reply({"code": "invalid_query", "message": "m"}), InvalidQueryError)
    assert isinstance(error_from_reply({"code": "queue_full", "message": "m"}), ServerBusyError)
    assert isinstance(error_from_reply({"code": "deadline_exceeded", "message": "m"}), DeadlineExceededError)
    assert isinstance(error_from_reply({"code": "superseded", "message": "m"}), SupersededError)
    other = error_from_reply({"code": "unknown_op", "message": "no such op"})
    assert type(other) is RemoteError and other.code == "unknown_op" and "no such op" in str(other)
    with pytest.raises(RemoteError):
        parse_reply([b"garbage"])


def test_the_public_names_keep_their_import_paths():
    """Users and docs import these from lisa_agent.serving.protocol / .client / .server (their homes moved when
    the modules were split by responsibility)."""
    from lisa_agent.serving import client, framing, protocol, server

    for name in ("PROTOCOL_VERSION", "Limits", "build_header", "encode_reply", "parse_reply"):
        assert getattr(protocol, name) is getattr(framing, name)
    assert protocol.Request.__module__ == protocol.parse_request.__module__ == "lisa_agent.serving.protocol"
    assert client.LisaClient.__name__ == "LisaClient" and client.AsyncLisaClient.__name__ == "AsyncLisaClient"
    assert server.LisaServer.__name__ == "LisaServer"


def test_bind_rule():
    for ep in ("tcp://127.0.0.1:5557", "tcp://localhost:5557", "tcp://[::1]:5557", "ipc:///tmp/lisa"):
        assert is_loopback_endpoint(ep), ep
        check_bind(ep, curve=False, insecure=False)
    for ep in ("tcp://0.0.0.0:5557", "tcp://*:5557", "tcp://192.168.1.5:5557", "tcp://eth0:5557"):
        assert not is_loopback_endpoint(ep), ep
        with pytest.raises(InvalidArgumentError, match="refusing to bind"):
            check_bind(ep, curve=False, insecure=False)
        check_bind(ep, curve=True, insecure=False)
        check_bind(ep, curve=False, insecure=True)
    with pytest.raises(InvalidArgumentError, match="must start with"):
        check_bind("udp://127.0.0.1:1", curve=False, insecure=False)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
header_dicts = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "2", None]),
        "id": st.one_of(st.text(max_size=8), st.integers(), st.none()),
        "op": st.sampled_from(["segment", "info", "health", "nope", ""]),
        "query": st.one_of(st.text(max_size=10), json_values),
        "image": st.one_of(json_values, st.fixed_dictionaries(
            {"format": st.sampled_from(["raw", "jpeg", "png", "gif"]),
             "shape": st.lists(st.integers(-2, 40), max_size=4), "dtype": st.sampled_from(["uint8", "uint16"])})),
        "options": json_values,
        "timeout_ms": json_values,
        "depth": json_values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=header_dicts, extra=st.lists(st.binary(max_size=600), max_size=3))
def test_fuzz_parse_request_accepts_or_raises_a_typed_error(header, extra):
    frames = [json.dumps(header).encode()] + extra
    try:
        req = parse_request(frames, Limits(max_side=64))
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES and str(exc)
        return
    if req.op == "segment":
        try:
            img = req.image(Limits(max_side=64))
        except ProtocolError as exc:
            assert exc.code in ERROR_CODES
            return
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
