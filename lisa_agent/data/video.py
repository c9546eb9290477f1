"""Synthetic video in the tabletop world: what a robot's camera sees while things move.

A sequence (:func:`render_sequence`) starts from a rendered tabletop scene (a "world" 1.25 times the
frame's size). Its target object(s) are lifted off the table (the table under them is inpainted) and
slid across it; the camera pans and zooms over the world; a hand passes over a target for a few
frames (occlusion); the light dims part-way through. Each frame comes with the visible mask of every
target, in frame coordinates.

On disk (:func:`write_sequence`, :func:`read_sequence`; ``lisa-agent make-data --video``)::

    DIR/<name>/sequence.json    {"name", "seed", "query", "is_sentence", "size": [H, W], "frames": F,
                                 "targets": [{"category", "colour"}, ...],
                                 "events": {"occlusion": [first, last], "lighting": [first, last]}}
    DIR/<name>/frames/000000.png ...   HxWx3 RGB frames
    DIR/<name>/masks/000000.png  ...   HxW uint8 labels: k+1 where target k is visible, 0 elsewhere

Deterministic: the same (seed, frames, size, targets) gives the same pixels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .queries import explicit_query, multi_query
from .tabletop import render_scene, split_seed

#: The world is this much larger than the frame: room for the camera to pan and zoom.
WORLD_SCALE = 1.25
#: Skin tone of the occluding hand (RGB).
_HAND = (214, 170, 140)


@dataclass
class VideoSequence:
    """One synthetic sequence: F frames, the targets' masks in each, the query that names them."""

    name: str
    seed: int
    query: str
    is_sentence: bool
    targets: list[dict[str, str]]
    frames: list[np.ndarray]  # F x (H x W x 3 uint8 RGB)
    masks: list[np.ndarray]  # F x (K x H x W bool), K = len(targets)
    events: dict[str, list[int]] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.frames[0].shape[:2]
        return int(h), int(w)


def _camera(t: float, size: tuple[int, int], world: tuple[int, int], phase: float) -> np.ndarray:
    """2x3 affine world -> frame at time ``t`` in [0, 1]: a slow pan and a zoom in and out."""
    h, w = size
    wh, ww = world
    scale = 1.0 + 0.1 * math.sin(2 * math.pi * t + phase)  # 0.9 .. 1.1
    cx = ww / 2 + 0.08 * w * math.sin(2 * math.pi * t * 0.8 + 2 * phase)
    cy = wh / 2 + 0.06 * h * math.cos(2 * math.pi * t * 0.6 + phase)
    # frame = scale * (world - c) + frame centre
    return np.array([[scale, 0.0, w / 2 - scale * cx], [0.0, scale, h / 2 - scale * cy]], dtype=np.float32)


def _shifted(layer: np.ndarray, mask: np.ndarray, dx: float, dy: float) -> tuple[np.ndarray, np.ndarray]:
    m = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
    h, w = mask.shape
    moved = cv2.warpAffine(layer, m, (w, h), flags=cv2.INTER_LINEAR)
    moved_mask = cv2.warpAffine(mask.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) > 0
    return moved, moved_mask


def _hand(world: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    """An ellipse (palm) and a band (forearm) reaching in from the bottom edge: the occluder's mask."""
    wh, ww = world
    canvas = np.zeros((wh, ww), np.uint8)
    cx, cy = center
    cv2.ellipse(canvas, (int(cx), int(cy)), (int(radius * 1.1), int(radius * 0.8)), 15, 0, 360, 1, -1)
    arm = np.array([[cx - radius * 0.55, cy], [cx + radius * 0.55, cy], [cx + radius * 0.9, wh], [cx - radius * 0.2, wh]],
                   np.int32)
    cv2.fillPoly(canvas, [arm], 1)
    return canvas > 0


def render_sequence(seed: int, *, n_frames: int = 60, size: tuple[int, int] = (240, 320), n_targets: int = 1,
                    name: str | None = None) -> VideoSequence:
    """Render sequence ``seed``: ``n_frames`` frames of ``size`` (H, W) with 1 target (slid across the table)
    or 2 (slid towards each other so they cross)."""
    if n_frames < 2 or n_targets not in (1, 2):
        raise ValueError(f"n_frames must be >= 2 and n_targets 1 or 2; got {n_frames}, {n_targets}")
    rng = np.random.default_rng([int(seed), 11])
    h, w = int(size[0]), int(size[1])
    wh, ww = int(round(h * WORLD_SCALE)), int(round(w * WORLD_SCALE))
    scene = render_scene(seed, size=(wh, ww), n_objects=int(rng.integers(3, 6)))
    if len(scene.objects) < n_targets + 1:
        scene = render_scene(seed, size=(wh, ww), n_objects=5)
    picked = list(range(len(scene.objects) - n_targets, len(scene.objects)))  # the top-most objects
    if n_targets == 1:
        sample = explicit_query(scene, picked[0], rng)
    else:
        sample = multi_query(scene, picked[0], picked[1], rng)
    lift = np.zeros((wh, ww), bool)
    for i in picked:
        lift |= scene.objects[i].mask
    dilated = cv2.dilate(lift.astype(np.uint8), np.ones((7, 7), np.uint8))
    table = cv2.inpaint(scene.image, dilated, 5, cv2.INPAINT_TELEA).astype(np.float32)
    sprites = [(scene.image.astype(np.float32), scene.objects[i].mask, scene.objects[i].center) for i in picked]
    # slide paths (world coordinates) through the middle of the world, where the camera always looks
    angle = rng.uniform(0, 2 * math.pi)
    direction = np.array([math.cos(angle), math.sin(angle) * 0.5])
    length = 0.3 * ww
    middle = np.array([ww / 2, wh / 2])
    normal = np.array([-direction[1], direction[0]])
    paths = []
    for k in range(n_targets):
        sign = 1.0 if k == 0 else -1.0
        side = (0.06 * wh) * (1 if k == 0 else -1) * (n_targets - 1)
        start = middle - sign * direction * length / 2 + normal * side
        end = middle + sign * direction * length / 2 - normal * side
        paths.append((start, end))
    phase = rng.uniform(0, 2 * math.pi)
    occlusion = [int(0.45 * n_frames), max(int(0.45 * n_frames), int(0.55 * n_frames) - 1)]
    lighting = [int(0.65 * n_frames), int(0.75 * n_frames)]
    frames: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for f in range(n_frames):
        t = f / (n_frames - 1)
        world = table.copy()
        visible: list[np.ndarray] = []
        for (pixels, mask, center), (start, end) in zip(sprites, paths, strict=True):
            pos = start + (end - start) * t
            layer, moved = _shifted(pixels, mask, pos[0] - center[0], pos[1] - center[1])
            world[moved] = layer[moved]
            visible = [v & ~moved for v in visible]
            visible.append(moved)
        if occlusion[0] <= f <= occlusion[1]:
            first = paths[0][0] + (paths[0][1] - paths[0][0]) * t  # the first target's position now
            sweep = (f - occlusion[0] + 0.5) / (occlusion[1] - occlusion[0] + 1) - 0.5
            radius = 0.09 * min(wh, ww)
            hand = _hand((wh, ww), (first[0] + sweep * radius * 2, first[1] + radius * 0.3), radius)
            world[hand] = np.array(_HAND, np.float32) * rng.uniform(0.9, 1.05)
            visible = [v & ~hand for v in visible]
        if f >= lighting[0]:
            dim = 1.0 - 0.3 * min(1.0, (f - lighting[0]) / max(1, lighting[1] - lighting[0]))
            world = world * dim
        cam = _camera(t, (h, w), (wh, ww), phase)
        frame = np.asarray(cv2.warpAffine(world, cam, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT),
                           dtype=np.float32)
        frame = frame + rng.normal(0.0, 2.0, frame.shape).astype(np.float32)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
        masks.append(np.stack([cv2.warpAffine(v.astype(np.uint8), cam, (w, h), flags=cv2.INTER_NEAREST) > 0
                               for v in visible]))
    targets = [{"category": scene.objects[i].category, "colour": scene.objects[i].colour} for i in picked]
    return VideoSequence(name or f"video_{seed:08d}", int(seed), sample.text, sample.is_sentence, targets, frames,
                         masks, {"occlusion": occlusion, "lighting": lighting})


def make_video_split(out_dir: str | Path, n: int, *, split: str = "test", seed: int = 0, n_frames: int = 60,
                     size: tuple[int, int] = (240, 320), two_targets_every: int = 0) -> list[Path]:
    """Write ``n`` sequences of ``split`` (seeds as the image splits) to ``out_dir``; every
    ``two_targets_every``-th one (0: none) has two crossing targets. Returns their folders."""
    folders = []
    for k in range(n):
        seq_seed = split_seed(split, k, seed)
        targets = 2 if two_targets_every and (k + 1) % two_targets_every == 0 else 1
        folders.append(write_sequence(out_dir, render_sequence(seq_seed, n_frames=n_frames, size=size,
                                                               n_targets=targets)))
    return folders


def write_sequence(out_dir: str | Path, seq: VideoSequence) -> Path:
    """Write ``seq`` in the layout above; returns its folder."""
    folder = Path(out_dir) / seq.name
    (folder / "frames").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for f, (frame, masks) in enumerate(zip(seq.frames, seq.masks, strict=True)):
        cv2.imwrite(str(folder / "frames" / f"{f:06d}.png"), np.ascontiguousarray(frame[:, :, ::-1]))
        labels = np.zeros(frame.shape[:2], np.uint8)
        for k, m in enumerate(masks):
            labels[m] = k + 1
        cv2.imwrite(str(folder / "masks" / f"{f:06d}.png"), labels)
    meta: dict[str, Any] = {"name": seq.name, "seed": seq.seed, "query": seq.query, "is_sentence": seq.is_sentence,
                            "size": list(seq.size), "frames": len(seq.frames), "targets": seq.targets,
                            "events": seq.events}
    (folder / "sequence.json").write_text(json.dumps(meta, indent=2))
    return folder


def read_sequence(folder: str | Path) -> VideoSequence:
    """Read a sequence written by :func:`write_sequence`."""
    folder = Path(folder)
    meta = json.loads((folder / "sequence.json").read_text())
    n, k = int(meta["frames"]), len(meta["targets"])
    frames, masks = [], []
    for f in range(n):
        bgr = cv2.imread(str(folder / "frames" / f"{f:06d}.png"), cv2.IMREAD_COLOR)
        labels = cv2.imread(str(folder / "masks" / f"{f:06d}.png"), cv2.IMREAD_UNCHANGED)
        if bgr is None or labels is None:
            raise FileNotFoundError(f"{folder}: frame {f} or its mask is missing")
        frames.append(np.ascontiguousarray(bgr[:, :, ::-1]))
        masks.append(np.stack([labels == j + 1 for j in range(k)]))
    return VideoSequence(meta["name"], int(meta["seed"]), meta["query"], bool(meta["is_sentence"]), meta["targets"],
                         frames, masks, {key: list(v) for key, v in meta.get("events", {}).items()})


def list_sequences(root: str | Path) -> list[Path]:
    """The sequence folders under ``root`` (those holding a sequence.json), sorted by name."""
    return sorted(p.parent for p in Path(root).glob("*/sequence.json"))
