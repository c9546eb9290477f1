"""The one image decoder and encoder every door uses: encoded bytes or a file <-> HxWx3 uint8 RGB.

The command line (``--image``), the LangChain tool (files, URLs, data URIs), the model server (JPEG /
PNG frames) and the ROS ``CompressedImage`` path all decode through :func:`decode_image_bytes`, so an
image means the same pixels whichever door it comes through:

- the size is read from the file's header first and a frame over ``max_side`` is refused before a
  single pixel is decoded (a 10000x10000 PNG costs nothing);
- 16-bit images (grey or colour) keep their high byte (``v >> 8``), as OpenCV and image viewers do
  (Pillow's own ``convert("RGB")`` clips them to white);
- grey, palette, grey+alpha, RGBA and CMYK become RGB (alpha dropped);
- the EXIF orientation is applied (photos come out upright) unless ``exif=False`` (the server's wire
  format promises pixels exactly as the client encoded them).

Encoding (:func:`encode_image_bytes`, :func:`encode_jpeg`) is OpenCV's, for the server's client, the console,
ROS ``CompressedImage`` messages and the Foxglove view alike.

Errors are :class:`~lisa_agent.errors.InvalidImageError` naming the image, or
:class:`~lisa_agent.errors.ImageTooLargeError` (a subclass, code ``too_large``) for oversized ones.
Whether a frame is big enough to segment is the engine's question (:func:`lisa_agent.frames.check_image`).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np

from .errors import ImageTooLargeError, InvalidImageError
from .frames import MAX_SIDE

#: Largest encoded image file accepted (bytes).
MAX_IMAGE_BYTES = 64 * 1024 * 1024
_PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) a PNG's IHDR chunk declares (its first chunk, bytes 8..24), None when ``data`` is no PNG."""
    if len(data) >= 24 and data.startswith(_PNG) and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return h, w
    return None


def decode_image_bytes(data: bytes, *, max_side: int = MAX_SIDE, exif: bool = True,
                       label: str = "the image") -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, WebP, BMP, TIFF, GIF, ...) into C-contiguous HxWx3 uint8 RGB.

    Args:
        data: the file's bytes.
        max_side: largest height or width accepted, checked on the header before decoding.
        exif: apply the EXIF orientation.
        label: how error messages name the image ("the file 'x.png'").

    Raises:
        ImageTooLargeError: a side is over ``max_side``.
        InvalidImageError: not an image, truncated or corrupt.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    declared = _png_size(data)  # Pillow reads on to the first IDAT: a header alone would be "not an image"
    if declared is not None and max(declared) > max_side:
        raise ImageTooLargeError(f"{label} is {declared[0]}x{declared[1]} pixels; each side must be at most "
                                 f"{max_side}: downscale it first")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if max(w, h) > max_side:
                raise ImageTooLargeError(f"{label} is {h}x{w} pixels; each side must be at most {max_side}: "
                                         "downscale it first")
            if exif:
                img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except ImageTooLargeError:
        raise
    except UnidentifiedImageError:
        raise InvalidImageError(f"{label} is not a readable image (not a format Pillow knows)") from None
    except Image.DecompressionBombError as exc:  # a header claiming more pixels than Pillow opens at all
        raise ImageTooLargeError(f"{label} is too large: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"{label} is not a readable image ({exc})") from exc
    return np.ascontiguousarray(rgb)


def _to_rgb(img: object) -> np.ndarray:
    """A decoded PIL image as HxWx3 uint8 RGB (16-bit and float modes scaled, not clipped)."""
    from PIL import Image

    assert isinstance(img, Image.Image)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey (PNG, TIFF); "I" holds 16-bit PNGs in older Pillow releases: keep the high byte
        grey = np.asarray(img).astype(np.int64)
        grey = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode == "F":  # float grey: 0..1 or 0..255
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scale = 255.0 if grey.max(initial=0.0) <= 1.0 else 1.0
        grey = np.clip(np.round(grey * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image_file(path: str | Path, *, max_side: int = MAX_SIDE, max_bytes: int = MAX_IMAGE_BYTES,
                    exif: bool = True, shown: str | None = None, hint: str = "") -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (see :func:`decode_image_bytes`): the one file reader of every door.

    Errors name the file (as ``shown``, default the path) and end with ``hint`` when given; a file over
    ``max_bytes`` is :class:`~lisa_agent.errors.ImageTooLargeError` (``too_large``) before it is read.
    """
    path = Path(path).expanduser()
    name = _quote(str(path) if shown is None else shown)
    tail = f"; {hint}" if hint else ""
    if not path.exists():
        raise InvalidImageError(f"image file {name} does not exist{tail}")
    if not path.is_file():
        raise InvalidImageError(f"{name} is not a file{tail}")
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageTooLargeError(f"image file {name} is {size} bytes; the limit is {max_bytes}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"cannot read image file {name}: {exc.strerror or exc}") from exc
    return decode_image_bytes(data, max_side=max_side, exif=exif, label=f"the file {name}")


def _quote(text: str, limit: int = 120) -> str:
    """A possibly long reference, quoted for an error message."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


#: What :func:`encode_image_bytes` writes.
ENCODINGS = ("jpeg", "png")


def encode_image_bytes(rgb: np.ndarray, encoding: str = "jpeg", quality: int = 90) -> bytes:
    """HxWx3 uint8 RGB -> JPEG (``quality`` 1..100) or PNG (fast compression) bytes."""
    import cv2

    from .errors import InvalidArgumentError

    if encoding not in ENCODINGS:
        raise InvalidArgumentError(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r:.50}")
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or not rgb.size:
        raise InvalidImageError(f"only HxWx3 uint8 RGB images are encoded; got {getattr(rgb, 'shape', type(rgb))}")
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if encoding == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode(".jpg" if encoding == "jpeg" else ".png", bgr, params)
    if not ok:  # pragma: no cover - OpenCV encodes any valid uint8 RGB image
        raise InvalidImageError(f"OpenCV could not encode the image as {encoding}")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """HxWx3 uint8 RGB -> JPEG bytes (what the console streams and ROS ``CompressedImage`` messages carry)."""
    return encode_image_bytes(rgb, "jpeg", quality)
