"""The wire format's pixels: image and depth frames, and mask logits, to and from bytes.

Clients encode (:func:`encode_image`, :func:`encode_depth`); servers decode (:func:`decode_image`,
:func:`decode_depth`) after :func:`~lisa_agent.serving.protocol.parse_request` has checked the header. JPEG and
PNG go through the library's one image codec (:mod:`lisa_agent.images`), depth through its one depth rule
(:func:`lisa_agent.geometry.depth_to_meters`). Pure numpy (+ OpenCV / Pillow through :mod:`lisa_agent.images`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import Code, InvalidArgumentError, LisaError, ProtocolError, RemoteError
from ..frames import DEPTH_TOLERANCE_S, MAX_SIDE, Stamp, check_image
from ..geometry import check_depth, depth_to_meters
from ..images import decode_image_bytes, encode_image_bytes

#: Image frame formats: raw HxWx3 uint8 RGB pixels, or a JPEG / PNG file.
IMAGE_FORMATS = ("raw", "jpeg", "png")
DEPTH_DTYPES: dict[str, np.dtype[Any]] = {"uint16": np.dtype("<u2"), "float32": np.dtype("<f4")}
#: metres per depth unit when the header gives no ``scale``: uint16 depth is millimetres, float32 metres.
DEFAULT_DEPTH_SCALE = {"uint16": 0.001, "float32": 1.0}

_MAGIC = {"jpeg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",)}


def decode_image(spec: dict[str, Any], data: bytes, max_side: int = MAX_SIDE) -> np.ndarray:
    """Server side: an image frame as a writable HxWx3 uint8 RGB array.

    JPEG / PNG go through the one decoder every door uses (:func:`lisa_agent.images.decode_image_bytes`):
    the size is read from the file header and checked against ``max_side`` before any pixel is decoded (a
    decompression bomb costs nothing); 16-bit and grey images are converted as everywhere; EXIF orientation
    is ignored so pixels arrive exactly as the client encoded them.
    """
    fmt = spec["format"]
    if fmt == "raw":
        h, w, c = spec["shape"]
        return np.frombuffer(data, dtype=np.uint8).reshape(h, w, c).copy()  # writable, owned by the caller
    if not data.startswith(_MAGIC[fmt]):
        raise ProtocolError(Code.INVALID_IMAGE, f"image.format is {fmt!r} but the frame is not {fmt.upper()} data "
                                                f"(starts with {data[:8]!r})")
    try:
        image = decode_image_bytes(data, max_side=max_side, exif=False, label=f"the {fmt.upper()} image")
    except LisaError as exc:  # too_large or invalid_image, with the decoder's message
        raise ProtocolError(exc.code, str(exc)) from None
    if "shape" in spec and list(image.shape) != spec["shape"]:
        raise ProtocolError(Code.INVALID_IMAGE, f"decoded {fmt.upper()} image has shape {list(image.shape)}; the "
                                                f"header says {spec['shape']}")
    return image


def decode_depth(spec: dict[str, Any], data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Server side: a depth frame as HxW float32 metres, NaN where invalid (the library's depth rule).
    Raises ``invalid_image`` when it does not match ``shape``."""
    dshape = tuple(spec["shape"])
    if dshape != tuple(shape):
        raise ProtocolError(Code.INVALID_IMAGE, f"depth shape {list(dshape)} does not match the image's {list(shape)}")
    raw = np.frombuffer(data, dtype=DEPTH_DTYPES[spec["dtype"]]).reshape(dshape)
    return depth_to_meters(raw, float(spec["scale"]))


def encode_image(image: np.ndarray, encoding: str = "raw", quality: int = 90) -> tuple[dict[str, Any], bytes]:
    """Client side: (image spec for the header, image frame bytes) for an HxWx3 uint8 RGB array."""
    image = check_image(image)
    shape = [int(v) for v in image.shape]
    if encoding == "raw":
        return {"format": "raw", "shape": shape, "dtype": "uint8"}, image.tobytes()
    if encoding not in IMAGE_FORMATS:
        raise InvalidArgumentError(f"encoding must be one of {list(IMAGE_FORMATS)}; got {encoding!r}")
    return {"format": encoding, "shape": shape, "dtype": "uint8"}, encode_image_bytes(image, encoding, quality)


def encode_depth(depth: np.ndarray, scale: float | None = None, *, stamp: Stamp | None = None,
                 tolerance_s: float = DEPTH_TOLERANCE_S) -> tuple[dict[str, Any], bytes]:
    """Client side: (depth spec, bytes) for an HxW uint16 (default mm) or float32 (default m) array,
    with the depth's ``stamp`` and the colour/depth ``tolerance_s`` (see :class:`~lisa_agent.frames.Frame`)."""
    depth = check_depth(depth)
    dtype = "uint16" if depth.dtype == np.uint16 else "float32"
    arr = np.ascontiguousarray(depth, dtype=DEPTH_DTYPES[dtype])
    spec = {"shape": [int(v) for v in depth.shape], "dtype": dtype,
            "scale": float(DEFAULT_DEPTH_SCALE[dtype] if scale is None else scale),
            "stamp": None if stamp is None else stamp.to_dict(), "tolerance_s": float(tolerance_s)}
    return spec, arr.tobytes()


def logits_frames(result: Any) -> tuple[dict[str, Any] | None, list[bytes]]:
    """Server side: (descriptor, frames) carrying ``result.logits`` (N x H x W float32) if present."""
    logits = getattr(result, "logits", None)
    if logits is None:
        return None, []
    arr = np.ascontiguousarray(np.asarray(logits, dtype="<f4"))
    return {"shape": [int(v) for v in arr.shape], "dtype": "float32", "frame": 1}, [arr.tobytes()]


def logits_from_frames(desc: dict[str, Any], frames: list[bytes]) -> np.ndarray:
    """Client side: inverse of :func:`logits_frames` (``frames`` = the reply frames, header first)."""
    k = int(desc.get("frame", 1))
    if k >= len(frames):
        raise RemoteError(Code.INTERNAL, "reply announces logits but the frame is missing")
    shape = tuple(int(v) for v in desc["shape"])
    return np.frombuffer(frames[k], dtype="<f4").reshape(shape).copy()
