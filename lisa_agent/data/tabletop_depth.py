"""Depth for the synthetic tabletop, and how well grasp axes agree with the objects' known poses.

:func:`render_depth` turns a :class:`~lisa_agent.data.tabletop.Scene` into what an RGB-D camera above the
table would see: the drawing is read as the perspective image of a table plane tilted by a seeded angle
(0-30 degrees) at 0.55-0.9 m, each object a flat slab of its category's height (:data:`HEIGHTS`) on it,
with depth noise (1 mm + 0.15 % of the depth), millimetre quantisation and 1 % dropped pixels, as a
``16UC1`` image. Because the table is tilted, an object's 3D long axis differs from its drawn angle; the
ground truth (:func:`true_axis`) deprojects two points along the drawn axis onto the object's top plane.

:func:`evaluate_grasp_axes` runs :func:`lisa_agent.geometry.mask_grasp` on each object of the held-out test
split and reports the angle between the estimated and the true long axis (lines, so 0-90 degrees), per
category: on the ground-truth masks (the geometry alone) or, with ``masks="model"``, on the masks a model
returns for an explicit query naming each object (the whole path: model, mask, depth, grasp). Run it:
``python -m lisa_agent.data.tabletop_depth --scenes 200 [--masks model --model tabletop-tiny]``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import numpy as np

from ..geometry import Intrinsics, depth_to_meters, mask_grasp
from .tabletop import Scene, render_scene, split_seed

#: Height (metres) of each category's top above the table (objects lying down).
HEIGHTS: dict[str, float] = {"knife": 0.012, "scissors": 0.012, "mug": 0.095, "bottle": 0.07, "apple": 0.075,
                             "banana": 0.035, "ball": 0.065, "book": 0.03, "key": 0.004, "pen": 0.012,
                             "hammer": 0.03, "spoon": 0.015}
#: Categories whose drawn x axis is their long axis (a mug is as wide as long, an apple and a ball round).
ELONGATED = ("knife", "scissors", "bottle", "banana", "book", "key", "pen", "hammer", "spoon")


@dataclass(frozen=True)
class TableCamera:
    """The camera of one scene: intrinsics and the table plane ``n . X = offset`` (n the unit normal pointing
    towards the camera, camera optical frame, metres)."""

    intrinsics: Intrinsics
    normal: tuple[float, float, float]
    offset: float

    def depth_on_plane(self, u: np.ndarray, v: np.ndarray, height: np.ndarray | float) -> np.ndarray:
        """Depth z (metres) where the rays of pixels (u, v) meet the plane ``height`` above the table."""
        k = self.intrinsics
        n = self.normal
        denom = n[0] * (u - k.cx) / k.fx + n[1] * (v - k.cy) / k.fy + n[2]
        return (self.offset + np.asarray(height)) / denom


def scene_camera(scene: Scene) -> TableCamera:
    """The camera of ``scene`` (seeded by the scene's seed): focal length 0.9 x the longer image side,
    principal point at the centre, table 0.55-0.9 m away along the optical axis, tilted 0-30 degrees."""
    rng = np.random.default_rng([scene.seed, 11])
    h, w = scene.size
    f = 0.9 * max(h, w)
    intrinsics = Intrinsics(fx=f, fy=f, cx=(w - 1) / 2, cy=(h - 1) / 2)
    tilt, azimuth = math.radians(rng.uniform(0, 30)), rng.uniform(0, 2 * math.pi)
    normal = (math.sin(tilt) * math.cos(azimuth), math.sin(tilt) * math.sin(azimuth), -math.cos(tilt))
    distance = rng.uniform(0.55, 0.9)  # along the optical axis to the table
    # the plane passes through (0, 0, distance): n . X = n_z * distance
    return TableCamera(intrinsics, normal, normal[2] * distance)


def render_depth(scene: Scene, camera: TableCamera | None = None) -> tuple[np.ndarray, TableCamera]:
    """HxW uint16 depth in millimetres (0 = no reading) of ``scene``, and its camera."""
    camera = camera or scene_camera(scene)
    rng = np.random.default_rng([scene.seed, 12])
    h, w = scene.size
    height = np.zeros((h, w), np.float64)
    for obj in scene.objects:  # drawing order: later objects lie on top
        height[obj.mask] = HEIGHTS[obj.category]
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    z = camera.depth_on_plane(u, v, height)
    z = z + rng.normal(0.0, 1.0, z.shape) * (0.001 + 0.0015 * z)
    z[rng.random(z.shape) < 0.01] = 0.0
    return np.clip(np.round(z * 1000.0), 0, 65535).astype(np.uint16), camera


def true_axis(scene: Scene, index: int, camera: TableCamera) -> np.ndarray:
    """Unit 3D long axis of object ``index``: its drawn axis (angle at its centre) on its top plane."""
    obj = scene.objects[index]
    a = math.radians(obj.angle)
    du, dv = math.cos(a) * obj.length * 0.25, math.sin(a) * obj.length * 0.25
    k = camera.intrinsics
    points = []
    for u, v in ((obj.center[0] - du, obj.center[1] - dv), (obj.center[0] + du, obj.center[1] + dv)):
        z = float(camera.depth_on_plane(np.array(u), np.array(v), HEIGHTS[obj.category]))
        points.append(np.array([(u - k.cx) * z / k.fx, (v - k.cy) * z / k.fy, z]))
    axis = points[1] - points[0]
    return axis / np.linalg.norm(axis)


def axis_error_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two lines (unit vectors, either sign), degrees in [0, 90]."""
    return math.degrees(math.acos(min(1.0, abs(float(np.dot(a, b))))))


def evaluate_grasp_axes(scenes: int = 200, categories: tuple[str, ...] = ELONGATED, split: str = "test",
                        masks: str = "truth", model: str = "tabletop-tiny", device: str = "cpu") -> dict[str, object]:
    """Long-axis angle errors of :func:`~lisa_agent.geometry.mask_grasp` on ``scenes`` scenes of ``split``.

    Args:
        masks: ``truth`` (each object's ground-truth mask) or ``model`` (the first mask ``model`` returns, in
            fast mode, for an explicit query naming the object, e.g. "the red knife"; no mask counts as
            ``no_mask``).

    Returns a JSON-ready dict: ``overall`` and ``per_class`` (each ``n``, ``median_deg``, ``p90_deg``,
    ``max_deg``, ``within_10deg``, ``within_5deg``), ``no_grasp`` (objects without a grasp), and with model
    masks ``no_mask``, ``median_iou`` (of the masks used) and ``overall_mask_hit`` (the same statistics over the
    objects whose mask has IoU >= 0.5 with the truth: the geometry's error once the model found the object).
    """
    if masks not in ("truth", "model"):
        raise ValueError(f"masks must be 'truth' or 'model'; got {masks!r}")
    segmenter = None
    if masks == "model":
        from ..engine.segmenter import LisaSegmenter
        from .queries import explicit_query

        segmenter = LisaSegmenter.from_pretrained(model, dtype="fp32" if device == "cpu" else "bf16", device=device)
    errors: dict[str, list[float]] = {c: [] for c in categories}
    no_grasp = no_mask = 0
    ious: list[float] = []
    hit_errors: list[float] = []
    for i in range(scenes):
        scene = render_scene(split_seed(split, i))
        depth, camera = render_depth(scene)
        depth_m = depth_to_meters(depth)
        for k, obj in enumerate(scene.objects):
            if obj.category not in errors:
                continue
            mask = obj.mask
            if segmenter is not None:
                query = explicit_query(scene, k, np.random.default_rng([scene.seed, k]))
                result = segmenter.segment(scene.image, query.text, mode="fast")
                if not len(result.masks) or not result.masks[0].any():
                    no_mask += 1
                    continue
                mask = result.masks[0]
                ious.append(float((mask & obj.mask).sum()) / max(float((mask | obj.mask).sum()), 1.0))
            grasp = mask_grasp(depth_m, mask, camera.intrinsics)
            if grasp is None:
                no_grasp += 1
                continue
            error = axis_error_deg(np.array(grasp.axis), true_axis(scene, k, camera))
            errors[obj.category].append(error)
            if segmenter is not None and ious[-1] >= 0.5:
                hit_errors.append(error)

    def stats(values: list[float]) -> dict[str, float | int]:
        arr = np.asarray(values, dtype=np.float64)
        if not len(arr):
            return {"n": 0}
        return {"n": len(arr), "median_deg": round(float(np.median(arr)), 2),
                "p90_deg": round(float(np.percentile(arr, 90)), 2), "max_deg": round(float(arr.max()), 2),
                "within_10deg": round(float((arr <= 10).mean()), 4), "within_5deg": round(float((arr <= 5).mean()), 4)}

    report: dict[str, object] = {
        "split": split, "scenes": scenes, "masks": "ground truth" if segmenter is None else f"model {model}",
        "overall": stats([e for v in errors.values() for e in v]),
        "per_class": {c: stats(v) for c, v in errors.items()}, "no_grasp": no_grasp}
    if segmenter is not None:
        report.update(no_mask=no_mask, median_iou=round(float(np.median(ious)), 4) if ious else None,
                      overall_mask_hit=stats(hit_errors))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=200, help="held-out scenes to evaluate")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--masks", default="truth", choices=("truth", "model"),
                        help="ground-truth masks, or the model's for an explicit query naming each object")
    parser.add_argument("--model", default="tabletop-tiny", help="with --masks model: the checkpoint")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_grasp_axes(args.scenes, split=args.split, masks=args.masks, model=args.model,
                                         device=args.device), indent=2))


if __name__ == "__main__":
    main()
