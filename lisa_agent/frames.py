"""Validation of the one frame type the engine accepts: an HWC uint8 RGB numpy array."""

from __future__ import annotations

import numpy as np

from .errors import InvalidImageError, InvalidQueryError

#: Frames larger than this many pixels on a side are refused (a 16k x 16k frame is a mistake).
MAX_SIDE = 8192
#: Frames smaller than this on a side cannot be segmented meaningfully.
MIN_SIDE = 8


def check_image(image: object, *, max_side: int = MAX_SIDE) -> np.ndarray:
    """Return ``image`` as a C-contiguous HxWx3 uint8 RGB array, or raise :class:`InvalidImageError`.

    Accepts exactly HxWx3 ``uint8`` arrays (any strides). Refuses grayscale (HxW), RGBA (HxWx4),
    float images, empty arrays and frames with a side outside ``[MIN_SIDE, max_side]``: each with a
    message that names the problem and how to convert.
    """
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(
            f"image must be a numpy array of shape HxWx3, dtype uint8 (RGB); got {type(image).__name__}"
        )
    if image.size == 0:
        raise InvalidImageError(f"image is empty (shape {tuple(image.shape)})")
    if image.ndim == 2:
        raise InvalidImageError(
            f"image has shape {tuple(image.shape)} (grayscale HxW); expected HxWx3 RGB: "
            "use np.repeat(image[..., None], 3, axis=2)"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " (RGBA? drop alpha with image[..., :3])" if image.ndim == 3 and image.shape[2] == 4 else ""
        raise InvalidImageError(f"image has shape {tuple(image.shape)}; expected HxWx3 RGB{hint}")
    if image.dtype != np.uint8:
        raise InvalidImageError(
            f"image has dtype {image.dtype}; expected uint8 in [0, 255] "
            "(for float images in [0, 1] use (image * 255).round().astype(np.uint8))"
        )
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise InvalidImageError(f"image is {h}x{w}; each side must be at least {MIN_SIDE} pixels")
    if max(h, w) > max_side:
        raise InvalidImageError(f"image is {h}x{w}; each side must be at most {max_side} pixels")
    return np.ascontiguousarray(image)


def check_query(query: object) -> str:
    """Return the stripped query, or raise :class:`InvalidQueryError` if it is not a non-empty string."""
    if not isinstance(query, str):
        raise InvalidQueryError(f"query must be a string; got {type(query).__name__}")
    text = query.strip()
    if not text:
        raise InvalidQueryError("query is empty: say what to segment, e.g. 'something to cut with'")
    return text
