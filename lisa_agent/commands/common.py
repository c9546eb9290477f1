"""Arguments and helpers shared by several commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import engine_config_from_args
from ..errors import InvalidArgumentError

if TYPE_CHECKING:  # pragma: no cover
    from ..backend import SegmentBackend
    from ..engine.segmenter import LisaSegmenter


def frame_size(text: str) -> tuple[int, int]:
    """``--size HxW`` (``480x640``) -> (H, W); argparse's error otherwise."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 480x640 (HxW); got {text!r}") from None
    return h, w


def port_number(text: str) -> int:
    """``--port`` -> a TCP port in [0, 65535] (0: any free port); argparse's error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a whole number; got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in [0, 65535]; got {value}")
    return value


def load_segmenter(args: argparse.Namespace, **overrides: Any) -> LisaSegmenter:
    """The engine named by the flags :func:`~lisa_agent.config.add_engine_arguments` added (``overrides``
    replace fields, e.g. a command that needs the presence gate off)."""
    from ..engine.segmenter import LisaSegmenter

    return LisaSegmenter.from_config(engine_config_from_args(args, **overrides))


def load_backend(args: argparse.Namespace, **overrides: Any) -> SegmentBackend:
    """The model named by the engine flags, whatever its kind (:func:`lisa_agent.backend.load_model`: LISA, or a
    reasoner checkpoint with SAM 2), for the commands that only ask it queries."""
    from ..backend import load_model

    return load_model(engine_config_from_args(args, **overrides))


def read_image(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB through the one decoder every door uses
    (:func:`lisa_agent.images.read_image_file`: header-first size check, 16-bit, EXIF orientation)."""
    from ..images import read_image_file

    return read_image_file(path)


def check_writable(path: str | Path | None, flag: str) -> None:
    """Refuse (before any model loads) an output ``path`` that cannot be written: its folder missing and not
    creatable, not writable, or the path itself a folder."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise InvalidArgumentError(f"{flag} {str(target)!r} is a folder; give a file name")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:  # the first existing ancestor must be writable
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{flag} {str(target)!r} cannot be written: {str(folder)!r} is not a writable folder")


def write_image(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
