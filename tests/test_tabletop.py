"""The synthetic tabletop world: deterministic scenes, exact masks, distinct silhouettes, honest queries."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from lisa_agent.data.queries import (
    CURRICULUM_ORDER,
    SEG,
    describe_scene,
    presence_categories,
    presence_question,
    queries_for_scene,
)
from lisa_agent.data.tabletop import (
    AFFORDANCES,
    CATEGORIES,
    COLOURS,
    DEFAULT_SIZES,
    MIN_VISIBLE,
    SILHOUETTES,
    SPLIT_SPAN,
    _draw_parts,
    fill_polygons,
    mask_polygons,
    render_scene,
    split_seed,
)

SEEDS = range(12)


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(s, size=(160, 200)) for s in SEEDS]


def test_same_seed_same_scene_and_queries():
    a, b = render_scene(123), render_scene(123)
    assert np.array_equal(a.image, b.image)
    assert [(o.category, o.colour) for o in a.objects] == [(o.category, o.colour) for o in b.objects]
    assert np.array_equal(a.masks, b.masks)
    qa, qb = queries_for_scene(a), queries_for_scene(b)
    assert [q.to_dict() for q in qa] == [q.to_dict() for q in qb]
    c = render_scene(124)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_frame_sizes():
    shapes = {render_scene(s).image.shape for s in range(12)}
    assert shapes <= {(h, w, 3) for h, w in DEFAULT_SIZES}
    assert len(shapes) >= 2  # the seed picks among the three
    small = render_scene(5, size=(120, 160))
    assert small.image.shape == (120, 160, 3) and small.image.dtype == np.uint8
    assert small.masks.shape[1:] == (120, 160)
    with pytest.raises(ValueError):
        render_scene(-1)


def test_object_counts_and_categories(scenes):
    counts = [len(s.objects) for s in scenes]
    assert min(counts) >= 3 and max(counts) <= 6
    assert render_scene(3, size=(256, 256), n_objects=6).objects.__len__() == 6
    for s in scenes:
        for o in s.objects:
            assert o.category in CATEGORIES and o.colour in CATEGORIES[o.category].colours
        # two objects of one category always differ in colour, so colour disambiguates
        pairs = [(o.category, o.colour) for o in s.objects]
        assert len(pairs) == len(set(pairs))


def test_masks_are_exact_disjoint_and_mostly_visible(scenes):
    for s in scenes:
        union = np.zeros(s.size, dtype=np.int32)
        for o in s.objects:
            assert o.mask.dtype == bool and o.mask.shape == s.size
            # the polygons, filled as LISA's reader fills them, give back exactly the mask
            assert np.array_equal(fill_polygons(o.polygons, *s.size).astype(bool), o.mask)
            ys, xs = np.nonzero(o.mask)
            assert o.bbox == (xs.min(), ys.min(), xs.max(), ys.max())
            assert o.visible_fraction >= MIN_VISIBLE - 0.02
            union += o.mask
        assert union.max() == 1  # every pixel belongs to at most one object


def test_masks_cover_the_drawn_objects():
    """Inside a mug / ball / book mask the pixels have the object's colour, not the table's."""
    checked = 0
    for seed in range(40):
        s = render_scene(seed, size=(240, 320))
        table = np.median(s.image[~s.masks.any(axis=0)].reshape(-1, 3), axis=0)
        for o in s.objects:
            if o.category not in ("mug", "ball", "book") or o.area < 400:
                continue
            inside = np.median(s.image[o.mask].reshape(-1, 3), axis=0)
            own = np.array(COLOURS[o.colour], np.float32)
            if np.linalg.norm(own - table) < 80:
                continue  # colour too close to the table to tell
            assert np.linalg.norm(inside - own) < np.linalg.norm(inside - table), (seed, o.category, o.colour)
            checked += 1
    assert checked >= 10


def _normalised(name: str, angle: float, flip: bool) -> np.ndarray:
    """Filled silhouette of ``name`` scaled to ~6000 px, centred at (150, 150) by its centroid."""
    parts = SILHOUETTES[name]()
    if flip:
        parts = [(p * np.array([1.0, -1.0]), k) for p, k in parts]
    size = (300, 300)
    canvas, _ = _draw_parts(parts, (150, 150), angle, 100, size)
    area = fill_polygons(mask_polygons(canvas > 0), *size).sum()
    canvas, _ = _draw_parts(parts, (150, 150), angle, 100 * np.sqrt(6000 / area), size)
    m = fill_polygons(mask_polygons(canvas > 0), *size).astype(bool)
    ys, xs = np.nonzero(m)
    return np.roll(m, (int(round(150 - ys.mean())), int(round(150 - xs.mean()))), axis=(0, 1))


def test_silhouettes_are_distinct():
    """No two categories share a shape: best IoU over rotations and mirror images, at equal area, < 0.86."""
    ref = {n: _normalised(n, 0.0, False) for n in SILHOUETTES}
    variants = {n: [_normalised(n, a, f) for a in range(0, 360, 20) for f in (False, True)] for n in SILHOUETTES}
    for a, b in itertools.combinations(SILHOUETTES, 2):
        best = max((ref[a] & m).sum() / (ref[a] | m).sum() for m in variants[b])
        assert best < 0.86, (a, b, best)


def test_split_seeds_are_disjoint():
    ranges = {s: {split_seed(s, i, 0) for i in range(500)} for s in ("train", "val", "test")}
    assert not (ranges["train"] & ranges["val"]) and not (ranges["val"] & ranges["test"])
    assert not (ranges["train"] & ranges["test"])
    assert split_seed("val", 3, 10) == split_seed("val", 0, 13)
    with pytest.raises(ValueError):
        split_seed("train", SPLIT_SPAN, 0)  # would reach into val's range
    with pytest.raises(ValueError):
        split_seed("holdout", 0)


def _matches(scene, text: str) -> list[int]:
    """Objects a query names, reading the text back with the knowledge base."""
    colour = next((c for c in COLOURS if re.search(rf"\b{c}\b", text)), None)
    for aff in AFFORDANCES.values():
        if any(p in text for p in aff.phrases) or any(text.startswith(s) for s in aff.sentences):
            cats = aff.categories
            break
    else:
        cats = {c for c in CATEGORIES if re.search(rf"\b{c}\b", text)}
    return [o.index for o in scene.objects if o.category in cats and (colour is None or o.colour == colour)]


def test_one_unambiguous_query_per_object(scenes):
    for s in scenes:
        queries = queries_for_scene(s)
        singles = [q for q in queries if q.subset in ("explicit", "implicit")]
        assert [q.targets for q in singles] == [[o.index] for o in s.objects]
        for q in singles:
            assert q.masks.shape == (1, *s.size)
            assert np.array_equal(q.masks[0], s.objects[q.targets[0]].mask)
            assert np.array_equal(q.gt_mask, s.objects[q.targets[0]].mask.astype(np.uint8))
            assert q.answer.startswith("Sure, [SEG].") and q.answer.count(SEG) == 1
            assert _matches(s, q.text.removesuffix(" Explain why.")) == q.targets, q.text


def test_implicit_and_explanatory_queries():
    found_implicit = found_explain = 0
    for seed in range(40):
        s = render_scene(seed, size=(128, 128))
        for q in queries_for_scene(s, p_implicit=1.0, p_explain=0.5):
            if q.subset != "implicit":
                continue
            found_implicit += 1
            assert q.is_sentence or not q.text.endswith((".", "?"))
            assert q.concept.startswith("affordance:")
            if q.explanatory:
                found_explain += 1
                cat = s.objects[q.targets[0]].category
                assert q.text.endswith("Explain why.")
                assert q.answer == f"Sure, [SEG]. {CATEGORIES[cat].explanation}"
    assert found_implicit > 60 and found_explain > 10


def test_no_target_queries_are_empty_and_honest(scenes):
    n = 0
    for s in scenes:
        for q in queries_for_scene(s, n_no_target=3):
            if q.subset != "no_target":
                continue
            n += 1
            assert q.targets == [] and q.masks.shape == (0, *s.size)
            assert not q.gt_mask.any()
            assert SEG not in q.answer and q.answer.startswith("Sorry")
            assert _matches(s, q.text) == [], q.text  # really nothing in the scene answers it
    assert n >= len(scenes) * 2


def test_multi_queries_have_two_targets_in_order(scenes):
    for s in scenes:
        multi = [q for q in queries_for_scene(s, n_multi=2) if q.subset == "multi"]
        assert len(multi) == 2
        for q in multi:
            i, j = q.targets
            assert i != j
            assert q.answer.count(SEG) == 2
            assert np.array_equal(q.masks[0], s.objects[i].mask) and np.array_equal(q.masks[1], s.objects[j].mask)
            first, second = q.text.split(" and ", 1)
            assert _matches(s, first) == [i], q.text
            assert _matches(s, second) == [j], q.text


def test_describe_lists_every_object_left_to_right_with_its_colour(scenes):
    rng = np.random.default_rng(0)
    for s in scenes:
        question, answer = describe_scene(s, rng)
        assert question.endswith("?") or question.endswith(".")
        assert answer.startswith("There is ") and answer.endswith(".")
        listed = re.split(r", | and ", answer.removeprefix("There is ").removesuffix("."))
        assert len(listed) == len(s.objects), answer
        by_x = sorted(s.objects, key=lambda o: (o.bbox[0] + o.bbox[2], o.index))
        for item, obj in zip(listed, by_x, strict=True):
            assert item.endswith(f"{obj.colour} {obj.category}"), (item, obj.name())
            article = "an" if item.split()[1][0] in "aeiou" else "a"
            assert item.split()[0] == article, item
            assert ("pair of" in item) == CATEGORIES[obj.category].plural



def test_presence_questions_are_true_and_balanced(scenes):
    rng = np.random.default_rng(1)
    answers = []
    for s in scenes:
        for _ in range(20):
            question, answer = presence_question(s, rng)
            assert question.startswith("Is there ") and question.endswith(" in this image?")
            asked = question.removeprefix("Is there ").removesuffix(" in this image?")
            matches = _matches(s, asked)
            assert answer.startswith("Yes" if matches else "No"), (question, answer, [o.name() for o in s.objects])
            answers.append(answer.startswith("Yes"))
    assert 0.35 < np.mean(answers) < 0.65


def test_presence_curriculum_doubles_the_categories_then_asks_everything(scenes):
    assert presence_categories(0, (300, 600)) == CURRICULUM_ORDER[:2]
    assert presence_categories(299, (300, 600)) == CURRICULUM_ORDER[:2]
    assert presence_categories(300, (300, 600)) == CURRICULUM_ORDER[:4]
    assert presence_categories(600, (300, 600)) is None
    assert presence_categories(0, ()) is None
    assert sorted(CURRICULUM_ORDER) == sorted(CATEGORIES)
    rng = np.random.default_rng(3)
    for s in scenes:
        present = {o.category for o in s.objects}
        for _ in range(4):
            question, answer = presence_question(s, rng, ("book", "ball"))
            cat = "book" if "book" in question else "ball"
            assert question in (f"Is there a {cat} in this image?",)
            assert answer.startswith("Yes") == (cat in present), (question, answer, present)
    with pytest.raises(ValueError, match="subset"):
        presence_question(scenes[0], rng, ("unicorn",))
