"""Load the image an agent names (file path, http(s) URL or data URI) into an HxWx3 uint8 RGB array.

This is the edge where strings chosen by a language model become frames, so it reads only what it
was allowed to (:class:`ImageAccess`: no files and no URLs unless the builder of the tool lists folders
and hosts; data URIs carry their bytes and are always fine) and every failure is an
:class:`~lisa_agent.errors.InvalidImageError` whose message says what was wrong and what to pass
instead. A refused path is refused before it is looked at, so the model cannot probe which files
exist. Decoding is the library's one decoder (:func:`lisa_agent.images.decode_image_bytes`). Nothing
here imports torch.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageTooLargeError, InvalidImageError
from ..images import MAX_IMAGE_BYTES, decode_image_bytes, read_image_file

_HINT = "pass a data URI (data:image/png;base64,...), or leave the image out to use the camera frame"


@dataclass(frozen=True)
class ImageAccess:
    """What a caller may name as an image: files under ``folders``, URLs on ``hosts``; data URIs always.

    Attributes:
        folders: local folders (resolved, symlinks followed) whose files may be read; empty: no files.
        hosts: URL host names or addresses that may be fetched (every redirect hop too); ``"*"`` allows
            any host. Empty: no URLs. A host that resolves to a loopback, private, link-local or
            reserved address is refused unless it is listed as itself (``"127.0.0.1"``, ``"localhost"``,
            ``"192.168.1.10"``) or ``"*"`` is given: an allowed public name cannot be pointed at the robot's
            own network, and redirects to ``file:`` or elsewhere are never followed.
    """

    folders: tuple[Path, ...] = ()
    hosts: tuple[str, ...] = ()

    @classmethod
    def of(cls, folders: Iterable[str | Path] = (), hosts: Iterable[str] = ()) -> ImageAccess:
        return cls(folders=tuple(Path(f).expanduser().resolve() for f in folders),
                   hosts=tuple(h.strip().lower() for h in hosts if h.strip()))

    @classmethod
    def anything(cls) -> ImageAccess:
        """Every file and every URL: for references a person types, never for a language model's."""
        return cls(folders=(Path("/"),), hosts=("*",))

    def check_file(self, path: Path) -> Path:
        """``path`` resolved, if it lies in an allowed folder; else InvalidImageError (not saying whether it exists)."""
        if not self.folders:
            raise InvalidImageError("reading local image files is not enabled for this tool; " + _HINT)
        resolved = path.expanduser().resolve()
        if not any(resolved.is_relative_to(folder) for folder in self.folders):
            raise InvalidImageError(f"{_short(str(path))} is outside the folders this tool may read; " + _HINT)
        return resolved

    def check_url(self, url: str) -> None:
        """Refuse ``url`` unless it is http(s) to an allowed host (private addresses only when listed as such)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise InvalidImageError(f"{_short(url)}: only http(s) URLs are fetched; " + _HINT)
        if not self.hosts:
            raise InvalidImageError("fetching image URLs is not enabled for this tool; " + _HINT)
        host = (parts.hostname or "").lower()
        if "*" in self.hosts:
            return
        if host not in self.hosts:
            raise InvalidImageError(f"the host of {_short(url)} is not one this tool may fetch from; " + _HINT)
        if host == "localhost" or _is_address(host):
            return  # listed as itself: an explicit choice
        for address in _addresses(host, parts.port or (443 if parts.scheme == "https" else 80)):
            if _private(address):
                raise InvalidImageError(f"{host} resolves to the private address {address}; this tool may not "
                                        "fetch from it")


def load_image(source: str, *, access: ImageAccess | None = None, timeout: float = 10.0,
               max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
    """Read ``source`` and return it as a C-contiguous HxWx3 uint8 RGB array.

    Args:
        source: a local file path (``~`` expanded, ``file://`` URLs accepted), an ``http://`` or
            ``https://`` URL, or a ``data:image/...;base64,...`` URI. Any format Pillow decodes
            (PNG, JPEG, WebP, BMP, TIFF, ...); grayscale, 16-bit, palette and RGBA images are converted to
            RGB (alpha dropped) and the EXIF orientation is applied.
        access: what may be read (default: data URIs only; :meth:`ImageAccess.anything` for trusted input).
        timeout: seconds to wait for a URL.
        max_bytes: largest encoded size accepted.

    Raises:
        InvalidImageError: unreadable, missing, too large, not an image, or not allowed.
    """
    access = access or ImageAccess()
    if not isinstance(source, str) or not source.strip():
        raise InvalidImageError(f"image reference is empty: {_HINT}")
    ref = source.strip()
    lowered = ref[:16].lower()
    if lowered.startswith("data:"):
        data = _read_data_uri(ref, max_bytes)
        label = "the data URI"
    elif lowered.startswith(("http://", "https://")):
        access.check_url(ref)
        data = _read_url(ref, access, timeout, max_bytes)
        label = f"the image at {_short(ref)}"
    else:
        if lowered.startswith("file://"):
            ref = urllib.parse.unquote(urllib.parse.urlparse(ref).path)
        elif "://" in ref[:12]:
            scheme = ref.split("://", 1)[0]
            raise InvalidImageError(f"unsupported image scheme {scheme!r} in {_short(ref)}: {_HINT}")
        return read_image_file(access.check_file(Path(ref)), max_bytes=max_bytes, shown=ref, hint=_HINT)
    return decode_image_bytes(data, label=label)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to a URL the access rules allow (never to file:, never to an unlisted host)."""

    def __init__(self, access: ImageAccess) -> None:
        super().__init__()
        self.access = access

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        target = headers.get("location") or headers.get("uri")
        if target:
            newurl = urllib.parse.urljoin(req.full_url, target)
            try:
                self.access.check_url(newurl)
            except InvalidImageError as exc:
                raise InvalidImageError(f"{_short(req.full_url)} redirects to {_short(newurl)}, which is refused: "
                                        f"{exc}") from None
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _read_url(url: str, access: ImageAccess, timeout: float, max_bytes: int) -> bytes:
    opener = urllib.request.build_opener(_CheckedRedirects(access))
    request = urllib.request.Request(url, headers={"User-Agent": "lisa-agent", "Accept": "image/*"})
    try:
        with opener.open(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except InvalidImageError:
        raise
    except urllib.error.HTTPError as exc:
        raise InvalidImageError(f"fetching {_short(url)} failed: HTTP {exc.code} {exc.reason}; "
                                "check the URL or pass a data URI instead") from exc
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, InvalidImageError):
            raise reason from None
        raise InvalidImageError(f"cannot fetch {_short(url)}: {reason}; check the URL or pass a data URI "
                                "instead") from exc
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the image at {_short(url)} is larger than {max_bytes} bytes")
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
        raise ImageTooLargeError(f"data URI image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"data URI payload is not valid base64 ({exc})") from exc


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _addresses(host: str, port: int) -> list[str]:
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})
    except OSError as exc:
        raise InvalidImageError(f"cannot resolve {host}: {exc}") from None


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or \
        ip.is_unspecified


def _short(text: str, limit: int = 120) -> str:
    """Quote a possibly long reference for an error message."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
