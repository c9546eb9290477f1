"""Arguments and helpers shared by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import engine_config_from_args
from ..errors import InvalidImageError

if TYPE_CHECKING:  # pragma: no cover
    from ..segmenter import LisaSegmenter


def load_segmenter(args: argparse.Namespace, **overrides: Any) -> LisaSegmenter:
    """The engine named by the flags :func:`~lisa_agent.config.add_engine_arguments` added (``overrides``
    replace fields, e.g. a command that needs the presence gate off)."""
    from ..segmenter import LisaSegmenter

    return LisaSegmenter.from_config(engine_config_from_args(args, **overrides))


def read_image(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB; raises InvalidImageError naming the file when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise InvalidImageError(f"image file {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidImageError(f"cannot read {str(path)!r} as an image: {exc}") from None


def write_image(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
