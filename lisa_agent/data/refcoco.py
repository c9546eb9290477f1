"""Reader and writer of the RefCOCO layout (RefCOCO, RefCOCO+, RefCOCOg, refclef), read as LISA reads it.

Layout (LISA's README; ``DATA`` is LISA's ``--dataset_dir``)::

    DATA/refer_seg/refcoco/refs(unc).p        # pickle: the refs of every split (see below)
    DATA/refer_seg/refcoco/instances.json     # COCO: images, annotations (polygons or RLE), categories
    DATA/refer_seg/refcocog/refs(umd).p ...
    DATA/refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000009.jpg
    DATA/refer_seg/images/saiapr_tc-12/...    # refclef's images

A ``DATA`` that holds ``refcoco/`` and ``images/`` directly works too (LISA's validation reads the root it
is given that way). A ref (``refs(unc).p`` is a list of them, read by
:func:`~lisa_agent.data.plain_pickle.load_plain_pickle`, never by ``pickle.load``)::

    {"ref_id": 0, "ann_id": 1719310, "image_id": 581857, "split": "train", "category_id": 1,
     "sentences": [{"sent": "the lady with the blue shirt", "tokens": [...], "raw": "...", "sent_id": 0}, ...],
     "sent_ids": [0, 1, 2], "file_name": "COCO_train2014_000000581857_1719310.jpg"}

A split is named as in LISA's ``--val_dataset``: ``DATASET|SPLITBY|SPLIT`` (``refcoco|unc|val``,
``refcoco+|unc|testA``, ``refcocog|umd|test``, ``refclef|unc|val``); the refs of a split are selected by
the REFER API's rules (:func:`split_matches`). Evaluation reads it as LISA's ``ValDataset`` does: every
sentence of every ref of the split is one query on the ref's image, its text ``sent.strip().lower()``
prompted as a non-sentence query, its target the ref's annotation decoded by
:func:`~lisa_agent.data.coco_masks.decode_segmentation`.

:func:`write_refer_split` writes scenes of the synthetic tabletop world in this layout.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError, UnsafePickleError
from .coco_masks import decode_segmentation, mask_to_segmentation
from .plain_pickle import load_plain_pickle
from .queries import QuerySample
from .reasonseg import Query, Sample, load_image, load_json, save_image
from .tabletop import CATEGORIES, Scene

_MSCOCO = "images/mscoco/images/train2014"
#: Referring datasets and where their images are, relative to the root that holds the dataset folders.
DATASET_IMAGES = {"refcoco": _MSCOCO, "refcoco+": _MSCOCO, "refcocog": _MSCOCO, "refclef": "images/saiapr_tc-12"}
#: The splitBy LISA trains each dataset with (``ReferSegDataset``: umd for refcocog, unc otherwise).
TRAIN_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}
#: Split names the REFER API selects (``getRefIds``).
SPLITS = ("train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC")
#: Keys every ref must have.
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences", "category_id")


@dataclass(frozen=True)
class ReferSplit:
    """A split named as in LISA: ``dataset|splitBy|split``."""

    dataset: str
    split_by: str
    split: str

    @classmethod
    def parse(cls, text: str) -> ReferSplit:
        """``"refcoco|unc|val"`` -> ReferSplit; DatasetError naming what is wrong otherwise."""
        parts = str(text).split("|")
        if len(parts) == 2 and all(parts):
            raise DatasetError(f"{text!r} is LISA's ReasonSeg form (DATASET|SPLIT): give the folder holding "
                               f"{parts[1]}/ as --data and --split {parts[1]}; referring splits are "
                               "DATASET|SPLITBY|SPLIT, e.g. refcoco|unc|val")
        if len(parts) != 3 or not all(parts):
            raise DatasetError(f"referring split {text!r} must be DATASET|SPLITBY|SPLIT, e.g. refcoco|unc|val")
        dataset, split_by, split = parts
        if dataset not in DATASET_IMAGES:
            raise DatasetError(f"unknown referring dataset {dataset!r} in {text!r}; known: "
                               f"{', '.join(DATASET_IMAGES)}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", split_by):
            raise DatasetError(f"splitBy {split_by!r} in {text!r} is not a name (e.g. unc, umd, google)")
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r} in {text!r}; known: {', '.join(SPLITS)}")
        return cls(dataset, split_by, split)

    def __str__(self) -> str:
        return f"{self.dataset}|{self.split_by}|{self.split}"


def split_matches(ref_split: str, wanted: str) -> bool:
    """Whether a ref whose ``split`` is ``ref_split`` belongs to split ``wanted`` (REFER's ``getRefIds``):
    testA/testB/testC take every test split naming that letter (testAB too), testAB/testBC/testAC only
    themselves, test every split containing "test", train and val only themselves."""
    if wanted in ("testA", "testB", "testC"):
        return wanted[-1] in ref_split
    if wanted == "test":
        return "test" in ref_split
    return ref_split == wanted


def find_root(data: str | Path, dataset: str) -> Path:
    """The folder holding ``dataset/``: ``DATA/refer_seg`` (LISA's README layout) or ``DATA`` itself."""
    data = Path(data)
    for root in (data / "refer_seg", data):
        if (root / dataset).is_dir():
            return root
    raise DatasetError(f"no {dataset}/ folder in {data / 'refer_seg'} or {data} (the layout: "
                       f"DATA/refer_seg/{dataset}/refs(...).p + instances.json)")


class ReferDataset:
    """One referring dataset of one root (one splitBy): refs, images and annotations, indexed by id.

    Use :meth:`open`. Attributes: ``root`` (the folder holding ``dataset/`` and ``images/``), ``dataset``,
    ``split_by``, ``refs_path``, ``instances_path``, ``refs`` (list of ref dicts), ``images`` and ``anns``
    (id -> COCO record)."""

    def __init__(self, root: Path, dataset: str, split_by: str, refs: list[dict], images: dict[int, dict],
                 anns: dict[int, dict]):
        self.root, self.dataset, self.split_by = root, dataset, split_by
        self.refs, self.images, self.anns = refs, images, anns

    @property
    def refs_path(self) -> Path:
        return self.root / self.dataset / f"refs({self.split_by}).p"

    @property
    def instances_path(self) -> Path:
        return self.root / self.dataset / "instances.json"

    @property
    def image_dir(self) -> Path:
        return self.root / DATASET_IMAGES[self.dataset]

    @classmethod
    def open(cls, data: str | Path, dataset: str, split_by: str) -> ReferDataset:
        """Read ``refs(split_by).p`` (restricted unpickler) and ``instances.json`` of ``dataset`` under
        ``data``; DatasetError naming the missing or malformed file, UnsafePickleError for a pickle that
        asks to run code."""
        if dataset not in DATASET_IMAGES:
            raise DatasetError(f"unknown referring dataset {dataset!r}; known: {', '.join(DATASET_IMAGES)}")
        root = find_root(data, dataset)
        probe = cls(root, dataset, split_by, [], {}, {})
        refs_path, inst_path = probe.refs_path, probe.instances_path
        if not refs_path.is_file():
            have = sorted(p.name for p in refs_path.parent.glob("refs(*).p"))
            raise DatasetError(f"missing {refs_path}" + (f" (that folder has {', '.join(have)})" if have else ""))
        if not inst_path.is_file():
            raise DatasetError(f"missing {inst_path}")
        refs = _read_refs(refs_path)
        instances = load_json(inst_path)
        try:
            images = {int(im["id"]): im for im in instances["images"]}
            anns = {int(a["id"]): a for a in instances["annotations"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{inst_path}: not a COCO instances file ({exc!r} missing or malformed)") from exc
        for ref in refs:
            if int(ref["image_id"]) not in images:
                raise DatasetError(f"{refs_path}: ref {ref['ref_id']} names image {ref['image_id']}, "
                                   f"which {inst_path} does not list")
            if int(ref["ann_id"]) not in anns:
                raise DatasetError(f"{refs_path}: ref {ref['ref_id']} names annotation {ref['ann_id']}, "
                                   f"which {inst_path} does not list")
        return cls(root, dataset, split_by, refs, images, anns)

    def refs_of(self, split: str) -> list[dict]:
        """The refs of ``split`` (REFER's rules, :func:`split_matches`), in file order."""
        return [r for r in self.refs if split_matches(str(r["split"]), split)]

    def split_names(self) -> list[str]:
        """The split names the refs carry, sorted."""
        return sorted({str(r["split"]) for r in self.refs})

    @staticmethod
    def by_image(refs: Iterable[dict]) -> dict[int, list[dict]]:
        """image id -> its refs, images in order of first appearance (LISA's ``img2refs``)."""
        out: dict[int, list[dict]] = {}
        for ref in refs:
            out.setdefault(int(ref["image_id"]), []).append(ref)
        return out

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / str(self.images[image_id]["file_name"])

    def check_images(self, image_ids: Iterable[int]) -> None:
        """DatasetError naming the first missing image file (and how many are missing)."""
        ids = list(image_ids)
        missing = [p for p in (self.image_path(i) for i in ids) if not p.is_file()]
        if missing:
            raise DatasetError(f"missing image {missing[0]} ({len(missing)} of the {len(ids)} images are missing "
                               f"under {self.image_dir})")

    def load_image(self, image_id: int) -> np.ndarray:
        """H x W x 3 uint8 RGB; DatasetError when it is missing or not the size instances.json gives."""
        path = self.image_path(image_id)
        if not path.is_file():
            raise DatasetError(f"missing image {path}")
        image = load_image(path)
        h, w = self._size(image_id)
        if image.shape[:2] != (h, w):
            raise DatasetError(f"{path} is {image.shape[0]}x{image.shape[1]} but {self.instances_path.name} says "
                               f"{h}x{w}")
        return image

    def mask(self, ann_id: int) -> np.ndarray:
        """Annotation ``ann_id`` as LISA decodes it: H x W uint8 (1 target; see ``decode_segmentation``)."""
        ann = self.anns[int(ann_id)]
        try:
            return decode_segmentation(ann.get("segmentation", []), *self._size(int(ann["image_id"])))
        except DatasetError as exc:
            raise DatasetError(f"{self.instances_path}: annotation {ann_id}: {exc}") from exc

    def _size(self, image_id: int) -> tuple[int, int]:
        record = self.images[image_id]
        return int(record["height"]), int(record["width"])


def _read_refs(path: Path) -> list[dict]:
    try:
        refs = load_plain_pickle(path)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError, IndexError,
            KeyError, AttributeError) as exc:
        raise DatasetError(f"{path} is not a readable refs pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(refs, list):
        raise DatasetError(f"{path}: expected a list of refs, found {type(refs).__name__}")
    for k, ref in enumerate(refs):
        missing = [key for key in REF_KEYS if not isinstance(ref, dict) or key not in ref]
        if missing:
            raise DatasetError(f"{path}: ref #{k} lacks {', '.join(missing)}")
        sentences = ref["sentences"]
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("sent"), str)
                                                      for s in sentences):
            raise DatasetError(f"{path}: ref {ref['ref_id']}: 'sentences' must be a list of {{'sent': str, ...}}")
    return refs


@dataclass
class ReferEvalSplit:
    """The refs of one split, grouped by image, ready to evaluate (:func:`open_refer_split`)."""

    dataset: ReferDataset
    split: ReferSplit
    images: dict[int, list[dict]]  # image id -> refs, in LISA's order

    @property
    def n_refs(self) -> int:
        return sum(len(refs) for refs in self.images.values())

    @property
    def n_queries(self) -> int:
        return sum(len(r["sentences"]) for refs in self.images.values() for r in refs)

    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        """One :class:`Sample` per image (``limit`` caps the images), a Query per sentence of its refs: text
        ``sent.strip().lower()``, ``is_sentence`` False, subset the split name, ``gt`` the decoded annotation
        (uint8, scored as LISA scores it), ``target_masks`` its pixels > 0."""
        items = list(self.images.items())
        for image_id, refs in items[:limit] if limit is not None else items:
            image = self.dataset.load_image(image_id)
            queries = []
            for ref in refs:
                gt = self.dataset.mask(int(ref["ann_id"]))
                for sent in ref["sentences"]:
                    queries.append(Query(sent["sent"].strip().lower(), False, self.split.split, gt, (gt > 0)[None],
                                         []))
            yield Sample(self.dataset.image_path(image_id), self.dataset.instances_path, image, queries)


def open_refer_split(data: str | Path, split: str | ReferSplit) -> ReferEvalSplit:
    """Open split ``split`` (``"refcoco|unc|val"``) of the RefCOCO-layout root ``data`` and check that each
    of its images is there; one DatasetError line naming what is missing otherwise."""
    s = ReferSplit.parse(split) if isinstance(split, str) else split
    ds = ReferDataset.open(data, s.dataset, s.split_by)
    images = ds.by_image(ds.refs_of(s.split))
    if not images:
        raise DatasetError(f"{ds.refs_path}: no refs in split {s.split!r} (its refs' splits: "
                           f"{', '.join(ds.split_names()) or 'none'})")
    ds.check_images(images)
    return ReferEvalSplit(ds, s, images)


# ----------------------------------------------------------------------------------------------
# Writing the synthetic world in this layout
# ----------------------------------------------------------------------------------------------


@dataclass
class WrittenSplit:
    """What :func:`write_refer_split` wrote: the dataset folder, its split string and counts."""

    folder: Path
    split: ReferSplit
    images: int
    refs: int
    sentences: int


def image_file_name(dataset: str, image_id: int) -> str:
    """COCO's ``COCO_train2014_000000581857.jpg`` for the COCO-based datasets, ``581857.jpg`` for refclef."""
    return f"{image_id}.jpg" if dataset == "refclef" else f"COCO_train2014_{image_id:012d}.jpg"


def write_refer_split(out: str | Path, scenes: Iterable[tuple[Scene, Sequence[QuerySample]]], *, split: str,
                      dataset: str = "refcoco", split_by: str | None = None, segmentation: str = "polygon",
                      jpeg_quality: int = 95) -> WrittenSplit:
    """Write scenes and their single-target queries as split ``split`` of ``dataset`` in the RefCOCO layout
    under ``out/refer_seg`` (images as JPEG under the dataset's image folder).

    Each object a query targets is one ref (its queries' texts are the ref's sentences); every object is
    an annotation (``segmentation``: ``"polygon"`` or ``"rle"``, exact either way); image id = scene seed,
    annotation id = ``100 * image id + object index``, ref id = annotation id, sentence id =
    ``10 * ref id + k``. Multi-target and no-target queries have no RefCOCO form and are left out. Files
    already there are kept and merged: the refs of other splits stay, those of ``split`` are replaced.
    """
    if dataset not in DATASET_IMAGES:
        raise DatasetError(f"unknown referring dataset {dataset!r}; known: {', '.join(DATASET_IMAGES)}")
    by = split_by or TRAIN_SPLIT_BY[dataset]
    root = Path(out) / "refer_seg"
    folder = root / dataset
    refs_path, inst_path = folder / f"refs({by}).p", folder / "instances.json"
    refs, images, anns = _existing(refs_path, inst_path, split)
    categories = [{"id": k + 1, "name": name, "supercategory": "tabletop"} for k, name in enumerate(CATEGORIES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    image_dir = root / DATASET_IMAGES[dataset]
    image_dir.mkdir(parents=True, exist_ok=True)
    n_images = n_refs = n_sents = 0
    for scene, queries in scenes:
        image_id = int(scene.seed)
        name = image_file_name(dataset, image_id)
        save_image(image_dir / name, scene.image, jpeg_quality)
        h, w = scene.size
        images = [im for im in images if int(im["id"]) != image_id]
        anns = [a for a in anns if int(a["image_id"]) != image_id]
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for k, obj in enumerate(scene.objects):
            x1, y1, x2, y2 = obj.bbox
            anns.append({"id": 100 * image_id + k, "image_id": image_id, "category_id": cat_id[obj.category],
                         "segmentation": mask_to_segmentation(obj.mask, segmentation), "area": float(obj.area),
                         "bbox": [float(x1), float(y1), float(x2 - x1 + 1), float(y2 - y1 + 1)], "iscrowd": 0})
        texts: dict[int, list[str]] = {}
        for q in queries:
            if len(q.targets) == 1:
                texts.setdefault(q.targets[0], []).append(q.text)
        for k, sentences in sorted(texts.items()):
            ref_id = 100 * image_id + k
            sents = [{"sent": " ".join(t.lower().split()), "raw": t, "tokens": t.lower().split(),
                      "sent_id": 10 * ref_id + j} for j, t in enumerate(sentences[:10])]
            refs.append({"ref_id": ref_id, "ann_id": ref_id, "image_id": image_id, "split": split,
                         "category_id": cat_id[scene.objects[k].category], "sentences": sents,
                         "sent_ids": [s["sent_id"] for s in sents], "file_name": f"{Path(name).stem}_{ref_id}.jpg"})
            n_refs += 1
            n_sents += len(sents)
        n_images += 1
    folder.mkdir(parents=True, exist_ok=True)
    with refs_path.open("wb") as f:
        pickle.dump(refs, f, protocol=2)  # the protocol of the original (Python 2) files
    inst_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories},
                                    separators=(",", ":")))
    return WrittenSplit(folder, ReferSplit(dataset, by, split), n_images, n_refs, n_sents)


def _existing(refs_path: Path, inst_path: Path, split: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Refs of the other splits already written there, with their images and annotations."""
    if not refs_path.is_file():
        return [], [], []
    if not inst_path.is_file():
        raise DatasetError(f"{refs_path} is there but {inst_path} is missing: write into an empty folder")
    refs = [r for r in _read_refs(refs_path) if r["split"] != split]
    keep = {int(r["image_id"]) for r in refs}
    instances: dict[str, Any] = load_json(inst_path)
    images = [im for im in instances.get("images", []) if int(im["id"]) in keep]
    anns = [a for a in instances.get("annotations", []) if int(a["image_id"]) in keep]
    return refs, images, anns
