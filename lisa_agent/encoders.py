"""Mask encoders used at the edges: COCO RLE, PNG bytes and an overlay image for people."""

from __future__ import annotations

import io
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

# Distinct, colour-blind friendly tints (RGB) for instance k.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
)


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode a bool HxW mask as uncompressed-size COCO RLE: ``{"size": [h, w], "counts": str}``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode a COCO RLE dict (``counts`` as str or bytes) into a bool HxW mask."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    coco = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(coco).astype(bool)


def label_image(masks: np.ndarray) -> np.ndarray:
    """Collapse N x H x W bool masks into an H x W uint8 label image (0 = background, k+1 = mask k)."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be N x H x W; got shape {masks.shape}")
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    for k, m in enumerate(masks[:255]):
        labels[m] = k + 1
    return labels


def image_to_png(image: np.ndarray) -> bytes:
    """Encode an HxW or HxWx3 uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def render_overlay(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: Sequence[Sequence[int]] | None = None,
    labels: Sequence[str] | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """Tint each mask over the frame, draw its outline, bbox and label; returns HxWx3 uint8 RGB.

    Args:
        image: HxWx3 uint8 RGB frame.
        masks: N x H x W bool masks (N may be 0: the frame is returned unchanged, copied).
        boxes: N boxes, XYXY pixel coordinates (inclusive); computed from the masks when omitted.
        labels: N short strings drawn above each box.
        alpha: tint opacity in [0, 1].
    """
    out = image.astype(np.float32).copy()
    n = 0 if masks is None else len(masks)
    for k in range(n):
        tint = np.array(PALETTE[k % len(PALETTE)], dtype=np.float32)
        m = masks[k]
        out[m] = out[m] * (1.0 - alpha) + tint * alpha
    canvas = np.clip(out, 0, 255).astype(np.uint8)
    for k in range(n):
        color = tuple(int(c) for c in PALETTE[k % len(PALETTE)])
        m = masks[k].astype(np.uint8)
        if not m.any():
            continue
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, color, 2)
        box = boxes[k] if boxes is not None else mask_bbox(masks[k])
        x1, y1, x2, y2 = (int(v) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 1)
        if labels is not None and k < len(labels) and labels[k]:
            text = str(labels[k])
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
            ty = max(y1 - 4, th + 2)
            cv2.rectangle(canvas, (x1, ty - th - 2), (x1 + tw + 2, ty + base - 2), color, -1)
            cv2.putText(canvas, text, (x1 + 1, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                        cv2.LINE_AA)
    return canvas


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box of a bool HxW mask, XYXY inclusive pixel coordinates; (0, 0, -1, -1) if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return (0, 0, -1, -1)
    return (int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1]))


def mask_centroid(mask: np.ndarray) -> tuple[float, float]:
    """Centroid (x, y) in pixels of a bool HxW mask; (nan, nan) if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (float("nan"), float("nan"))
    return (float(xs.mean()), float(ys.mean()))
