"""COCO segmentations <-> masks: LISA's decoding of an annotation, and exact encodings to write one.

A COCO annotation's ``segmentation`` is either polygons (``[[x1, y1, x2, y2, ...], ...]``, RefCOCO,
RefCOCO+, RefCOCOg) or run-length encoding (refclef: a list of ``{"size": [h, w], "counts": str}``).
:func:`decode_segmentation` reads both as LISA's referring readers do (``pycocotools``: polygons through
``frPyObjects``, every part decoded, the parts *summed* into one uint8 map). :func:`mask_to_polygons`
and :func:`mask_to_segmentation` write a mask so that this decoding gives it back pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DatasetError

#: Segmentation encodings :func:`mask_to_segmentation` writes.
SEGMENTATION_FORMATS = ("polygon", "rle")


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """An annotation's ``segmentation`` as LISA reads it: H x W uint8.

    Polygons and RLE parts are decoded with pycocotools and summed (LISA's ``np.sum(m, axis=2)``), so a
    pixel that two parts of one annotation cover holds 2; LISA's scoring counts only 1 as the target
    (see :mod:`lisa_agent.evaluation.metrics`), and this map keeps that. An empty segmentation is an
    empty mask. Accepted: a list of polygons (flat coordinate lists), a list of RLE dicts (``counts`` str,
    bytes, or an uncompressed list) or one RLE dict (LISA's code reads only the list forms).
    """
    from pycocotools import mask as mask_utils

    h, w = int(height), int(width)
    if isinstance(segmentation, dict):
        segmentation = [segmentation]
    if not isinstance(segmentation, list | tuple):
        raise DatasetError(f"segmentation must be a list or an RLE dict, got {type(segmentation).__name__}")
    if len(segmentation) == 0:
        return np.zeros((h, w), np.uint8)
    if all(isinstance(p, list | tuple) for p in segmentation):
        polygons = [[float(v) for v in p] for p in segmentation]
        if any(len(p) < 6 or len(p) % 2 for p in polygons):
            raise DatasetError("a polygon needs an even number (at least 6) of coordinates")
        rles = mask_utils.frPyObjects(polygons, h, w)
    elif all(isinstance(p, dict) for p in segmentation):
        rles = [_rle(p, h, w) for p in segmentation]
    else:
        raise DatasetError("segmentation mixes polygons and RLE, or holds neither")
    parts = mask_utils.decode(rles)  # H x W x K uint8
    return np.ascontiguousarray(parts.sum(axis=2), dtype=np.uint8)


def _rle(part: dict, h: int, w: int) -> dict:
    from pycocotools import mask as mask_utils

    try:
        size, counts = [int(v) for v in part["size"]], part["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"an RLE part needs 'size' [h, w] and 'counts' ({exc!r})") from exc
    if size != [h, w]:
        raise DatasetError(f"RLE size {size} differs from the image's {[h, w]}")
    if isinstance(counts, list):  # uncompressed (COCO's iscrowd form)
        return mask_utils.frPyObjects({"size": size, "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise DatasetError(f"RLE counts must be a string or a list, got {type(counts).__name__}")
    return {"size": size, "counts": counts}


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outlines of a bool H x W mask along pixel edges, as COCO polygons (flat ``[x1, y1, ...]`` lists).

    Vertices sit on pixel corners (pixel (r, c) spans x in [c, c + 1], y in [r, r + 1]), one polygon per
    8-connected region, collinear vertices dropped, so pycocotools' rasteriser gives the mask back
    exactly when the mask has no holes (the tabletop world's masks have none; a hole would be filled).
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    # Directed boundary edges with the region on the right (image coordinates, y down), keyed by start vertex.
    nxt: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(a: tuple[int, int], b: tuple[int, int]) -> None:
        nxt.setdefault(a, []).append(b)

    inner = m[1:-1, 1:-1]
    for dr, dc, edge in ((-1, 0, "top"), (0, 1, "right"), (1, 0, "bottom"), (0, -1, "left")):
        neighbour = m[1 + dr: m.shape[0] - 1 + dr, 1 + dc: m.shape[1] - 1 + dc]
        rows, cols = np.nonzero(inner & ~neighbour)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if edge == "top":
                add((c, r), (c + 1, r))
            elif edge == "right":
                add((c + 1, r), (c + 1, r + 1))
            elif edge == "bottom":
                add((c + 1, r + 1), (c, r + 1))
            else:
                add((c, r + 1), (c, r))
    polygons = []
    while nxt:
        start = min(nxt)  # top-left-most vertex: starts an outer outline
        loop = [start]
        prev, cur = start, _take(nxt, start, None)
        while cur != start:
            loop.append(cur)
            prev, cur = cur, _take(nxt, cur, (cur[0] - prev[0], cur[1] - prev[1]))
        polygons.append(_corners(loop))
    return [[float(v) for xy in poly for v in xy] for poly in polygons]


def _take(nxt: dict[tuple[int, int], list[tuple[int, int]]], at: tuple[int, int],
          heading: tuple[int, int] | None) -> tuple[int, int]:
    """Leave vertex ``at``; where two outlines touch at a corner, turn left (keeps diagonal pixels together)."""
    options = nxt[at]
    if len(options) == 1 or heading is None:
        choice = options[0]
    else:
        left = (heading[1], -heading[0])  # a left turn in y-down coordinates
        choice = next((o for o in options if (o[0] - at[0], o[1] - at[1]) == left), options[0])
    options.remove(choice)
    if not options:
        del nxt[at]
    return choice


def _corners(loop: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    n = len(loop)
    keep = []
    for k in range(n):
        a, b, c = loop[k - 1], loop[k], loop[(k + 1) % n]
        if (b[0] - a[0], b[1] - a[1]) != (c[0] - b[0], c[1] - b[1]):
            keep.append(b)
    return keep


def mask_to_segmentation(mask: np.ndarray, fmt: str = "polygon") -> list:
    """A COCO ``segmentation`` that :func:`decode_segmentation` turns back into exactly ``mask``.

    ``fmt``: ``"polygon"`` (pixel-edge outlines, RefCOCO's form) or ``"rle"`` (a one-element list of
    compressed RLE with string counts, refclef's form). Raises ValueError when polygons cannot carry the
    mask exactly (it has holes).
    """
    from ..encoders import mask_to_rle

    if fmt not in SEGMENTATION_FORMATS:
        raise ValueError(f"segmentation format must be one of {SEGMENTATION_FORMATS}; got {fmt!r}")
    mask = np.asarray(mask, dtype=bool)
    if fmt == "rle":
        return [mask_to_rle(mask)]
    polygons = mask_to_polygons(mask)
    if not np.array_equal(decode_segmentation(polygons, *mask.shape), mask.astype(np.uint8)):
        raise ValueError("the mask has holes: COCO polygons cannot carry it exactly (write RLE)")
    return polygons
