"""Queries about a tabletop scene: LISA training and evaluation samples from the knowledge base.

:func:`queries_for_scene` turns a scene (:func:`~lisa_agent.data.tabletop.render_scene`) into
explicit ("the red mug"), implicit ("grab something to cut with"), two-target ("the knife and the
apple"), explanatory ("... Explain why." -> "Sure, [SEG]. It has a sharp blade.") and no-target
queries (an honest answer without ``[SEG]`` and an empty mask). Every single-target query singles out
exactly one object: colour is added when two objects share a category or an affordance.
:func:`describe_scene` lists a scene's objects (training data in the role of LISA's VQA mix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .knowledge import AFFORDANCES, CATEGORIES, Affordance
from .tabletop import Scene

#: Sentences that wrap a noun phrase (``{np}``): "Grab something to cut with."
_NP_SENTENCES = ("Grab {np}.", "Can you give me {np}?", "Please find {np}.", "I am looking for {np}.",
                 "Which object is {np}?", "Pick up {np}.", "Show me {np}.")
#: Sentences that wrap an explicit noun phrase: "Segment the red mug."
_EXPLICIT_SENTENCES = ("Segment {np}.", "Where is {np}?", "Show me {np}.", "Find {np} in this image.",
                       "Please pick up {np}.", "Can you point at {np}?")

SUBSETS = ("explicit", "implicit", "multi", "no_target")

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
        return np.asarray(self.masks.any(axis=0)).astype(np.uint8) if len(self.masks) \
            else np.zeros(self.masks.shape[1:], np.uint8)

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


def referring_expressions(scene: Scene, i: int, rng: np.random.Generator, n: int = 2,
                          p_implicit: float = 0.5) -> list[tuple[str, str, str]]:
    """Up to ``n`` distinct RefCOCO-style expressions for object ``i``: lower-case noun phrases without
    final punctuation (RefCOCO's ``sent`` form, which LISA lower-cases anyway) that single it out in ``scene``, as ``(expression, subset, concept)`` triples.

    Explicit ("the red mug", "red mug"; "the mug", "mug" when no other mug is there; concept the category)
    or, with probability ``p_implicit`` per expression while some use singles the object out, implicit
    ("something to cut with", "something to cut with that is red"; concept ``"affordance:cut"``)."""
    obj = scene.objects[i]
    explicit = [f"the {obj.colour} {obj.category}", f"{obj.colour} {obj.category}"]
    if sum(o.category == obj.category for o in scene.objects) == 1:
        explicit += [f"the {obj.category}", obj.category]
    implicit = [(phrase if not needs_colour else f"{phrase} that is {obj.colour}", f"affordance:{aff.name}")
                for aff, needs_colour in _affordance_options(scene, i) for phrase in aff.phrases]
    out: list[tuple[str, str, str]] = []
    while len(out) < n and (explicit or implicit):
        if implicit and (not explicit or rng.random() < p_implicit):
            text, concept = implicit.pop(int(rng.integers(0, len(implicit))))
            out.append((text.lower(), "implicit", concept))
        else:
            out.append((explicit.pop(int(rng.integers(0, len(explicit)))), "explicit", obj.category))
    return out


def referring_queries(scene: Scene, rng: np.random.Generator | None = None, *, sentences: int = 2,
                      p_implicit: float = 0.5) -> list[QuerySample]:
    """The scene as a referring-segmentation split sees it: for every object in order, up to ``sentences``
    expressions of :func:`referring_expressions`, each one query (``is_sentence`` False, so LISA's prompt is
    "What is {expression} in this image? ..."; answer "Sure, [SEG]."). Deterministic from ``scene.seed``
    unless ``rng`` is given. ``make-data --format refcoco`` writes these as refs (one per object, its
    expressions as the ref's sentences), ``make-data --queries referring`` in the ReasonSeg layout."""
    if sentences < 1:
        raise ValueError(f"sentences must be >= 1; got {sentences}")
    rng = np.random.default_rng([scene.seed, 13]) if rng is None else rng
    out = []
    for i in range(len(scene.objects)):
        for text, subset, concept in referring_expressions(scene, i, rng, sentences, p_implicit):
            out.append(QuerySample(text, False, subset, [i], _answer(1, rng), _masks(scene, [i]), concept=concept))
    return out


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


#: Categories in the order a presence curriculum introduces them: distinct silhouettes first, thin ones last.
CURRICULUM_ORDER: tuple[str, ...] = ("book", "ball", "bottle", "banana", "mug", "hammer", "apple", "knife",
                                     "scissors", "spoon", "key", "pen")


def presence_question(scene: Scene, rng: np.random.Generator,
                      categories: Sequence[str] | None = None) -> tuple[str, str]:
    """A yes/no question about whether something is in the scene, present or absent with equal
    probability, by category ("Is there a knife in this image?" -> "Yes, there is a knife.") or by use
    ("Is there something to cut with?" -> "No, there is nothing to cut with.").

    ``categories``: ask only about one of these (chosen uniformly, answered by what the scene holds), no
    uses; the early, easier phase of a curriculum.

    Not an evaluation query: training data in the role of LISA's VQA mix; it asks for exactly the
    judgement a no-target query needs."""
    present = {o.category for o in scene.objects}
    if categories is not None:
        unknown = set(categories) - set(CATEGORIES)
        if unknown or not categories:
            raise ValueError(f"presence categories must be a non-empty subset of {list(CATEGORIES)}, got {categories}")
        cat = categories[int(rng.integers(0, len(categories)))]
        return _presence_answer(cat, cat in present)
    want_present = bool(rng.random() < 0.5)
    if rng.random() < 0.5:
        affs = [a for a in AFFORDANCES.values() if bool(a.categories & present) == want_present]
        if affs:
            aff = affs[int(rng.integers(0, len(affs)))]
            phrase = _pick(rng, aff.phrases)
            answer = f"Yes, there is {phrase}." if want_present else f"No, there is {aff.nothing}."
            return f"Is there {phrase} in this image?", answer
    cats = [c for c in CATEGORIES if (c in present) == want_present]
    return _presence_answer(cats[int(rng.integers(0, len(cats)))], want_present)


def presence_categories(step: int, curriculum: Sequence[int]) -> tuple[str, ...] | None:
    """The categories presence questions may ask about at training ``step`` under ``curriculum``
    (ascending step thresholds): 2 before the first, 4 before the second, doubling, and every
    category and use (None) from the last one on. A tiny language model learns "is there a <noun>?"
    for two categories in a few hundred steps but not for all twelve at once (measured, model card)."""
    for phase, until in enumerate(curriculum):
        if step < until:
            return CURRICULUM_ORDER[: min(len(CURRICULUM_ORDER), 2 ** (phase + 1))]
    return None


def _presence_answer(cat: str, present: bool) -> tuple[str, str]:
    noun = f"any {cat}" if CATEGORIES[cat].plural else f"{'an' if cat[0] in 'aeiou' else 'a'} {cat}"
    verb = "are" if CATEGORIES[cat].plural else "is"
    question = f"Is there {noun} in this image?"
    if present:
        return question, f"Yes, there {verb} {noun.replace('any ', '')}."
    return question, f"No, there {verb} no {cat}."


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
