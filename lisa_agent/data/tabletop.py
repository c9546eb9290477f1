"""A synthetic tabletop world: scenes drawn with OpenCV, deterministic from a seed.

A scene holds 3-6 everyday objects (knife, scissors, mug, bottle, apple, banana, ball, book, key,
pen, hammer, spoon) seen from above on a table. Each category has its own silhouette (a knife is a
handle and a long tapered blade, scissors two finger rings and crossed blades, a mug a body with a
handle ring, a hammer a T, a banana a crescent, a key a ring and a toothed shaft, ...); sizes,
positions, rotations, colours, table surface, lighting, shadows and noise vary with the seed.
Objects may overlap, but each stays mostly visible (at least ``MIN_VISIBLE`` of its area) and its
visible region has no holes, so one or a few polygons describe it exactly (the ReasonSeg format
has no holes). An object's mask is its visible silhouette with enclosed holes (a mug's handle
ring, a key's ring) filled, as a person drawing a polygon would annotate it.

This module is the renderer: :func:`render_scene` draws a :class:`Scene`, :func:`split_seed` gives
each split its own seeds. It draws from :mod:`~lisa_agent.data.knowledge` (:data:`CATEGORIES`,
:data:`COLOURS`, :data:`AFFORDANCES`) and :mod:`~lisa_agent.data.silhouettes` (:data:`SILHOUETTES`,
:func:`fill_polygons`, :func:`mask_polygons`), whose names it re-exports.
:mod:`lisa_agent.data.queries` turns a scene into LISA training / evaluation queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from .knowledge import AFFORDANCES, CATEGORIES, COLOURS, Affordance, Category
from .silhouettes import SILHOUETTES, Part, fill_polygons, mask_polygons

__all__ = [  # the renderer, then names re-exported from .knowledge and .silhouettes
    "DEFAULT_SIZES", "MIN_VISIBLE", "SPLIT_OFFSETS", "SPLIT_SPAN", "Scene", "SceneObject", "render_scene",
    "split_seed", "AFFORDANCES", "CATEGORIES", "COLOURS", "Affordance", "Category", "SILHOUETTES", "Part",
    "fill_polygons", "mask_polygons",
]

#: Frame sizes (H, W) a scene is drawn at when none is given.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((480, 640), (640, 480), (512, 512))
#: Fraction of an object's own area that must stay visible after later objects cover it.
MIN_VISIBLE = 0.7
#: Fixed-point bits for sub-pixel polygon drawing (cv2 ``shift``).
_SHIFT = 4

# Scene backgrounds: name -> base RGB of the table surface.
_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light wood": (196, 158, 110), "dark wood": (112, 78, 50), "grey table": (150, 150, 152),
    "white table": (222, 220, 212), "green cloth": (72, 112, 82), "blue cloth": (74, 92, 132), "beige": (204, 188, 160),
}

# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


@dataclass
class SceneObject:
    """One object of a scene.

    Attributes:
        index: position in ``Scene.objects`` (also the drawing order: later objects lie on top).
        category: category name (a key of :data:`CATEGORIES`).
        colour: main colour name (a key of :data:`COLOURS`).
        mask: H x W bool visible silhouette (after occlusion by later objects, holes filled).
        polygons: outlines of ``mask``, each a K x 2 int32 array of (x, y) pixel coordinates; filling
            them as LISA's ReasonSeg reader does reproduces ``mask`` exactly.
        bbox: XYXY inclusive box of ``mask``.
        full_area: pixels of the whole silhouette before occlusion.
        center: (x, y) of the object's origin in pixels; angle: rotation in degrees; length: long
            side in pixels.
    """

    index: int
    category: str
    colour: str
    mask: np.ndarray
    polygons: list[np.ndarray]
    bbox: tuple[int, int, int, int]
    full_area: int
    center: tuple[float, float]
    angle: float
    length: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def visible_fraction(self) -> float:
        return self.area / max(self.full_area, 1)

    def name(self) -> str:
        """``"red mug"``."""
        return f"{self.colour} {self.category}"


@dataclass
class Scene:
    """A rendered tabletop scene.

    Attributes:
        seed: the seed it was drawn from (same seed, size and n_objects -> identical scene).
        image: H x W x 3 uint8 RGB.
        objects: the objects, in drawing order.
        background: name of the table surface.
    """

    seed: int
    image: np.ndarray
    objects: list[SceneObject]
    background: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return (int(self.image.shape[0]), int(self.image.shape[1]))

    @property
    def masks(self) -> np.ndarray:
        """N x H x W bool visible masks (N may be 0)."""
        if not self.objects:
            return np.zeros((0, *self.size), dtype=bool)
        return np.stack([o.mask for o in self.objects])


def _has_holes(mask: np.ndarray) -> bool:
    filled = fill_polygons(mask_polygons(mask), *mask.shape).astype(bool)
    return bool((filled & ~mask).any())


def _transform(points: np.ndarray, center: tuple[float, float], angle: float, length: float) -> np.ndarray:
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    p = points * length
    return np.stack([center[0] + c * p[:, 0] - s * p[:, 1], center[1] + s * p[:, 0] + c * p[:, 1]], axis=1)


def _draw_parts(parts: list[Part], center: tuple[float, float], angle: float, length: float,
                size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """H x W uint8 part-index canvas (0 nothing, k + 1 part key ``keys[k]``) of one object."""
    canvas = np.zeros(size, dtype=np.uint8)
    keys: list[str] = []
    for pts, key in parts:
        img_pts = np.round(_transform(pts, center, angle, length) * (1 << _SHIFT)).astype(np.int32)
        if key == "hole":
            value = 0
        else:
            if key not in keys:
                keys.append(key)
            value = keys.index(key) + 1
        cv2.fillPoly(canvas, [img_pts.reshape(-1, 1, 2)], value, lineType=cv2.LINE_8, shift=_SHIFT)
    return canvas, keys


def _part_colours(category: str, colour: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    base = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 8, 3), 0, 255)
    others = [c for c in ("red", "blue", "green", "yellow", "white", "black", "orange") if c != colour]
    second = COLOURS[str(rng.choice(others))] if category == "bottle" else (
        (245, 245, 240) if colour not in ("white", "yellow") else (40, 40, 40))
    label = np.array(COLOURS[str(rng.choice(["white", "yellow", "pink", "silver"]))], np.float32)
    return {
        "main": base, "dark": base * 0.55, "inner": base * 0.72, "highlight": base * 0.55 + 110,
        "metal": np.array((196, 198, 204), np.float32), "metal_dark": np.array((110, 112, 118), np.float32),
        "white": np.array((240, 238, 228), np.float32), "stem": np.array((92, 60, 30), np.float32),
        "leaf": np.array((62, 142, 52), np.float32), "second": np.array(second, np.float32), "label": label * 0.95,
    }


def _background(size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, str]:
    h, w = size
    name = str(rng.choice(list(_BACKGROUNDS)))
    base = np.array(_BACKGROUNDS[name], np.float32) + rng.normal(0, 6, 3)
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if "wood" in name:
        a = rng.uniform(0, math.pi)
        u = (xx * math.cos(a) + yy * math.sin(a)) / max(h, w)
        v = (-xx * math.sin(a) + yy * math.cos(a)) / max(h, w)
        grain = np.sin(u * rng.uniform(40, 90) + 3.0 * np.sin(v * rng.uniform(3, 8)))
        img *= (1.0 + 0.07 * grain)[..., None]
    elif "cloth" in name:
        period = max(4.0, min(h, w) / rng.uniform(8, 20))
        check = ((xx // period + yy // period) % 2)
        img *= (1.0 - 0.06 * check)[..., None]
    return img, name


def _shade(canvas: np.ndarray, keys: list[str], colours: dict[str, np.ndarray], center: tuple[float, float],
           angle: float, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Colour layer (H x W x 3 float) and paint mask (H x W bool) of one object, with shading."""
    paint = canvas > 0
    lut = np.zeros((len(keys) + 1, 3), np.float32)
    for k, key in enumerate(keys):
        lut[k + 1] = colours[key]
    layer = lut[canvas]
    ys, xs = np.nonzero(paint)
    if len(xs):
        direction = math.radians(angle + rng.uniform(60, 120))
        t = ((xs - center[0]) * math.cos(direction) + (ys - center[1]) * math.sin(direction)) / max(length / 2, 1)
        layer[ys, xs] *= (1.0 + rng.uniform(0.08, 0.2) * np.clip(t, -1, 1))[:, None]
        edge = paint & ~cv2.erode(paint.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        layer[edge] *= 0.7
    return layer, paint


@dataclass
class _Placed:
    category: str
    colour: str
    fill: np.ndarray
    paint: np.ndarray
    layer: np.ndarray
    center: tuple[float, float]
    angle: float
    length: float


def _choose_objects(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    names = list(CATEGORIES)
    cats = [names[i] for i in rng.choice(len(names), size=n, replace=False)]
    if n >= 3 and rng.random() < 0.3:  # a second instance of one category, told apart by colour
        cats[-1] = cats[int(rng.integers(0, n - 1))]
    chosen: list[tuple[str, str]] = []
    for cat in cats:
        used = {c for k, c in chosen if k == cat}
        options = [c for c in CATEGORIES[cat].colours if c not in used]
        chosen.append((cat, str(rng.choice(options))))
    # books lie flat under everything else
    chosen.sort(key=lambda kc: 0 if kc[0] == "book" else 1)
    return chosen


def render_scene(seed: int, size: tuple[int, int] | None = None, n_objects: int | None = None) -> Scene:
    """Draw the tabletop scene of ``seed``.

    Args:
        seed: any non-negative int; the same (seed, size, n_objects) gives the same scene.
        size: (H, W) of the frame; default one of :data:`DEFAULT_SIZES`, picked by the seed. Small frames
            (e.g. (128, 128), (120, 160)) are drawn directly at that size.
        n_objects: how many objects to place (default 3-6, picked by the seed). An object that finds no
            place where everything stays mostly visible is left out, so a scene can hold fewer.

    Returns:
        A :class:`Scene` (image H x W x 3 uint8 RGB; per-object visible masks and polygons).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0; got {seed}")
    rng = np.random.default_rng([int(seed), 7])
    if size is None:
        size = DEFAULT_SIZES[int(rng.integers(0, len(DEFAULT_SIZES)))]
    h, w = int(size[0]), int(size[1])
    if min(h, w) < 32:
        raise ValueError(f"scene size must be at least 32x32; got {h}x{w}")
    n = int(rng.integers(3, 7)) if n_objects is None else int(n_objects)
    if not 1 <= n <= len(CATEGORIES):
        raise ValueError(f"n_objects must be in [1, {len(CATEGORIES)}]; got {n}")
    image, bg_name = _background((h, w), rng)
    short = min(h, w)
    placed: list[_Placed] = []
    visible: list[np.ndarray] = []
    for cat, colour in _choose_objects(n, rng):
        parts = SILHOUETTES[cat]()
        colours = _part_colours(cat, colour, rng)
        shrink = 1.0
        for attempt in range(40):
            if attempt and attempt % 10 == 0:
                shrink *= 0.88
            length = CATEGORIES[cat].size * short * rng.uniform(0.8, 1.2) * shrink
            angle = rng.uniform(-40, 40) if cat in ("mug", "apple", "bottle") and rng.random() < 0.5 else rng.uniform(0, 360)
            center = (rng.uniform(0, w), rng.uniform(0, h))
            canvas, keys = _draw_parts(parts, center, angle, length, (h, w))
            paint = canvas > 0
            if not paint.any():
                continue
            ys, xs = np.nonzero(paint)
            if xs.min() < 2 or ys.min() < 2 or xs.max() > w - 3 or ys.max() > h - 3:
                continue
            fill = fill_polygons(mask_polygons(paint), h, w).astype(bool)
            new_visible = [v & ~fill for v in visible]
            if any(nv.sum() < MIN_VISIBLE * p.fill.sum() or (nv.sum() < v.sum() and _has_holes(nv))
                   for nv, v, p in zip(new_visible, visible, placed, strict=True)):
                continue
            layer, paint = _shade(canvas, keys, colours, center, angle, length, rng)
            placed.append(_Placed(cat, colour, fill, paint, layer, center, angle, length))
            visible = [*new_visible, fill]
            break
    # composite: shadows, then the object, in drawing order
    light = rng.uniform(0, 2 * math.pi)
    for p in placed:
        off = p.length * 0.05
        m = np.array([[1, 0, off * math.cos(light)], [0, 1, off * math.sin(light)]], dtype=np.float32)
        shadow = cv2.warpAffine(p.fill.astype(np.float32), m, (w, h))
        sigma = max(p.length * 0.03, 0.8)
        shadow = cv2.GaussianBlur(shadow, (0, 0), sigma)
        image *= (1.0 - 0.35 * shadow)[..., None]
        image[p.paint] = p.layer[p.paint]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    g = rng.uniform(0, 2 * math.pi)
    ramp = ((xx - w / 2) * math.cos(g) + (yy - h / 2) * math.sin(g)) / max(h, w)
    image *= (rng.uniform(0.82, 1.12) * (1.0 + rng.uniform(0.0, 0.35) * ramp))[..., None]
    image += rng.normal(0.0, rng.uniform(1.0, 6.0), image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (3, 3), 0.6)
    out = np.clip(image, 0, 255).astype(np.uint8)
    objects = []
    for i, (p, vis) in enumerate(zip(placed, visible, strict=True)):
        polys = mask_polygons(vis)
        mask = fill_polygons(polys, h, w).astype(bool)
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        objects.append(SceneObject(i, p.category, p.colour, mask, polys, bbox, int(p.fill.sum()),
                                   (float(p.center[0]), float(p.center[1])), float(p.angle), float(p.length)))
    return Scene(seed=int(seed), image=out, objects=objects, background=bg_name)


def split_seed(split: str, index: int, seed: int = 0) -> int:
    """Scene seed of scene ``index`` of ``split`` ("train" | "val" | "test"): disjoint ranges.

    train: ``seed + index`` in [0, 10**7); val: 10**7 + ...; test: 2 * 10**7 + ... Raises ValueError
    when ``seed + index`` leaves its range (the splits would overlap).
    """
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSETS)}; got {split!r}")
    k = int(seed) + int(index)
    if not 0 <= k < SPLIT_SPAN:
        raise ValueError(f"seed + index = {k} is outside [0, {SPLIT_SPAN}): splits would overlap")
    return SPLIT_OFFSETS[split] + k


#: Seeds of each split start here; a split spans SPLIT_SPAN seeds.
SPLIT_OFFSETS = {"train": 0, "val": 10_000_000, "test": 20_000_000}
SPLIT_SPAN = 10_000_000
