"""Load the image an agent names (file path, http(s) URL or data URI) into an HxWx3 uint8 RGB array.

This is the edge where strings chosen by a language model become frames, so every failure is an
:class:`~lisa_agent.errors.InvalidImageError` whose message says what was wrong and what to pass
instead. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from ..errors import InvalidImageError
from ..frames import MAX_SIDE, check_image

#: Largest encoded image accepted from a URL, a data URI or a file (bytes).
MAX_IMAGE_BYTES = 32 * 1024 * 1024

_HINT = "pass a readable image file path, an http(s) URL or a data URI (data:image/png;base64,...)"


def load_image(
    source: str,
    *,
    timeout: float = 10.0,
    max_bytes: int = MAX_IMAGE_BYTES,
    allow_files: bool = True,
    allow_urls: bool = True,
) -> np.ndarray:
    """Read ``source`` and return it as a C-contiguous HxWx3 uint8 RGB array.

    Args:
        source: a local file path (``~`` expanded, ``file://`` URLs accepted), an ``http://`` or
            ``https://`` URL, or a ``data:image/...;base64,...`` URI. Any format Pillow decodes
            (PNG, JPEG, WebP, BMP, TIFF, ...); grayscale, palette and RGBA images are converted to
            RGB (alpha dropped) and the EXIF orientation is applied.
        timeout: seconds to wait for a URL.
        max_bytes: largest encoded size accepted.
        allow_files: read local files (turn off when the caller must not reach the file system).
        allow_urls: fetch http(s) URLs (turn off when the caller must not reach the network).

    Raises:
        InvalidImageError: unreadable, missing, too large, not an image, or a scheme not allowed.
    """
    if not isinstance(source, str) or not source.strip():
        raise InvalidImageError(f"image reference is empty: {_HINT}")
    ref = source.strip()
    lowered = ref[:16].lower()
    if lowered.startswith("data:"):
        data = _read_data_uri(ref, max_bytes)
        label = "the data URI"
    elif lowered.startswith(("http://", "https://")):
        if not allow_urls:
            raise InvalidImageError("fetching image URLs is disabled for this tool; pass a local file path or a "
                                    "data URI, or omit the image to use the camera frame")
        data = _read_url(ref, timeout, max_bytes)
        label = f"the image at {_short(ref)}"
    else:
        if lowered.startswith("file://"):
            ref = urllib.parse.unquote(urllib.parse.urlparse(ref).path)
        elif "://" in ref[:12]:
            scheme = ref.split("://", 1)[0]
            raise InvalidImageError(f"unsupported image scheme {scheme!r} in {_short(ref)}: {_HINT}")
        if not allow_files:
            raise InvalidImageError("reading local image files is disabled for this tool; pass an http(s) URL "
                                    "or a data URI, or omit the image to use the camera frame")
        data = _read_file(ref, max_bytes)
        label = f"the file {_short(ref)}"
    return decode_image(data, label=label)


def decode_image(data: bytes, *, label: str = "the image") -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) into an HxWx3 uint8 RGB array.

    Raises:
        InvalidImageError: the bytes are not an image Pillow can read, or the frame is too large.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if max(w, h) > MAX_SIDE:
                raise InvalidImageError(
                    f"{label} is {h}x{w} pixels; each side must be at most {MAX_SIDE}: downscale it first")
            img = ImageOps.exif_transpose(img)
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except InvalidImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{label} is not a readable image ({exc}); {_HINT}") from exc
    return check_image(rgb)


def _read_file(path_text: str, max_bytes: int) -> bytes:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise InvalidImageError(f"image file {_short(path_text)} does not exist; {_HINT}")
    if not path.is_file():
        raise InvalidImageError(f"{_short(path_text)} is not a file; {_HINT}")
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidImageError(f"image file {_short(path_text)} is {size} bytes; the limit is {max_bytes}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"cannot read image file {_short(path_text)}: {exc.strerror or exc}") from exc


def _read_url(url: str, timeout: float, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "lisa-agent", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked)
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise InvalidImageError(f"fetching {_short(url)} failed: HTTP {exc.code} {exc.reason}; "
                                "check the URL or pass a local file instead") from exc
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InvalidImageError(f"cannot fetch {_short(url)}: {reason}; check the URL or pass a local file "
                                "instead") from exc
    if len(data) > max_bytes:
        raise InvalidImageError(f"the image at {_short(url)} is larger than {max_bytes} bytes")
    return data


def _read_data_uri(uri: str, max_bytes: int) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise InvalidImageError("malformed data URI (no comma): expected data:image/png;base64,<data>")
    media = header[5:].lower()
    if media and not media.startswith("image/"):
        raise InvalidImageError(f"data URI has media type {media.split(';')[0]!r}; expected an image/* type")
    if ";base64" not in media:
        raise InvalidImageError("data URI is not base64-encoded: expected data:image/png;base64,<data>")
    if len(payload) * 3 // 4 > max_bytes:
        raise InvalidImageError(f"data URI image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"data URI payload is not valid base64 ({exc})") from exc


def _short(text: str, limit: int = 120) -> str:
    """Quote a possibly long reference for an error message."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
