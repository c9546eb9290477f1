"""Training examples and batches: training images (:class:`TrainingImage`: an image + several queries)
-> model inputs.

A batch holds a few images and *all* their queries (one per object, plus multi-target and no-target
ones): seeing every object of a scene asked for in the same batch is what teaches a small model to
read the query instead of segmenting everything.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.preprocess import clip_preprocess, sam_preprocess
from ..engine.prompts import build_prompt

#: LISA's training answer templates for single-target queries.
ANSWER_TEMPLATES = ("It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].",
                    "[SEG].")
#: LISA's questions for a class name or referring expression (``SHORT_QUESTION_LIST``, image token dropped).
SHORT_QUESTION_TEMPLATES = ("Can you segment the {class_name} in this image?",
                            "Please segment the {class_name} in this image.",
                            "What is {class_name} in this image? Please respond with segmentation mask.",
                            "What is {class_name} in this image? Please output segmentation mask.")
#: LISA's ``--num_classes_per_sample``: at most this many sentences of one image make one referring sample.
SENTENCES_PER_SAMPLE = 3


@dataclass
class Example:
    """One query about one image. ``masks``: K x H x W bool, one per ``[SEG]`` of ``answer`` in order.

    ``present``: per ``[SEG]``, whether its target is in the image (None: all are). A ``[SEG]`` whose
    target is absent trains only the presence head (the mask decoder's score output), never the mask.
    ``text_loss``: False leaves the answer's tokens out of the cross-entropy (the answer is there only
    to give the presence head a ``[SEG]`` state, not for the language model to learn to say).
    """

    image_index: int
    prompt_text: str
    answer: str
    masks: np.ndarray
    valid: np.ndarray | None = None  # H x W bool, False where ground truth says "ignore"
    present: tuple[bool, ...] | None = None
    text_loss: bool = True


@dataclass
class TrainingImage:
    """One training image and all its queries (:class:`Example`); :func:`collate` batches a few of them.

    Not to be confused with :class:`lisa_agent.data.tabletop.Scene`, a rendered scene that
    :func:`synthetic_scenes` turns into one of these. ``object_masks`` (K x H x W bool, visible
    silhouettes) and ``object_labels`` (K x L 0/1 over :func:`dense_label_names`) are set for synthetic
    scenes only: they feed the optional dense auxiliary loss on SAM's image embedding
    (``TrainConfig.sam_aux_weight``)."""

    image: np.ndarray
    examples: list[Example]
    object_masks: np.ndarray | None = None
    object_labels: np.ndarray | None = None


def dense_label_names() -> tuple[str, ...]:
    """Channels of the dense auxiliary target: the tabletop categories, then the colours."""
    from ..data.knowledge import CATEGORIES, COLOURS

    return tuple(CATEGORIES) + tuple(f"colour:{c}" for c in COLOURS)


def object_labels(categories: Sequence[str], colours: Sequence[str]) -> np.ndarray:
    """K x L float32 0/1 rows: each object's category and colour channel of :func:`dense_label_names`."""
    names = {n: i for i, n in enumerate(dense_label_names())}
    out = np.zeros((len(categories), len(names)), np.float32)
    for k, (cat, colour) in enumerate(zip(categories, colours, strict=True)):
        out[k, names[cat]] = 1.0
        out[k, names[f"colour:{colour}"]] = 1.0
    return out


@dataclass
class Batch:
    sam_pixels: torch.Tensor  # (S, 3, sam, sam)
    clip_pixels: torch.Tensor  # (S, 3, clip, clip)
    resized_hw: list[tuple[int, int]]
    original_hw: list[tuple[int, int]]
    ids: torch.Tensor  # (Q, L) right-padded
    answer_start: list[int]  # per query: index of the first answer token in ids
    lengths: list[int]
    image_of: list[int]  # per query: which scene
    masks: list[torch.Tensor]  # per query: (K, H, W) float
    valid: list[torch.Tensor | None]
    object_masks: list[np.ndarray | None] = field(default_factory=list)  # per image, see TrainingImage
    object_labels: list[np.ndarray | None] = field(default_factory=list)
    present: list[torch.Tensor] = field(default_factory=list)  # per query: (K,) float, 1 = target in the image
    text_loss: list[bool] = field(default_factory=list)  # per query: answer tokens count in the CE


def named_answer(answer: str, names: Sequence[str]) -> str:
    """``"Sure, [SEG] and [SEG]."`` -> ``"Sure, the knife [SEG] and the red apple [SEG]."``: the k-th
    ``[SEG]`` is preceded by its target's name; text after the last ``[SEG]`` (an explanation) is kept."""
    parts = answer.split("[SEG]")
    if len(parts) - 1 != len(names):
        raise ValueError(f"{len(parts) - 1} [SEG] in {answer!r} for {len(names)} names")
    out = parts[0]
    for name, rest in zip(names, parts[1:], strict=True):
        out += f"the {name} [SEG]" + rest
    return out


def absent_answer(concept: str, text: str, named_prob: float, rng: np.random.Generator) -> str:
    """A one-``[SEG]`` answer to a query whose target is absent, shaped like the model's answers to
    present ones: with probability ``named_prob`` it names what the query asks for ("Sure, the mug [SEG].",
    a category that serves an affordance query), else one of LISA's answer templates."""
    from ..data.knowledge import AFFORDANCES

    if rng.random() < named_prob:
        if concept.startswith("affordance:"):
            options = sorted(AFFORDANCES[concept.split(":", 1)[1]].categories)
            name = options[int(rng.integers(0, len(options)))]
        else:
            name = concept
            # a colour the query asked for ("the green mug") is named half the time
            words = text.lower().replace(".", " ").replace("?", " ").split()
            if concept in words and words.index(concept) > 0 and rng.random() < 0.5:
                before = words[words.index(concept) - 1]
                if before not in ("the", "a", "an", "me", "some"):
                    name = f"{before} {concept}"
        return f"Sure, the {name} [SEG]."
    return ANSWER_TEMPLATES[int(rng.integers(0, len(ANSWER_TEMPLATES)))]


def synthetic_scenes(split: str = "train", seed: int = 0, sizes: Sequence[tuple[int, int]] = ((192, 256),),
                     raw_prob: float = 0.5, start: int = 0, named_prob: float = 0.0,
                     no_target: int = 1, named_colour: str = "always",
                     describe: int = 0, presence: int = 0, presence_curriculum: Sequence[int] = (),
                     scenes_per_step: int = 1, absent_seg: int = 0) -> Iterator[TrainingImage]:
    """Endless tabletop scenes of ``split`` (disjoint seeds per split) with all their queries.

    Each query's prompt is LISA's evaluation form ("... Please output segmentation mask.") or, with
    probability ``raw_prob``, the instruction as a user would type it. With probability ``named_prob``
    the answer names each target right before its ``[SEG]`` ("Sure, the red mug [SEG]."), so the hidden
    state LISA reads for the mask is the target's name (a strong, CE-supervised signal a model trained
    from scratch needs: with only "Sure, [SEG]." a tiny LLM collapses that state to a query-independent
    vector). Otherwise single-target answers cycle through LISA's answer templates. ``no_target``: queries
    per scene about something absent (answered without ``[SEG]``). ``named_colour``: ``"always"`` names
    targets with their colour ("the red mug"); ``"needed"`` only when the scene holds another object of
    the category ("the mug"), so the language model need not read colours off the image. ``describe``:
    questions per scene answered by listing every object with its colour (no mask; the role of LISA's
    VQA data: it teaches the language model what is in the frame). ``presence``: yes/no questions per
    scene about whether a category or a use is present (half present, half absent; no mask).
    ``presence_curriculum``: step thresholds (scene ``index // scenes_per_step`` is the step) before
    which presence questions ask only about 2, 4, 8, ... categories (see ``presence_categories``).
    ``absent_seg``: queries per scene about something absent answered *with* a ``[SEG]`` as the model
    would wrongly answer them ("Sure, the hammer [SEG]."), marked absent and kept out of the
    cross-entropy: they teach the presence head (see :class:`Example`) to score such a ``[SEG]`` low.
    """
    if named_colour not in ("always", "needed"):
        raise ValueError(f"named_colour must be 'always' or 'needed', not {named_colour!r}")
    from ..data.queries import (
        describe_scene,
        no_target_query,
        presence_categories,
        presence_question,
        queries_for_scene,
        short_name,
    )
    from ..data.reasonseg import lisa_eval_prompt
    from ..data.tabletop import render_scene, split_seed

    index = start
    while True:
        scene_seed = split_seed(split, index, seed)
        rng = np.random.default_rng([scene_seed, 5])
        size = sizes[int(rng.integers(0, len(sizes)))]
        scene = render_scene(scene_seed, size=size)
        examples = []
        for q in queries_for_scene(scene, rng, n_no_target=no_target):
            text = q.text if rng.random() < raw_prob else lisa_eval_prompt(q.text, q.is_sentence)
            answer = q.answer
            if q.targets and rng.random() < named_prob:
                names = [scene.objects[t].name() if named_colour == "always" else short_name(scene, t)
                         for t in q.targets]
                answer = named_answer(answer, names)
            elif q.subset in ("explicit", "implicit") and not q.explanatory and rng.random() < 0.5:
                answer = ANSWER_TEMPLATES[int(rng.integers(0, len(ANSWER_TEMPLATES)))]
            examples.append(Example(0, text, answer, q.masks.astype(bool)))
        no_masks = np.zeros((0, *scene.image.shape[:2]), dtype=bool)
        for _ in range(describe):
            question, answer = describe_scene(scene, rng)
            examples.append(Example(0, question, answer, no_masks))
        for _ in range(absent_seg):
            absent = no_target_query(scene, rng)
            if absent is None:
                continue
            text = (absent.text if rng.random() < raw_prob
                    else lisa_eval_prompt(absent.text, absent.is_sentence))
            examples.append(Example(0, text, absent_answer(absent.concept, absent.text, named_prob, rng),
                                    np.zeros((1, *scene.image.shape[:2]), dtype=bool), present=(False,),
                                    text_loss=False))
        allowed = presence_categories(index // max(1, scenes_per_step), presence_curriculum)
        for _ in range(presence):
            question, answer = presence_question(scene, rng, allowed)
            examples.append(Example(0, question, answer, no_masks))
        index += 1
        masks = (np.stack([o.mask for o in scene.objects]) if scene.objects
                 else np.zeros((0, *scene.image.shape[:2]), dtype=bool))
        yield TrainingImage(scene.image, examples, masks,
                            object_labels([o.category for o in scene.objects], [o.colour for o in scene.objects]))


def folder_scenes(folder: str, seed: int = 0) -> Iterator[TrainingImage]:
    """Scenes from a ReasonSeg-layout folder, shuffled, repeated forever. Queries without a stored
    answer (real ReasonSeg files) train with a single ``[SEG]`` answer and the union mask."""
    from ..data.reasonseg import iter_samples

    samples = list(iter_samples(folder))
    if not samples:
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(f"no samples (image + json) in {folder}")
    rng = np.random.default_rng(seed)
    while True:
        for k in rng.permutation(len(samples)):
            s = samples[int(k)]
            examples = []
            for q in s.queries:
                answer = q.answer if q.answer is not None else ANSWER_TEMPLATES[int(rng.integers(0, 5))]
                masks = q.target_masks if q.answer is not None else (q.gt == 1)[None]
                # As LISA trains: the target is gt == 1; "ignore" (255) pixels count as background.
                examples.append(Example(0, q.prompt if rng.random() < 0.5 else q.text, answer,
                                        np.asarray(masks, bool)))
            yield TrainingImage(s.image, examples)


class ReferSource:
    """Referring samples from the train split of RefCOCO-layout data, drawn as LISA's ``ReferSegDataset``
    draws them (:meth:`scenes`).

    Args:
        data: the folder holding ``refer_seg/`` (LISA's dataset folder) or the dataset folders directly.
        datasets: names under ``data`` (LISA's ``--refer_seg_data``), each read with LISA's training splitBy
            (umd for refcocog, unc otherwise); None: every one of refclef, refcoco, refcoco+ and refcocog
            that ``data`` holds. The files are read and every image checked here (a DatasetError names
            what is missing); images are read when drawn.
    """

    def __init__(self, data: str, datasets: Sequence[str] | None = None):
        from ..data.refcoco import DATASET_IMAGES, TRAIN_SPLIT_BY, ReferDataset, find_root
        from ..errors import DatasetError

        if datasets is None:
            datasets = []
            for name in DATASET_IMAGES:
                try:
                    root = find_root(data, name)
                except DatasetError:
                    continue
                if (root / name / f"refs({TRAIN_SPLIT_BY[name]}).p").is_file():
                    datasets.append(name)
            if not datasets:
                raise DatasetError(f"no referring dataset ({', '.join(DATASET_IMAGES)}) in {data} or "
                                   f"{data}/refer_seg")
        self.pools = []
        for name in datasets:
            ds = ReferDataset.open(data, name, TRAIN_SPLIT_BY.get(name, "unc"))
            images = [(i, refs) for i, refs in ds.by_image(ds.refs_of("train")).items()
                      if any(r["sentences"] for r in refs)]
            if not images:
                raise DatasetError(f"{ds.refs_path}: no train refs with sentences (its refs' splits: "
                                   f"{', '.join(ds.split_names()) or 'none'})")
            ds.check_images(i for i, _ in images)
            self.pools.append((ds, images))
        self.datasets = list(datasets)

    def scenes(self, seed: int = 0, per_sample: int = SENTENCES_PER_SAMPLE) -> Iterator[TrainingImage]:
        """Endless samples: a dataset uniformly, one of its images uniformly, then up to ``per_sample`` of the
        sentences of that image's train refs without replacement; each is one query, one of LISA's
        short-question templates with the sentence (lower-cased) as the class name, answered by one of LISA's
        answer templates, its target the ref's annotation (every pixel it covers)."""
        rng = np.random.default_rng(seed)
        while True:
            ds, images = self.pools[int(rng.integers(0, len(self.pools)))]
            image_id, refs = images[int(rng.integers(0, len(images)))]
            sentences = [(s["sent"], int(r["ann_id"])) for r in refs for s in r["sentences"]]
            picked = rng.choice(len(sentences), size=min(per_sample, len(sentences)), replace=False)
            examples = []
            for k in picked:
                text, ann_id = sentences[int(k)]
                template = SHORT_QUESTION_TEMPLATES[int(rng.integers(0, len(SHORT_QUESTION_TEMPLATES)))]
                answer = ANSWER_TEMPLATES[int(rng.integers(0, len(ANSWER_TEMPLATES)))]
                examples.append(Example(0, template.format(class_name=text.strip().lower()), answer,
                                        (ds.mask(ann_id) > 0)[None]))
            yield TrainingImage(ds.load_image(image_id), examples)


def mixed_scenes(sources: Sequence[Iterator[TrainingImage]], rates: Sequence[float],
                 seed: int = 0) -> Iterator[TrainingImage]:
    """Draw each training image from one of ``sources``, picked with probability proportional to ``rates``
    (LISA's ``--sample_rates`` over its ``--dataset`` list, e.g. 9,3,3,1)."""
    if len(sources) != len(rates) or not sources:
        raise ValueError(f"{len(rates)} sample rates for {len(sources)} sources")
    p = np.asarray(rates, dtype=np.float64)
    if not np.all(np.isfinite(p)) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"sample rates must be >= 0 with a positive sum; got {list(rates)}")
    p = p / p.sum()
    rng = np.random.default_rng([seed, 17])
    while True:
        yield next(sources[int(rng.choice(len(sources), p=p))])


def collate(scenes: Sequence[TrainingImage], tokenizer, template: str, use_im_start_end: bool,  # noqa: ANN001
            sam_size: int, clip_size: int, seg_token_id: int) -> Batch:
    sam_px, clip_px, resized, original = [], [], [], []
    ids_list, starts, image_of, masks, valid, present, text_loss = [], [], [], [], [], [], []
    for s_idx, scene in enumerate(scenes):
        sam_in = sam_preprocess(scene.image, sam_size)
        sam_px.append(sam_in.pixels[0])
        clip_px.append(clip_preprocess(scene.image, clip_size)[0])
        resized.append(sam_in.resized_hw)
        original.append(sam_in.original_hw)
        for ex in scene.examples:
            prompt_ids = tokenizer.encode_prompt(build_prompt(template, ex.prompt_text, (), use_im_start_end))
            full = tokenizer.encode_prompt(build_prompt(template, ex.prompt_text, (), use_im_start_end, ex.answer))
            n_seg = sum(1 for t in full[len(prompt_ids):] if t == seg_token_id)
            if n_seg != len(ex.masks):
                raise ValueError(f"answer {ex.answer!r} has {n_seg} [SEG] but {len(ex.masks)} masks")
            ids_list.append(full)
            starts.append(len(prompt_ids))
            image_of.append(s_idx)
            masks.append(torch.from_numpy(np.asarray(ex.masks, np.float32)))
            valid.append(None if ex.valid is None else torch.from_numpy(np.asarray(ex.valid, bool)))
            flags = (True,) * n_seg if ex.present is None else tuple(ex.present)
            if len(flags) != n_seg:
                raise ValueError(f"answer {ex.answer!r} has {n_seg} [SEG] but {len(flags)} presence flags")
            present.append(torch.tensor(flags, dtype=torch.float32))
            text_loss.append(bool(ex.text_loss))
    longest = max(len(x) for x in ids_list)
    ids = torch.zeros(len(ids_list), longest, dtype=torch.long)
    for b, x in enumerate(ids_list):
        ids[b, : len(x)] = torch.tensor(x)
    return Batch(torch.stack(sam_px), torch.stack(clip_px), resized, original, ids, starts,
                 [len(x) for x in ids_list], image_of, masks, valid, [sc.object_masks for sc in scenes],
                 [sc.object_labels for sc in scenes], present, text_loss)
