"""Shapes of the tabletop world: each category's silhouette as polygons, and polygons <-> masks.

- Shape primitives (:func:`_ellipse`, :func:`_rect`, :func:`_rounded_rect`, :func:`_band`,
  :func:`_arc_band`): N x 2 float outlines in local units.
- :data:`SILHOUETTES`: category name -> function returning its parts (:data:`Part`: an outline and a
  colour key; key ``"hole"`` erases), in local units (long side about 1, centred on the origin, long
  axis along x). :mod:`lisa_agent.data.tabletop` places, scales, rotates and draws them.
- :func:`fill_polygons` / :func:`mask_polygons`: pixel polygons to a mask exactly as LISA's ReasonSeg
  reader rasterises them, and a mask's outer outlines back to polygons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

# --------------------------------------------------------------------------------------------
# Silhouettes: each category is a list of parts in local units (long side about 1, centred)
# --------------------------------------------------------------------------------------------

Part = tuple[np.ndarray, str]  # (N x 2 float points (x, y), colour key); key "hole" erases


def _ellipse(cx: float, cy: float, rx: float, ry: float, rot: float = 0.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _rect(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _rounded_rect(x0: float, x1: float, y0: float, y1: float, r: float, n: int = 6) -> np.ndarray:
    pts = []
    for cx, cy, a0 in ((x1 - r, y0 + r, -90), (x1 - r, y1 - r, 0), (x0 + r, y1 - r, 90), (x0 + r, y0 + r, 180)):
        for a in np.linspace(a0, a0 + 90, n):
            pts.append((cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))))
    return np.array(pts)


def _band(p0: Sequence[float], p1: Sequence[float], w0: float, w1: float) -> np.ndarray:
    """Quadrilateral from p0 to p1, full width w0 at p0 and w1 at p1."""
    d = np.subtract(p1, p0).astype(np.float64)
    nrm = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-12)
    a, b = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    return np.array([a + nrm * w0 / 2, b + nrm * w1 / 2, b - nrm * w1 / 2, a - nrm * w0 / 2])


def _arc_band(cx: float, cy: float, r: float, a0: float, a1: float, w: float, n: int = 24) -> np.ndarray:
    t = np.radians(np.linspace(a0, a1, n))
    outer = np.stack([cx + (r + w / 2) * np.cos(t), cy + (r + w / 2) * np.sin(t)], 1)
    inner = np.stack([cx + (r - w / 2) * np.cos(t), cy + (r - w / 2) * np.sin(t)], 1)[::-1]
    return np.concatenate([outer, inner])


def _knife() -> list[Part]:
    blade = np.array([(-0.09, -0.05), (0.30, -0.05), (0.42, -0.045), (0.5, -0.035), (0.45, 0.0), (0.37, 0.04),
                      (0.26, 0.064), (0.12, 0.075), (-0.09, 0.075)])
    return [(_rounded_rect(-0.5, -0.11, -0.045, 0.045, 0.03), "main"), (_rect(-0.12, -0.085, -0.058, 0.058), "metal_dark"),
            (blade, "metal"), (_ellipse(-0.38, 0, 0.014, 0.014), "metal"), (_ellipse(-0.22, 0, 0.014, 0.014), "metal")]


def _scissors() -> list[Part]:
    parts: list[Part] = []
    for sy in (-1, 1):
        parts.append((_band((-0.24, 0.11 * sy), (0.0, 0.0), 0.08, 0.055), "main"))
    for sy in (-1, 1):
        parts.append((_ellipse(-0.34, 0.14 * sy, 0.16, 0.115), "main"))
        parts.append((_ellipse(-0.345, 0.14 * sy, 0.095, 0.062), "hole"))
    for sy in (1, -1):
        parts.append((_band((-0.05, -0.012 * sy), (0.5, 0.07 * sy), 0.07, 0.012), "metal"))
    parts.append((_ellipse(0.0, 0.0, 0.026, 0.026), "metal_dark"))
    return parts


def _mug() -> list[Part]:
    return [(_ellipse(0.22, 0.0, 0.24, 0.25), "main"), (_ellipse(0.23, 0.0, 0.145, 0.15), "hole"),
            (_rounded_rect(-0.3, 0.24, -0.4, 0.42, 0.05), "main"), (_ellipse(-0.03, -0.38, 0.29, 0.06), "inner"),
            (_ellipse(-0.03, -0.375, 0.24, 0.035), "dark")]


def _bottle() -> list[Part]:
    return [(_rounded_rect(-0.5, 0.19, -0.16, 0.16, 0.05), "main"),
            (np.array([(0.17, -0.16), (0.3, -0.06), (0.3, 0.06), (0.17, 0.16)]), "main"),
            (_rect(0.29, 0.42, -0.055, 0.055), "main"), (_rect(0.41, 0.5, -0.07, 0.07), "second"),
            (_rect(-0.36, 0.04, -0.16, 0.16), "label")]


def _apple() -> list[Part]:
    # polar outline: notch at the top where the stem sits, a little narrower towards the bottom
    t = np.linspace(-math.pi, math.pi, 72, endpoint=False)  # 0 = up
    r = 0.37 * (1 - 0.3 * np.exp(-(t / 0.32) ** 2)) * (1 - 0.1 * np.cos(t - math.pi) ** 2 * (np.abs(t) > 2))
    r *= 1 + 0.06 * np.cos(2 * t)
    body = np.stack([r * np.sin(t), -r * np.cos(t) * 0.92 + 0.04], axis=1)
    return [(body, "main"), (_band((0.0, -0.2), (0.06, -0.47), 0.055, 0.04), "stem"),
            (_ellipse(0.17, -0.4, 0.15, 0.06, rot=-0.5), "leaf"), (_ellipse(-0.15, -0.05, 0.07, 0.11), "highlight")]


def _banana() -> list[Part]:
    s = np.linspace(0.0, 1.0, 40)
    t = np.radians(-90 - 38 + 76 * s)
    r, cy = 0.75, 0.68
    w = 0.14 * np.sin(math.pi * s) ** 0.6 + 0.016
    d = np.stack([np.cos(t), np.sin(t)], 1)
    c = np.array([0.0, cy])
    outer, inner = c + d * (r + w / 2)[:, None], c + d * (r - w / 2)[:, None]
    body = np.concatenate([outer, inner[::-1]])
    end, tang = c + d[-1] * r, np.array([-math.sin(t[-1]), math.cos(t[-1])])
    start = c + d[0] * r
    return [(body, "main"), (_band(end, end + tang * 0.08, 0.035, 0.03), "stem"),
            (_ellipse(start[0], start[1], 0.02, 0.02), "dark")]


def _ball() -> list[Part]:
    return [(_ellipse(0, 0, 0.5, 0.5, n=64), "main"), (_arc_band(-0.62, 0.0, 0.5, -42, 42, 0.04), "second"),
            (_arc_band(0.62, 0.0, 0.5, 138, 222, 0.04), "second"), (_ellipse(-0.17, -0.2, 0.1, 0.07, rot=0.6), "highlight")]


def _book() -> list[Part]:
    return [(_rect(-0.5, 0.5, -0.35, 0.35), "white"), (_rect(-0.5, 0.47, -0.35, 0.32), "main"),
            (_rect(-0.5, -0.41, -0.35, 0.32), "dark"), (_rect(-0.22, 0.3, -0.2, -0.06), "label")]


def _key() -> list[Part]:
    teeth = np.array([(0.18, 0.04), (0.18, 0.13), (0.24, 0.13), (0.27, 0.08), (0.31, 0.13), (0.36, 0.13),
                      (0.39, 0.08), (0.43, 0.12), (0.47, 0.12), (0.5, 0.04)])
    return [(_ellipse(-0.33, 0.0, 0.17, 0.17), "main"), (_ellipse(-0.37, 0.0, 0.07, 0.07), "hole"),
            (_rect(-0.18, 0.5, -0.045, 0.045), "main"), (teeth, "main"), (_rect(-0.1, 0.45, -0.012, 0.012), "dark")]


def _pen() -> list[Part]:
    tip = np.array([(0.33, -0.032), (0.47, -0.008), (0.5, 0.0), (0.47, 0.008), (0.33, 0.032)])
    return [(_rect(-0.5, 0.34, -0.035, 0.035), "main"), (_rect(0.2, 0.34, -0.039, 0.039), "dark"), (tip, "metal"),
            (_rect(-0.42, -0.12, -0.058, -0.03), "metal"), (_rect(-0.5, -0.46, -0.036, 0.036), "dark")]


def _hammer() -> list[Part]:
    # handle along x; head across it: a striking face on one side, a claw curving back on the other
    a = np.radians(np.linspace(0.0, 62.0, 12))
    w = np.linspace(0.12, 0.04, 12)
    d = np.stack([np.cos(a), np.sin(a)], axis=1)
    c, r = np.array([0.25, 0.1]), 0.15
    claw = np.concatenate([c + d * (r + w / 2)[:, None], (c + d * (r - w / 2)[:, None])[::-1]])
    return [(_rounded_rect(-0.5, 0.36, -0.045, 0.045, 0.03), "main"), (_rect(-0.5, -0.22, -0.052, 0.052), "dark"),
            (claw, "metal_dark"), (_rect(0.34, 0.46, -0.2, 0.11), "metal_dark"),
            (_rect(0.315, 0.485, -0.31, -0.19), "metal")]


def _spoon() -> list[Part]:
    return [(_band((-0.48, 0.0), (0.1, 0.0), 0.065, 0.035), "main"), (_ellipse(-0.48, 0, 0.033, 0.033), "main"),
            (_ellipse(0.29, 0.0, 0.21, 0.125), "main"), (_ellipse(0.3, 0.0, 0.16, 0.088), "inner")]


SILHOUETTES = {"knife": _knife, "scissors": _scissors, "mug": _mug, "bottle": _bottle, "apple": _apple,
               "banana": _banana, "ball": _ball, "book": _book, "key": _key, "pen": _pen, "hammer": _hammer,
               "spoon": _spoon}

# --------------------------------------------------------------------------------------------
# Polygons <-> masks (pixel coordinates, the ReasonSeg annotation format)
# --------------------------------------------------------------------------------------------


def fill_polygons(polygons: Sequence[np.ndarray | Sequence[Sequence[float]]], height: int, width: int,
                  value: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """Rasterise polygons as LISA's ReasonSeg reader does: points cast to int32, outline + fill.

    Returns an H x W uint8 array (``out`` if given) with ``value`` inside each polygon.
    """
    mask = np.zeros((height, width), dtype=np.uint8) if out is None else out
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).astype(np.int32).reshape(-1, 2)
        if len(pts) == 0:
            continue
        cv2.polylines(mask, [pts], True, value, 1)
        cv2.fillPoly(mask, [pts], value)
    return mask


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outer outlines of a bool H x W mask as K x 2 int32 (x, y) arrays (holes are not represented)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).astype(np.int32) for c in contours]
