"""Reader and writer of the ReasonSeg folder layout, read exactly as LISA reads it.

Layout: one folder per split (``train/``, ``val/``, ``test/``) holding ``x.jpg`` and ``x.json`` pairs.
Each json is LabelMe-style::

    {"text": ["what can be used to ...", ...],   # phrasings of ONE target set
     "is_sentence": true,
     "shapes": [{"label": "target", "points": [[x, y], ...]}, {"label": "ignore", ...}, ...]}

LISA's rules (``get_mask_from_json`` in its public code): shapes labelled "flag" are skipped; the
others are filled in order of decreasing area (so smaller polygons paint over larger ones), with
255 for labels containing "ignore" and 1 for every other label; points are cast to int32 and each
polygon's outline is drawn as well as its inside. LISA's validation uses only the first text.

Our tabletop files keep those keys (they describe the scene's first single-target query, so the
files also read as ordinary ReasonSeg samples, in LISA's code too) and add one key, ``"lisa_agent"``::

    "lisa_agent": {
      "version": 1, "scene_seed": 123, "split": "val",
      "objects": [{"category": "mug", "colour": "red", "bbox": [x1, y1, x2, y2],
                   "polygons": [[[x, y], ...], ...]}, ...],          # visible silhouettes
      "queries": [{"text": "...", "is_sentence": false, "subset": "explicit" | "implicit" | "multi" | "no_target",
                   "targets": [2, 0], "answer": "Sure, [SEG] and [SEG].", "explanatory": false,
                   "concept": "mug+knife"}, ...]}

One json per image, several queries per image (one per object, plus two-target and no-target
ones); ``targets`` index ``objects`` in the order of the answer's ``[SEG]`` tokens. A reader that
knows this key yields every query; one that does not sees a normal ReasonSeg sample. Real
ReasonSeg files carry no such key: each gives one query (subset "long" when ``is_sentence``,
"short" otherwise, LISA's own split of the test set).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import DatasetError
from .queries import QuerySample
from .silhouettes import fill_polygons
from .tabletop import Scene

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXTRA_KEY = "lisa_agent"
FORMAT_VERSION = 1


def lisa_eval_prompt(text: str, is_sentence: bool) -> str:
    """The instruction LISA's evaluation sends for a ReasonSeg text.

    ``"{text} Please output segmentation mask."`` for sentences, ``"What is {text} in this image?
    Please output segmentation mask."`` for noun phrases (text stripped first).
    """
    text = text.strip()
    if is_sentence:
        return f"{text} Please output segmentation mask."
    return f"What is {text} in this image? Please output segmentation mask."


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a ReasonSeg json (UTF-8, falling back to cp1252 as LISA does for a few files)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    for enc in ("utf-8", "cp1252"):
        try:
            return json.loads(raw.decode(enc))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
    raise DatasetError(f"{path} is not valid JSON")


def shapes_to_mask(shapes: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """LISA's ground truth from LabelMe shapes: H x W uint8, 0 background, 1 target, 255 ignore."""
    valid, areas = [], []
    for shape in shapes:
        label = str(shape.get("label", ""))
        if label.lower() == "flag":
            continue
        areas.append(int(fill_polygons([shape["points"]], height, width).sum()))
        valid.append(shape)
    mask = np.zeros((height, width), dtype=np.uint8)
    for k in np.argsort(areas)[::-1]:
        shape = valid[int(k)]
        value = 255 if "ignore" in str(shape.get("label", "")).lower() else 1
        fill_polygons([shape["points"]], height, width, value=value, out=mask)
    return mask


def read_annotation(json_path: str | Path, height: int, width: int) -> tuple[np.ndarray, list[str], bool]:
    """(mask H x W uint8 0/1/255, texts, is_sentence) of one ReasonSeg json, as LISA reads it."""
    anno = load_json(json_path)
    try:
        mask = shapes_to_mask(anno["shapes"], height, width)
        texts = [str(t) for t in anno["text"]]
        is_sentence = bool(anno["is_sentence"])
    except (KeyError, TypeError) as exc:
        raise DatasetError(f"{json_path}: not a ReasonSeg annotation ({exc!r} missing or malformed)") from exc
    return mask, texts, is_sentence


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass
class Query:
    """One query of a sample and its ground truth.

    Attributes:
        text: the instruction (for ReasonSeg files: the chosen phrasing).
        is_sentence: selects LISA's prompt form (:func:`lisa_eval_prompt`).
        subset: "explicit" | "implicit" | "multi" | "no_target" (ours) or "short" | "long" (ReasonSeg).
        gt: H x W uint8 ground truth as LISA scores it: 0, 1 (target) or 255 (ignored).
        target_masks: K x H x W bool masks in the answer's ``[SEG]`` order (ours: one per target,
            K = 0 for no-target; ReasonSeg: ``gt == 1`` as one mask).
        targets: indices into the sample's objects (ours; empty for ReasonSeg files).
        answer: the answer to train on (ours; None for ReasonSeg files).
        explanatory / concept: see :class:`~lisa_agent.data.queries.QuerySample`.
    """

    text: str
    is_sentence: bool
    subset: str
    gt: np.ndarray
    target_masks: np.ndarray
    targets: list[int]
    answer: str | None = None
    explanatory: bool = False
    concept: str = ""

    @property
    def prompt(self) -> str:
        """LISA's evaluation prompt for this query."""
        return lisa_eval_prompt(self.text, self.is_sentence)


@dataclass
class Sample:
    """One image of a split with its queries.

    Attributes:
        image_path / json_path: the files.
        image: H x W x 3 uint8 RGB.
        queries: the queries (one for a ReasonSeg file, several for ours).
        object_masks: N x H x W bool visible masks of every object (ours), else None.
        object_names: "colour category" of each object (ours), else [].
    """

    image_path: Path
    json_path: Path
    image: np.ndarray
    queries: list[Query]
    object_masks: np.ndarray | None = None
    object_names: list[str] | None = None


def list_images(folder: str | Path) -> list[Path]:
    """Images of ``folder`` that have a json beside them, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".json").is_file())


def read_sample(image_path: str | Path, *, all_texts: bool = False) -> Sample:
    """Read one image and its json.

    Args:
        image_path: path of ``x.jpg`` (``x.json`` must sit beside it).
        all_texts: for ReasonSeg files, one query per phrasing in ``text`` (training); default only the
            first, as LISA's validation does. Ignored for our files (each query is its own).
    """
    image_path = Path(image_path)
    json_path = image_path.with_suffix(".json")
    image = load_image(image_path)
    h, w = image.shape[:2]
    anno = load_json(json_path)
    extra = anno.get(EXTRA_KEY)
    if isinstance(extra, dict) and "queries" in extra:
        return _read_ours(image_path, json_path, image, extra)
    gt, texts, is_sentence = read_annotation(json_path, h, w)
    if not texts:
        raise DatasetError(f"{json_path}: 'text' is empty")
    chosen = texts if all_texts else texts[:1]
    subset = "long" if is_sentence else "short"
    queries = [Query(t, is_sentence, subset, gt, (gt == 1)[None], []) for t in chosen]
    return Sample(image_path, json_path, image, queries)


def _read_ours(image_path: Path, json_path: Path, image: np.ndarray, extra: dict[str, Any]) -> Sample:
    h, w = image.shape[:2]
    try:
        objects = extra.get("objects", [])
        masks = np.stack([fill_polygons(o["polygons"], h, w).astype(bool) for o in objects]) if objects \
            else np.zeros((0, h, w), dtype=bool)
        names = [f"{o.get('colour', '')} {o['category']}".strip() for o in objects]
        queries = []
        for q in extra["queries"]:
            targets = [int(t) for t in q.get("targets", [])]
            tm = masks[targets] if targets else np.zeros((0, h, w), dtype=bool)
            gt = np.asarray(tm.any(axis=0)).astype(np.uint8) if targets else np.zeros((h, w), np.uint8)
            queries.append(Query(str(q["text"]), bool(q["is_sentence"]), str(q["subset"]), gt, tm, targets,
                                 q.get("answer"), bool(q.get("explanatory", False)), str(q.get("concept", ""))))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise DatasetError(f"{json_path}: malformed '{EXTRA_KEY}' section ({exc!r})") from exc
    return Sample(image_path, json_path, image, queries, masks, names)


def iter_samples(folder: str | Path, *, limit: int | None = None, all_texts: bool = False) -> Iterator[Sample]:
    """Samples of a split folder in name order; ``limit`` caps the number of images."""
    paths = list_images(folder)
    if not paths:
        raise DatasetError(f"no image + json pairs ({'/'.join(IMAGE_SUFFIXES)}) in {folder}")
    for p in paths[:limit] if limit is not None else paths:
        yield read_sample(p, all_texts=all_texts)


def save_image(path: str | Path, image: np.ndarray, jpeg_quality: int = 95) -> None:
    """Write H x W x 3 uint8 RGB ``image`` to ``path`` (.jpg at ``jpeg_quality``, or .png), as every
    dataset writer here does, so that two layouts written from one scene hold the same pixels."""
    path = Path(path)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params):
        raise DatasetError(f"cannot write {path}")


def write_sample(out_dir: str | Path, name: str, scene: Scene, queries: Sequence[QuerySample], *,
                 image_format: str = "jpg", split: str | None = None, jpeg_quality: int = 95) -> Path:
    """Write ``scene`` as ``out_dir/name.{jpg|png}`` + ``out_dir/name.json``; returns the json path.

    The ReasonSeg keys (``text``, ``is_sentence``, ``shapes``) describe the first single-target query
    (the first query if there is none); every query goes to the ``"lisa_agent"`` section.
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png'; got {image_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = out_dir / f"{name}.{image_format}"
    save_image(image_path, scene.image, jpeg_quality)
    head = next((q for q in queries if len(q.targets) == 1), queries[0] if queries else None)
    shapes = []
    if head is not None:
        for t in head.targets:
            for poly in scene.objects[t].polygons:
                shapes.append({"label": "target", "points": poly.tolist(), "group_id": None,
                               "shape_type": "polygon", "flags": {}})
    h, w = scene.size
    doc = {
        "text": [head.text] if head is not None else [],
        "is_sentence": bool(head.is_sentence) if head is not None else False,
        "shapes": shapes,
        "imagePath": image_path.name,
        "imageHeight": h,
        "imageWidth": w,
        EXTRA_KEY: {
            "version": FORMAT_VERSION,
            "scene_seed": scene.seed,
            "split": split,
            "background": scene.background,
            "objects": [{"category": o.category, "colour": o.colour, "bbox": list(o.bbox),
                         "polygons": [p.tolist() for p in o.polygons]} for o in scene.objects],
            "queries": [q.to_dict() for q in queries],
        },
    }
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(doc, separators=(",", ":")))
    return json_path
