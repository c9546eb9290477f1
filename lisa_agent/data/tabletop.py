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

:func:`render_scene` draws a scene; the knowledge base (:data:`CATEGORIES`, :data:`AFFORDANCES`)
says what each object is called, what colours it comes in and what it is for.
:mod:`lisa_agent.data.queries` turns a scene into LISA training / evaluation queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

#: Frame sizes (H, W) a scene is drawn at when none is given.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((480, 640), (640, 480), (512, 512))
#: Fraction of an object's own area that must stay visible after later objects cover it.
MIN_VISIBLE = 0.7
#: Fixed-point bits for sub-pixel polygon drawing (cv2 ``shift``).
_SHIFT = 4

# --------------------------------------------------------------------------------------------
# Knowledge base: colours, categories and affordances
# --------------------------------------------------------------------------------------------

#: Colour name -> base RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 32, 38), "green": (48, 150, 58), "blue": (38, 78, 196), "yellow": (236, 206, 44),
    "orange": (240, 128, 30), "purple": (122, 52, 158), "black": (38, 38, 42), "white": (236, 236, 230),
    "brown": (122, 76, 40), "silver": (192, 196, 204), "gold": (212, 172, 56), "pink": (236, 120, 172),
}


@dataclass(frozen=True)
class Category:
    """One kind of object.

    Attributes:
        name: category name, also the noun used in queries ("knife", "scissors").
        colours: colour names an instance can have (its main colour: a knife's handle, a mug's body).
        size: typical length of the long side as a fraction of the frame's shorter side.
        explanation: the sentence an explanatory answer gives after ``[SEG].``.
        plural: the noun is plural ("there are no scissors").
    """

    name: str
    colours: tuple[str, ...]
    size: float
    explanation: str
    plural: bool = False


CATEGORIES: dict[str, Category] = {c.name: c for c in (
    Category("knife", ("black", "brown", "red", "blue", "green", "white"), 0.46, "It has a sharp blade."),
    Category("scissors", ("red", "blue", "black", "orange", "green", "yellow"), 0.36,
             "Scissors have two sharp blades.", plural=True),
    Category("mug", ("red", "blue", "white", "green", "yellow", "black", "orange"), 0.30,
             "A mug holds hot drinks and has a handle."),
    Category("bottle", ("green", "blue", "red", "white", "orange"), 0.46, "A bottle holds liquid and has a cap."),
    Category("apple", ("red", "green", "yellow"), 0.24, "An apple is a fruit you can eat."),
    Category("banana", ("yellow", "green"), 0.40, "A banana is a fruit you can eat."),
    Category("ball", ("red", "blue", "orange", "green", "yellow", "white", "purple"), 0.24,
             "A ball is round and can be thrown."),
    Category("book", ("red", "blue", "green", "black", "brown", "orange", "purple"), 0.44, "A book has pages to read."),
    Category("key", ("gold", "silver"), 0.22, "A key opens locks."),
    Category("pen", ("blue", "black", "red", "green"), 0.34, "A pen writes with ink."),
    Category("hammer", ("brown", "red", "black", "yellow"), 0.48, "Its heavy head drives nails."),
    Category("spoon", ("silver", "red", "white", "blue"), 0.34, "A spoon scoops and stirs."),
)}


@dataclass(frozen=True)
class Affordance:
    """What an object is for, as a person would ask for it.

    Attributes:
        name: short id ("cut").
        categories: categories that afford it.
        phrases: noun phrases ("something to cut with"), usable with a colour ("... that is red").
        sentences: full instructions that need no noun phrase ("I want to drive a nail.").
        nothing: the phrase of an honest no-target answer ("nothing to cut with").
    """

    name: str
    categories: frozenset[str]
    phrases: tuple[str, ...]
    sentences: tuple[str, ...]
    nothing: str


def _aff(name: str, cats: str, phrases: Sequence[str], sentences: Sequence[str], nothing: str) -> Affordance:
    return Affordance(name, frozenset(cats.split()), tuple(phrases), tuple(sentences), nothing)


AFFORDANCES: dict[str, Affordance] = {a.name: a for a in (
    _aff("cut", "knife scissors", ("something to cut with", "something sharp", "a tool for cutting"),
         ("Grab something to cut with.", "I need to cut this string, what can I use?",
          "What could I use to cut the tape?"), "nothing to cut with"),
    _aff("slice", "knife", ("something to slice bread with", "a tool with a single long blade"),
         ("I want to slice some bread.", "What would a cook chop vegetables with?"), "nothing to slice bread with"),
    _aff("cut_paper", "scissors", ("something to cut paper with", "a tool with two finger holes"),
         ("I need to cut out a paper shape.", "What has two blades that cross?"), "nothing to cut paper with"),
    _aff("hot_drink", "mug", ("something to hold my coffee", "a cup for hot tea"),
         ("What could hold my coffee?", "I want to drink some hot tea.", "Where can I pour my hot cocoa?"),
         "nothing to hold coffee"),
    _aff("carry_water", "bottle", ("something to carry water in", "a container with a cap"),
         ("I need water for my hike.", "What could I take along to drink on a trip?"), "nothing to carry water in"),
    _aff("liquid", "mug bottle", ("something that holds liquid", "a container for drinks"),
         ("Where could I pour some juice?",), "nothing that holds liquid"),
    _aff("eat", "apple banana", ("something I can eat", "a healthy snack", "a piece of fruit"),
         ("I am hungry, what can I eat?", "Give me a healthy snack."), "nothing to eat"),
    _aff("peel", "banana", ("a fruit you peel before eating", "a long curved fruit"),
         ("What fruit do monkeys love?", "I want a fruit that is easy to peel."), "no fruit to peel"),
    _aff("crunchy", "apple", ("a crunchy round fruit", "the fruit that keeps the doctor away"),
         ("Which fruit keeps the doctor away if I eat one a day?", "I want a crunchy fruit."),
         "no crunchy fruit"),
    _aff("play", "ball", ("something to play catch with", "something round that bounces"),
         ("What could I throw to my dog?", "Let's play a game of catch."), "nothing to play catch with"),
    _aff("read", "book", ("something to read", "something with pages"),
         ("I want to read a story tonight.", "What could I study from?"), "nothing to read"),
    _aff("unlock", "key", ("something that opens a lock", "something to unlock the door with"),
         ("I need to unlock the front door.", "How do I open this padlock?"), "nothing to open a lock with"),
    _aff("write", "pen", ("something to write with", "something to sign a form with"),
         ("I need to jot down a phone number.", "Hand me something to write a note with."), "nothing to write with"),
    _aff("nail", "hammer", ("something to drive a nail with", "a tool to hit nails with"),
         ("I want to drive a nail.", "What can I use to hang a picture on a nail?"), "nothing to drive a nail with"),
    _aff("stir", "spoon", ("something to eat soup with", "something to stir my tea with"),
         ("What can I stir my tea with?", "I want to eat some yogurt."), "nothing to eat soup with"),
)}

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


def fill_polygons(polygons: Sequence[np.ndarray | Sequence[Sequence[float]]], height: int, width: int,
                  value: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """Rasterise polygons as LISA's ReasonSeg reader does: points cast to int32, outline + fill.

    Returns an H x W uint8 array (``out`` if given) with ``value`` inside each polygon.
    """
    mask = np.zeros((height, width), dtype=np.uint8) if out is None else out
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).astype(np.int32).reshape(1, -1, 2)
        if pts.shape[1] == 0:
            continue
        cv2.polylines(mask, pts, True, value, 1)
        cv2.fillPoly(mask, pts, value)
    return mask


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outer outlines of a bool H x W mask as K x 2 int32 (x, y) arrays (holes are not represented)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).astype(np.int32) for c in contours]


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
        m = np.float32([[1, 0, off * math.cos(light)], [0, 1, off * math.sin(light)]])
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
