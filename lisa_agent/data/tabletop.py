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
and :func:`queries_for_scene` turn a scene into LISA training / evaluation queries: explicit ("the
red mug"), implicit ("grab something to cut with"), two targets ("the knife and the apple"),
explanatory ("... Explain why." -> "Sure, [SEG]. It has a sharp blade.") and no target (an honest
answer without ``[SEG]`` and an empty mask).
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

#: Sentences that wrap a noun phrase (``{np}``): "Grab something to cut with."
_NP_SENTENCES = ("Grab {np}.", "Can you give me {np}?", "Please find {np}.", "I am looking for {np}.",
                 "Which object is {np}?", "Pick up {np}.", "Show me {np}.")
#: Sentences that wrap an explicit noun phrase: "Segment the red mug."
_EXPLICIT_SENTENCES = ("Segment {np}.", "Where is {np}?", "Show me {np}.", "Find {np} in this image.",
                       "Please pick up {np}.", "Can you point at {np}?")

SUBSETS = ("explicit", "implicit", "multi", "no_target")

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


# --------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------

SEG = "[SEG]"


@dataclass
class QuerySample:
    """One query about a scene, ready to train on or evaluate.

    Attributes:
        text: the instruction ("the red mug", "Grab something to cut with.").
        is_sentence: a full sentence (LISA's prompt: "{text} Please output segmentation mask.") rather
            than a noun phrase ("What is {text} in this image? ...").
        subset: "explicit" | "implicit" | "multi" | "no_target".
        targets: indices into ``scene.objects``, in the order of the answer's ``[SEG]`` tokens.
        answer: the answer to train on, one ``[SEG]`` per target in order ("Sure, [SEG]."; no
            ``[SEG]`` for no-target queries).
        masks: K x H x W bool ground-truth masks, one per target (K = 0 for no-target queries).
        explanatory: the query asks why, and the answer explains after the ``[SEG]``.
        concept: what the query names: a category ("mug"), an affordance ("affordance:cut") or both
            joined by "+" for multi queries.
    """

    text: str
    is_sentence: bool
    subset: str
    targets: list[int]
    answer: str
    masks: np.ndarray
    explanatory: bool = False
    concept: str = ""

    @property
    def gt_mask(self) -> np.ndarray:
        """H x W uint8 union of the target masks (0/1), the ReasonSeg-style ground truth."""
        return self.masks.any(axis=0).astype(np.uint8) if len(self.masks) else np.zeros(self.masks.shape[1:], np.uint8)

    def to_dict(self) -> dict:
        """JSON-ready description without the masks."""
        return {"text": self.text, "is_sentence": self.is_sentence, "subset": self.subset,
                "targets": list(self.targets), "answer": self.answer, "explanatory": self.explanatory,
                "concept": self.concept}


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return str(items[int(rng.integers(0, len(items)))])


def short_name(scene: Scene, i: int) -> str:
    """Object ``i``'s shortest unambiguous name in ``scene``: ``"mug"``, or ``"red mug"`` when another
    mug is in the scene."""
    obj = scene.objects[i]
    same = sum(o.category == obj.category for o in scene.objects)
    return obj.name() if same > 1 else obj.category


def _explicit_np(scene: Scene, i: int, rng: np.random.Generator, force_colour: bool = False) -> str:
    obj = scene.objects[i]
    same = [o for o in scene.objects if o.category == obj.category]
    if len(same) > 1 or force_colour or rng.random() < 0.5:
        return f"the {obj.colour} {obj.category}"
    return f"the {obj.category}"


def _sentence(rng: np.random.Generator, templates: Sequence[str], np_: str) -> str:
    return _pick(rng, templates).format(np=np_)


def _answer(n: int, rng: np.random.Generator) -> str:
    del rng
    return "Sure, " + " and ".join([SEG] * n) + "." if n else ""


def _affordance_options(scene: Scene, i: int) -> list[tuple[Affordance, bool]]:
    """(affordance, needs_colour) pairs that single out object ``i`` in this scene."""
    obj = scene.objects[i]
    options = []
    for aff in AFFORDANCES.values():
        if obj.category not in aff.categories:
            continue
        matches = [o for o in scene.objects if o.category in aff.categories]
        if len(matches) == 1:
            options.append((aff, False))
        elif sum(o.colour == obj.colour for o in matches) == 1:
            options.append((aff, True))
    return options


def explicit_query(scene: Scene, i: int, rng: np.random.Generator) -> QuerySample:
    """An explicit query naming object ``i`` by category (and colour when needed)."""
    np_ = _explicit_np(scene, i, rng)
    sentence = rng.random() < 0.5
    text = _sentence(rng, _EXPLICIT_SENTENCES, np_) if sentence else np_
    return QuerySample(text, bool(sentence), "explicit", [i], _answer(1, rng), _masks(scene, [i]),
                       concept=scene.objects[i].category)


def implicit_query(scene: Scene, i: int, rng: np.random.Generator, explain: bool = False) -> QuerySample | None:
    """A reasoning query that singles out object ``i`` by what it is for; None if none can."""
    options = _affordance_options(scene, i)
    if not options:
        return None
    plain = [o for o in options if not o[1]]
    aff, needs_colour = (plain or options)[int(rng.integers(0, len(plain or options)))]
    obj = scene.objects[i]
    if needs_colour:
        np_ = f"{_pick(rng, aff.phrases)} that is {obj.colour}"
        sentence = explain or rng.random() < 0.6
        text = _sentence(rng, _NP_SENTENCES, np_) if sentence else np_
    elif explain or rng.random() < 0.7:
        sentence = True
        text = _pick(rng, aff.sentences) if rng.random() < 0.6 else _sentence(rng, _NP_SENTENCES, _pick(rng, aff.phrases))
    else:
        sentence, text = False, _pick(rng, aff.phrases)
    answer = _answer(1, rng)
    if explain:
        text = f"{text} Explain why."
        answer = f"{answer} {CATEGORIES[obj.category].explanation}"
    return QuerySample(text, bool(sentence), "implicit", [i], answer, _masks(scene, [i]), explanatory=explain,
                       concept=f"affordance:{aff.name}")


def multi_query(scene: Scene, i: int, j: int, rng: np.random.Generator) -> QuerySample:
    """Two targets named in order ("the knife and the apple"); the answer has two ``[SEG]``."""
    parts = []
    for k in (i, j):
        opts = _affordance_options(scene, k) if rng.random() < 0.3 else []
        plain = [a for a, c in opts if not c]
        parts.append(_pick(rng, plain[int(rng.integers(0, len(plain)))].phrases) if plain
                     else _explicit_np(scene, k, rng))
    np_ = f"{parts[0]} and {parts[1]}"
    sentence = rng.random() < 0.5
    text = _sentence(rng, _EXPLICIT_SENTENCES, np_) if sentence else np_
    concept = f"{scene.objects[i].category}+{scene.objects[j].category}"
    return QuerySample(text, bool(sentence), "multi", [i, j], _answer(2, rng), _masks(scene, [i, j]), concept=concept)


def no_target_query(scene: Scene, rng: np.random.Generator) -> QuerySample | None:
    """A query nothing in the scene answers; the answer says so and has no ``[SEG]``."""
    present = {o.category for o in scene.objects}
    h, w = scene.size
    empty = np.zeros((0, h, w), dtype=bool)
    kind = rng.random()
    absent_affs = [a for a in AFFORDANCES.values() if not (a.categories & present)]
    absent_cats = [c for c in CATEGORIES if c not in present]
    if kind < 0.45 and absent_affs:
        aff = absent_affs[int(rng.integers(0, len(absent_affs)))]
        sentence = rng.random() < 0.7
        if sentence:
            text = _pick(rng, aff.sentences) if rng.random() < 0.5 else _sentence(rng, _NP_SENTENCES, _pick(rng, aff.phrases))
        else:
            text = _pick(rng, aff.phrases)
        return QuerySample(text, bool(sentence), "no_target", [], f"Sorry, there is {aff.nothing} in this image.",
                           empty, concept=f"affordance:{aff.name}")
    if kind < 0.7 and scene.objects:  # a category that is here, in a colour that is not
        obj = scene.objects[int(rng.integers(0, len(scene.objects)))]
        used = {o.colour for o in scene.objects if o.category == obj.category}
        free = [c for c in CATEGORIES[obj.category].colours if c not in used]
        if free:
            np_ = f"the {_pick(rng, free)} {obj.category}"
            return _no_category(scene, np_, obj.category, rng, empty)
    if absent_cats:
        cat = absent_cats[int(rng.integers(0, len(absent_cats)))]
        return _no_category(scene, f"the {cat}", cat, rng, empty)
    return None


def _no_category(scene: Scene, np_: str, cat: str, rng: np.random.Generator, empty: np.ndarray) -> QuerySample:
    sentence = rng.random() < 0.5
    text = _sentence(rng, _EXPLICIT_SENTENCES, np_) if sentence else np_
    noun = np_.removeprefix("the ")
    verb = "are" if CATEGORIES[cat].plural else "is"
    article = "no"
    return QuerySample(text, bool(sentence), "no_target", [], f"Sorry, there {verb} {article} {noun} in this image.",
                       empty, concept=cat)


_DESCRIBE_QUESTIONS = (
    "What objects are on the table?",
    "What do you see in this image?",
    "List the objects in this image.",
    "What is on the table?",
)


def describe_scene(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A question about the whole scene and its answer listing every object, left to right, with its
    colour: ("What is on the table?", "There is a red mug, a pair of scissors and an apple.").

    Not an evaluation query: training data in the role of LISA's VQA mix, a dense language signal
    about what is (and so what is not) in the frame."""
    objs = sorted(scene.objects, key=lambda o: (o.bbox[0] + o.bbox[2], o.index))
    items = []
    for o in objs:
        noun = f"pair of {o.colour} {o.category}" if CATEGORIES[o.category].plural else f"{o.colour} {o.category}"
        items.append(("an " if noun[0] in "aeiou" else "a ") + noun)
    if not items:
        listing = "nothing"
    elif len(items) == 1:
        listing = items[0]
    else:
        listing = ", ".join(items[:-1]) + " and " + items[-1]
    return _pick(rng, _DESCRIBE_QUESTIONS), f"There is {listing}."


def _masks(scene: Scene, idx: Sequence[int]) -> np.ndarray:
    return np.stack([scene.objects[k].mask for k in idx])


def queries_for_scene(scene: Scene, rng: np.random.Generator | None = None, *, per_object: bool = True,
                      p_implicit: float = 0.5, p_explain: float = 0.15, n_multi: int = 1,
                      n_no_target: int = 1) -> list[QuerySample]:
    """Queries about ``scene``: one per object, then ``n_multi`` two-target and ``n_no_target`` empty ones.

    Every single-target query singles out exactly one object of the scene (colour is added when two
    objects share a category or an affordance). Per object the query is implicit with probability
    ``p_implicit`` when some affordance singles it out (explicit otherwise); implicit queries ask
    "... Explain why." with probability ``p_explain``. Single-target queries come first, in object order.

    Args:
        scene: a rendered scene.
        rng: random source (default: derived from ``scene.seed``, so queries are deterministic too).
        per_object: one query per object (False: a single one about a random object).
    """
    rng = np.random.default_rng([scene.seed, 11]) if rng is None else rng
    out: list[QuerySample] = []
    n = len(scene.objects)
    order = list(range(n)) if per_object else ([int(rng.integers(0, n))] if n else [])
    for i in order:
        q = None
        if rng.random() < p_implicit:
            q = implicit_query(scene, i, rng, explain=bool(rng.random() < p_explain))
        out.append(q if q is not None else explicit_query(scene, i, rng))
    for _ in range(n_multi if n >= 2 else 0):
        i, j = (int(v) for v in rng.choice(n, size=2, replace=False))
        out.append(multi_query(scene, i, j, rng))
    for _ in range(n_no_target):
        q = no_target_query(scene, rng)
        if q is not None:
            out.append(q)
    return out


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
