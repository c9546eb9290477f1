"""The one image decoder (every door) and what a language model may make the tool read."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import serve_png
from PIL import Image

from lisa_agent.commands.common import read_image
from lisa_agent.errors import Code, ImageTooLargeError, InvalidImageError, ProtocolError
from lisa_agent.images import decode_image_bytes, read_image_file
from lisa_agent.integrations.image_messages import compressed_to_rgb
from lisa_agent.integrations.images import ImageAccess, load_image
from lisa_agent.serving.codecs import decode_image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _gray16() -> tuple[bytes, np.ndarray]:
    """A 16-bit grey PNG (a ramp over the whole range) and the 8-bit RGB frame it means (high byte)."""
    ramp = (np.arange(32 * 48, dtype=np.uint32).reshape(32, 48) * 43).astype(np.uint16)
    png = _png(Image.fromarray(ramp))
    expected = np.repeat((ramp >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    return png, expected


class _Msg:
    """A CompressedImage's fields (the conversions are duck-typed)."""

    def __init__(self, data: bytes, fmt: str = "png") -> None:
        self.data, self.format = data, fmt


def test_a_16_bit_grey_png_means_the_same_pixels_through_every_door(tmp_path):
    """Pillow's convert("RGB") made this frame all white in the CLI and the tool; the server was right."""
    png, expected = _gray16()
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    (tmp_path / "g16.png").write_bytes(png)
    doors = {
        "decoder": decode_image_bytes(png),
        "cli": read_image(tmp_path / "g16.png"),
        "tool": load_image(str(tmp_path / "g16.png"), access=ImageAccess.of([tmp_path])),
        "tool data URI": load_image("data:image/png;base64," + base64.b64encode(png).decode()),
        "server": decode_image({"format": "png"}, png),
        "ros compressed": compressed_to_rgb(_Msg(png)),
    }
    for door, image in doors.items():
        np.testing.assert_array_equal(image, expected, err_msg=door)
    assert expected.min() == 0 and expected.max() == 255  # the whole range, not clipped


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK"])
def test_grey_palette_alpha_and_cmyk_become_rgb(mode):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = (200, 40, 10)
    rgb[:, 15:] = (10, 90, 220)
    src = Image.fromarray(rgb).convert(mode)
    data = _png(src) if mode != "CMYK" else _jpeg(src)
    out = decode_image_bytes(data)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    expected = np.asarray(src.convert("RGB"))
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= (3 if mode == "CMYK" else 0)


def _jpeg(image: Image.Image, exif: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, **({"exif": exif} if exif else {}))
    return buf.getvalue()


def test_exif_orientation_is_applied_for_files_and_ignored_on_the_wire():
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _jpeg(Image.fromarray(rgb), exif.tobytes())
    upright = decode_image_bytes(data)
    assert upright.shape == (40, 20, 3) and upright[:20].mean() > 200 and upright[20:].mean() < 50
    as_stored = decode_image_bytes(data, exif=False)
    assert as_stored.shape == (20, 40, 3)
    np.testing.assert_array_equal(decode_image({"format": "jpeg"}, data), as_stored)


def test_an_oversized_image_is_refused_from_its_header_before_decoding(tmp_path):
    """A 10000 x 10000 PNG (300 MB of pixels, a few hundred KB of file) is refused without decoding it."""
    big = _png(Image.new("L", (10000, 10000)))
    assert len(big) < 2_000_000
    (tmp_path / "big.png").write_bytes(big)
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ImageTooLargeError, match="10000x10000 pixels; each side must be at most 8192"):
        read_image_file(tmp_path / "big.png")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20_000_000  # the file's bytes, not its pixels
    with pytest.raises(ProtocolError) as exc:
        decode_image({"format": "png"}, big)
    assert exc.value.code == Code.TOO_LARGE
    with pytest.raises(ImageTooLargeError, match="at most"):  # too_large through every reader
        compressed_to_rgb(_Msg(big), max_side=4096)


def test_garbage_is_an_invalid_image_naming_it():
    with pytest.raises(InvalidImageError, match="the file 'x.png' is not a readable image"):
        decode_image_bytes(b"\x89PNG\r\n\x1a\n garbage", label="the file 'x.png'")


# ----------------------------------------------------------------------------- what the tool may read


def test_by_default_the_tool_reads_no_files_and_no_urls_and_does_not_say_whether_a_file_exists(tmp_path):
    (tmp_path / "frame.png").write_bytes(_png(Image.new("RGB", (16, 16))))
    for ref in (str(tmp_path / "frame.png"), str(tmp_path / "missing.png"), "/etc/passwd"):
        with pytest.raises(InvalidImageError, match="reading local image files is not enabled") as exc:
            load_image(ref)
        assert "does not exist" not in str(exc.value)
    with pytest.raises(InvalidImageError, match="fetching image URLs is not enabled"):
        load_image("http://127.0.0.1:9/frame.png")
    # data URIs carry their own bytes: always fine
    uri = "data:image/png;base64," + base64.b64encode(_png(Image.new("RGB", (16, 16), (1, 2, 3)))).decode()
    assert load_image(uri)[0, 0].tolist() == [1, 2, 3]


def test_files_only_inside_the_allowed_folders_symlinks_resolved(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.png").write_bytes(_png(Image.new("RGB", (16, 16), (9, 9, 9))))
    (outside / "secret.png").write_bytes(_png(Image.new("RGB", (16, 16))))
    (allowed / "link.png").symlink_to(outside / "secret.png")
    access = ImageAccess.of([allowed])
    assert load_image(str(allowed / "ok.png"), access=access)[0, 0].tolist() == [9, 9, 9]
    for ref in (str(outside / "secret.png"), str(allowed / "link.png"), str(allowed / ".." / "outside" / "secret.png")):
        with pytest.raises(InvalidImageError, match="outside the folders this tool may read"):
            load_image(ref, access=access)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    """http://127.0.0.1:PORT serving /frame.png, and redirects /to-file and /to-other."""
    body = _png(Image.new("RGB", (16, 16), (5, 6, 7)))
    with serve_png(body, {"/to-file": "file:///etc/passwd", "/to-other": "http://example.invalid/frame.png",
                          "/to-self": "/frame.png"}) as url:
        yield url


def test_urls_only_on_allowed_hosts_and_redirects_stay_within_them(web):
    access = ImageAccess.of(hosts=["127.0.0.1"])
    assert load_image(f"{web}/frame.png", access=access)[0, 0].tolist() == [5, 6, 7]
    assert load_image(f"{web}/to-self", access=access)[0, 0].tolist() == [5, 6, 7]
    with pytest.raises(InvalidImageError, match="redirects to 'file:///etc/passwd', which is refused"):
        load_image(f"{web}/to-file", access=access)
    with pytest.raises(InvalidImageError, match="redirects to 'http://example.invalid/frame.png', which is refused"):
        load_image(f"{web}/to-other", access=access)
    with pytest.raises(InvalidImageError, match="not one this tool may fetch from"):
        load_image(f"{web}/frame.png", access=ImageAccess.of(hosts=["example.org"]))


def test_an_allowed_name_that_resolves_to_a_private_address_is_refused(monkeypatch):
    """An allowed public name whose DNS answer is a private address (rebinding) is refused before any
    request; listing the address itself allows it. DNS is replaced by a stand-in (no resolver here)."""
    import socket

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        assert host == "camera.example.org"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(InvalidImageError, match="camera.example.org resolves to the private address 10.0.0.5"):
        load_image("http://camera.example.org/frame.png", access=ImageAccess.of(hosts=["camera.example.org"]))
    with pytest.raises(InvalidImageError, match="not one this tool may fetch from"):
        load_image("http://10.0.0.6/frame.png", access=ImageAccess.of(hosts=["camera.example.org"]))
