"""Training a tiny VisionReasoner-shaped model (Qwen2.5-VL) on the synthetic tabletop world, and measuring it.

The model sees exactly what :class:`~lisa_agent.reasoner.segmenter.ReasonerSegmenter` feeds it at inference: the
frame resized to 840 x 840 and the ``vision_reasoner`` instruction around the query, built by the segmenter's own
:meth:`~lisa_agent.reasoner.segmenter.ReasonerSegmenter.reason` (its processor call is recorded, not rebuilt). It
learns to write, with LM cross-entropy on the assistant's tokens only::

    <think> The target is the black knife. </think><answer>[{"bbox_2d": [x1,y1,x2,y2], "point_2d": [x,y]}]</answer>

in pixels of the 840 x 840 square (the target's box mapped by the templates' factors, rounded to multiples of
:data:`QUANTUM`; the point is the point of the :data:`POINT_QUANTUM` grid deepest inside the target's mask), then ``<|im_end|>``.

One step takes ``--scenes`` training scenes (seeds of the ``train`` split only) with ``--queries`` single-target
queries each (explicit names, and after ``--explicit-steps`` also implicit uses, ``--implicit-frac`` of them): the
vision encoder runs once per scene and its image tokens are shared by that scene's queries.

:func:`evaluate` measures a checkpoint on a split through the real segmenter (greedy generation, the tolerant
parser): well-formed rate, box IoU against the target's box (840 space), point-in-target-mask rate and
right-object rate (the predicted box's best-IoU object is the target).

Usage::

    python -m lisa_agent.reasoner.train --out runs/tr --steps 3000 --seed 1 --threads 1
    python -m lisa_agent.reasoner.train --out runs/tr2 --init runs/tr --steps 2000 --seed 2
    python -m lisa_agent.reasoner.train --eval runs/tr --split val --scenes-eval 40
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import torch

from ..data.queries import explicit_query, implicit_query
from ..data.tabletop import Scene, render_scene, split_seed
from .parsing import parse_output
from .segmenter import ReasonerSegmenter
from .templates import RESIZE, to_model

#: Box corners are written as multiples of this (pixels of the 840 x 840 square): one language-model image token
#: covers 28 x 28 pixels, so a corner is "which token column / row", a lookup of 31 values per coordinate.
QUANTUM = 28
#: Points are written as multiples of this (half a token: the token centres and edges), so thin objects still
#: have a grid point inside.
POINT_QUANTUM = 14
#: Frame sizes (H, W) scenes are drawn at for training and evaluation.
FRAME_SIZES = ((480, 640), (640, 480), (512, 512))
#: The generation budget for evaluation (a trained answer is ~55 tokens).
EVAL_TOKENS = 96


# ---------------------------------------------------------------------------------------------- targets
def target_box(scene: Scene, i: int, size: int = RESIZE) -> tuple[float, float, float, float]:
    """Object ``i``'s box in the coordinates of the ``size`` square (float x1, y1, x2, y2): the scene's inclusive
    frame box mapped by the templates' factors."""
    h, w = scene.size
    x1, y1, x2, y2 = scene.objects[i].bbox
    a, b = to_model(x1, y1, h, w, size)
    c, d = to_model(x2, y2, h, w, size)
    return a, b, c, d


def target_point(scene: Scene, i: int, size: int = RESIZE, quantum: int = POINT_QUANTUM) -> tuple[int, int]:
    """The point of the ``size`` square's ``quantum`` grid that lies deepest inside object ``i``'s mask once
    mapped back to the frame (VisionReasoner's ``int(v * factor + 0.5)``); ints (x, y)."""
    h, w = scene.size
    mask = scene.objects[i].mask.astype(np.uint8)
    depth = cv2.distanceTransform(np.pad(mask, 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    grid = np.arange(0, size + 1, quantum)
    xs = np.minimum((grid * (w / size) + 0.5).astype(int), w - 1)
    ys = np.minimum((grid * (h / size) + 0.5).astype(int), h - 1)
    d = depth[np.ix_(ys, xs)]
    r, c = np.unravel_index(int(np.argmax(d)), d.shape)
    if d[r, c] <= 0:  # no grid point inside (never seen in this world): the deepest pixel, rounded
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        return int(round(x * size / w)), int(round(y * size / h))
    return int(grid[c]), int(grid[r])


def answer_text(scene: Scene, i: int, quantum: int = QUANTUM, point_quantum: int = POINT_QUANTUM) -> str:
    """The text the model is trained to write for object ``i`` (think, then the answer; no EOS)."""
    obj = scene.objects[i]
    box = [int(round(v / quantum)) * quantum for v in target_box(scene, i)]
    x, y = target_point(scene, i, quantum=point_quantum)
    return (f"<think> The target is the {obj.colour} {obj.category}. </think>"
            f"<answer>[{{\"bbox_2d\": [{box[0]},{box[1]},{box[2]},{box[3]}], \"point_2d\": [{x},{y}]}}]</answer>")


@dataclass
class Query:
    """One single-target query about a scene: ``text`` (as a user would type it), the target's index, the
    subset (``explicit`` / ``implicit``) and the concept it names."""

    text: str
    target: int
    subset: str
    concept: str


def scene_queries(scene: Scene, rng: np.random.Generator, implicit_frac: float) -> list[Query]:
    """One query per object: implicit (by use) with probability ``implicit_frac`` when a use singles it out,
    else explicit (by name)."""
    out = []
    for i in range(len(scene.objects)):
        sample = implicit_query(scene, i, rng) if rng.random() < implicit_frac else None
        if sample is None:
            sample = explicit_query(scene, i, rng)
        out.append(Query(sample.text, i, sample.subset, sample.concept))
    return out


def draw_scene(split: str, index: int, seed: int = 0) -> Scene:
    """Scene ``index`` of ``split`` (seeds from :func:`~lisa_agent.data.tabletop.split_seed`), drawn at one of
    :data:`FRAME_SIZES` picked by its seed."""
    s = split_seed(split, index, seed)
    return render_scene(s, size=FRAME_SIZES[s % len(FRAME_SIZES)])


# ---------------------------------------------------------------------------------------------- inputs
class _Recorder:
    """Stands in for the segmenter's processor: forwards everything, and keeps what its last call returned (the
    exact tensors the segmenter would hand to ``generate``)."""

    def __init__(self, processor: Any):
        self._processor = processor
        self.last: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.last = self._processor(*args, **kwargs)
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


class _ImageMemo:
    """Wraps a processor's ``_process_images``: the last image's result is reused when the same pixels come again
    (a scene's queries share one frame). A pure function of its input, so the tensors are unchanged."""

    def __init__(self, process: Any):
        self.process = process
        self.key: tuple | None = None
        self.value: Any = None

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        first = images[0] if isinstance(images, (list, tuple)) else images
        key = (hashlib.sha1(np.asarray(first).tobytes()).hexdigest(), repr(sorted(kwargs.items())))
        if key != self.key:
            self.key, self.value = key, self.process(images, **kwargs)
        return self.value


def prompt_inputs(seg: ReasonerSegmenter, rgb: np.ndarray, query: str) -> dict[str, torch.Tensor]:
    """What ``seg`` feeds the model for ``query`` about ``rgb`` (HxWx3 uint8), through its own
    :meth:`~ReasonerSegmenter.reason` (no generation): ``input_ids`` (1, L) int64, ``attention_mask``,
    ``mm_token_type_ids`` (1, L), ``pixel_values`` (3600, 1176) float32 and ``image_grid_thw`` (1, 3)."""
    recorder = _Recorder(seg.processor)
    seg.processor = recorder
    try:
        _, _, prompt_ids, _ = seg.reason(rgb, query, 1, answer="")
    finally:
        seg.processor = recorder._processor
    inputs = {k: v.cpu() for k, v in recorder.last.items()}
    assert inputs["input_ids"][0].tolist() == prompt_ids
    return inputs


@dataclass
class Batch:
    """The LM inputs for the K queries of one scene: ``input_ids`` (K, L) int64 right-padded, ``attention_mask``
    (K, L), ``mm_token_type_ids`` (K, L), ``labels`` (K, L) int64 (-100 except the assistant's tokens),
    ``pixel_values`` (3600, 1176) float32 and ``image_grid_thw`` (1, 3) of the scene's one image."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


def scene_batch(seg: ReasonerSegmenter, scene: Scene, queries: Sequence[Query]) -> Batch:
    """Prompts (as the segmenter builds them) plus target answers and EOS, for ``queries`` about ``scene``."""
    tok = seg.processor.tokenizer
    rows, labels, first = [], [], None
    if not isinstance(getattr(seg.processor, "_process_images", None), _ImageMemo):
        seg.processor._process_images = _ImageMemo(seg.processor._process_images)
    for q in queries:
        inputs = prompt_inputs(seg, scene.image, q.text)
        first = first or inputs
        prompt = inputs["input_ids"][0].tolist()
        target = tok(answer_text(scene, q.target), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt + target, inputs["mm_token_type_ids"][0].tolist() + [0] * len(target)))
        labels.append([-100] * len(prompt) + target)
    assert first is not None
    length = max(len(r[0]) for r in rows)
    k = len(rows)
    ids = torch.full((k, length), int(tok.pad_token_id), dtype=torch.long)
    mask = torch.zeros((k, length), dtype=torch.long)
    types = torch.zeros((k, length), dtype=torch.long)
    lab = torch.full((k, length), -100, dtype=torch.long)
    for j, ((row, tt), lb) in enumerate(zip(rows, labels, strict=True)):
        ids[j, :len(row)] = torch.tensor(row)
        mask[j, :len(row)] = 1
        types[j, :len(row)] = torch.tensor(tt)
        lab[j, :len(row)] = torch.tensor(lb)
    return Batch(ids, mask, types.to(first["mm_token_type_ids"].dtype), lab, first["pixel_values"],
                 first["image_grid_thw"])


def batch_loss(model: Any, batch: Batch, share_prefix: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over the assistant's tokens of ``batch``, and diagnostics: ``loss``, ``tokens``,
    ``digit_acc`` (next-token accuracy on digit targets).

    The vision encoder runs once; its image tokens are shared by the K sequences. With ``share_prefix`` the
    language model also runs the K sequences' common prefix (system prompt, image, the instruction's first words:
    causal attention makes its states the same in every sequence) once, as a KV cache that the K suffixes attend
    to; the same numbers as K full passes (checked by :func:`check_shared_prefix`), at a fraction of the cost.
    """
    from transformers import DynamicCache

    lm = model.model
    k, length = batch.input_ids.shape
    grid = batch.image_grid_thw.repeat(k, 1)
    vision = lm.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True)
    image = torch.cat(list(vision.pooler_output), dim=0)
    if share_prefix:
        ids = batch.input_ids
        same = (ids == ids[:1]).all(0) & batch.attention_mask.bool().all(0)
        prefix = int(same.long().cumprod(0).sum())
        prompt_len = int((batch.labels == -100).long().cumprod(1).sum(1).min())
        prefix = min(prefix, prompt_len - 1)
        positions, _ = lm.get_rope_index(ids, batch.mm_token_type_ids, grid, attention_mask=batch.attention_mask)
        head = lm.get_input_embeddings()(ids[:1, :prefix])
        image_mask = (ids[:1, :prefix] == model.config.image_token_id).unsqueeze(-1).expand_as(head)
        head = head.masked_scatter(image_mask, image.to(head.dtype))
        cache = DynamicCache(config=model.config.get_text_config())
        lm.language_model(inputs_embeds=head, position_ids=positions[:, :1, :prefix],
                          attention_mask=torch.ones((1, prefix), dtype=torch.long), cache=cache, use_cache=True)
        cache.batch_repeat_interleave(k)
        tail = lm.get_input_embeddings()(ids[:, prefix:])
        out = lm.language_model(inputs_embeds=tail, position_ids=positions[:, :, prefix:],
                                attention_mask=batch.attention_mask, cache=cache, use_cache=True)
        hidden = out.last_hidden_state[:, :-1]
        targets = batch.labels[:, prefix + 1:]
    else:
        shared = SimpleNamespace(pooler_output=[image] * k)
        out = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 mm_token_type_ids=batch.mm_token_type_ids, image_grid_thw=grid,
                 mm_encoder_outputs={"image": shared}, use_cache=False)
        hidden = out.last_hidden_state[:, :-1]
        targets = batch.labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[keep]).float()
    gold = targets[keep]
    loss = torch.nn.functional.cross_entropy(logits, gold)
    with torch.no_grad():
        digits = getattr(model, "_digit_ids", None)
        is_digit = torch.isin(gold, digits) if digits is not None else torch.zeros_like(gold, dtype=torch.bool)
        right = logits.argmax(-1) == gold
        digit_acc = float(right[is_digit].float().mean()) if bool(is_digit.any()) else float("nan")
    return loss, {"loss": float(loss.detach()), "tokens": int(keep.sum()), "digit_acc": digit_acc}


def check_shared_prefix(model: Any, batch: Batch) -> float:
    """The absolute difference between :func:`batch_loss` with and without the shared prefix (float; ~1e-6)."""
    with torch.no_grad():
        a, _ = batch_loss(model, batch, share_prefix=True)
        b, _ = batch_loss(model, batch, share_prefix=False)
    return abs(float(a) - float(b))


# ---------------------------------------------------------------------------------------------- evaluation
def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes (inclusive pixel boxes are compared as continuous boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def evaluate(seg: ReasonerSegmenter, split: str = "val", scenes: int = 40, seed: int = 0, *,
             subsets: Sequence[str] = ("explicit", "implicit"), max_new_tokens: int = EVAL_TOKENS,
             query_seed: int = 12345, queries: Sequence[str] | None = None, log_every: int = 0) -> dict[str, Any]:
    """Metrics of ``seg`` (greedy generation through :meth:`ReasonerSegmenter.reason`, the tolerant parser) on the
    first ``scenes`` scenes of ``split``: per subset and overall, the number of queries, ``well_formed`` (at least
    one object read), ``iou`` (mean box IoU of the first object against the target's box, 840 space; 0 when
    none), ``iou50`` (rate of IoU >= 0.5), ``point_in`` (the first point, mapped to the frame, lies in the target's
    mask), ``right_object`` (the target is the object whose box best matches the predicted box) and ``named``
    (the think text names the target's category).

    ``queries``, when given, replaces the world's queries: each text (a use, e.g. "grab something to cut with")
    is asked of every scene where exactly one object affords that use, and scored against that object (other
    scenes are skipped). Else one explicit and one implicit query per object are drawn (``subsets`` chooses
    which are asked).
    """
    from ..data.knowledge import AFFORDANCES

    rng = np.random.default_rng(query_seed)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for n in range(scenes):
            scene = draw_scene(split, n, seed)
            asks: list[Query] = []
            if queries is not None:
                for text in queries:
                    cats = [a.categories for a in AFFORDANCES.values() if text.lower().strip(".?! ") in
                            [p.lower() for p in a.phrases] + [s.lower().strip(".?! ") for s in a.sentences]
                            or any(text.lower().strip(".?! ").endswith(p) for p in a.phrases)]
                    hits = [i for i, o in enumerate(scene.objects) if cats and o.category in cats[0]]
                    if len(hits) == 1:
                        asks.append(Query(text, hits[0], "custom", text))
            else:
                for i in range(len(scene.objects)):
                    if "explicit" in subsets:
                        q = explicit_query(scene, i, rng)
                        asks.append(Query(q.text, i, "explicit", q.concept))
                    if "implicit" in subsets and (use := implicit_query(scene, i, rng)) is not None:
                        asks.append(Query(use.text, i, "implicit", use.concept))
            h, w = scene.size
            gt = [target_box(scene, i) for i in range(len(scene.objects))]
            for ask in asks:
                text, _, _, _ = seg.reason(scene.image, ask.text, max_new_tokens)
                parsed = parse_output(text, h, w, style=seg.style, size=seg.size)
                category = scene.objects[ask.target].category
                row = {"subset": ask.subset, "well_formed": parsed.found, "iou": 0.0, "point_in": False,
                       "right_object": False, "named": category in parsed.think, "category": category, "text": text}
                if parsed.found:
                    obj = parsed.objects[0]
                    ious = [box_iou(obj.model_box, b) for b in gt]
                    row["iou"] = ious[ask.target]
                    row["right_object"] = int(np.argmax(ious)) == ask.target and ious[ask.target] > 0
                    if obj.points:
                        x, y = obj.points[0]
                        row["point_in"] = bool(scene.objects[ask.target].mask[y, x])
                rows.append(row)
            if log_every and (n + 1) % log_every == 0:
                print(f"  eval {split} {n + 1}/{scenes} scenes: {summarise(rows)['all']}", flush=True)
    return summarise(rows) | {"examples": [r["text"] for r in rows[:4]]}


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-subset and overall means of :func:`evaluate`'s rows."""
    out: dict[str, Any] = {}
    groups = {"all": list(rows)} | {s: [r for r in rows if r["subset"] == s] for s in sorted({r["subset"] for r in rows})}
    for name, rs in groups.items():
        if not rs:
            continue
        out[name] = {"n": len(rs), "well_formed": float(np.mean([r["well_formed"] for r in rs])),
                     "iou": float(np.mean([r["iou"] for r in rs])),
                     "iou50": float(np.mean([r["iou"] >= 0.5 for r in rs])),
                     "point_in": float(np.mean([r["point_in"] for r in rs])),
                     "right_object": float(np.mean([r["right_object"] for r in rs])),
                     "named": float(np.mean([r["named"] for r in rs]))}
        out[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in out[name].items()}
    return out


# ---------------------------------------------------------------------------------------------- training
def load_for_training(folder: str | Path) -> ReasonerSegmenter:
    """A segmenter (no SAM 2: training and :func:`evaluate` need none) over the checkpoint in ``folder``, fp32 on
    the CPU, loaded as :func:`~lisa_agent.reasoner.loading.load_reasoner` loads it."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder, padding_side="left")
    seg = ReasonerSegmenter(model.eval(), processor, None, None, style="vision_reasoner", name=str(folder))
    tok = processor.tokenizer
    model._digit_ids = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    return seg


def save_checkpoint(seg: ReasonerSegmenter, out: Path, dtype: torch.dtype = torch.float16) -> None:
    """Write ``seg``'s model (weights cast to ``dtype``; the config keeps fp32 as its dtype so loading with
    ``dtype="auto"`` or fp32 gives fp32), processor and the ``vision_reasoner`` declaration to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model = seg.model
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    seg.processor.save_pretrained(out)
    path = out / "config.json"
    data = json.loads(path.read_text())
    data["lisa_agent"] = {"reasoner_template": "vision_reasoner"}
    path.write_text(json.dumps(data, indent=2))


def train(args: argparse.Namespace) -> None:
    """The training loop (see the module docstring); writes ``args.out`` every ``--save-every`` steps and at the
    end, with ``train_log.jsonl``."""
    from .tiny import make_tabletop_reasoner

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    init = Path(args.init) if args.init else make_tabletop_reasoner(out / "init", seed=args.seed)
    seg = load_for_training(init)
    model = seg.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train_log.jsonl").open("a")
    start = time.time()
    stats: list[dict[str, float]] = []
    for step in range(1, args.steps + 1):
        warm = min(1.0, step / max(1, args.warmup))
        decay_f = 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))
        lr = args.lr * warm * (args.min_lr_frac + (1 - args.min_lr_frac) * decay_f)
        for g in opt.param_groups:
            g["lr"] = lr
        implicit = 0.0 if step <= args.explicit_steps else args.implicit_frac
        opt.zero_grad(set_to_none=True)
        step_stats = []
        for _ in range(args.scenes):
            index = int(rng.integers(0, args.train_scenes)) + args.scene_offset
            scene = draw_scene("train", index, 0)
            qs = scene_queries(scene, rng, implicit)
            order = rng.permutation(len(qs))[:args.queries]
            batch = scene_batch(seg, scene, [qs[int(j)] for j in order])
            loss, st = batch_loss(model, batch)
            (loss / args.scenes).backward()
            step_stats.append(st)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        stats.append({"loss": float(np.mean([s["loss"] for s in step_stats])),
                      "digit_acc": float(np.nanmean([s["digit_acc"] for s in step_stats]))})
        if step % args.log_every == 0 or step == args.steps:
            rec = {"step": step, "lr": lr, "implicit": implicit, "time_s": round(time.time() - start, 1),
                   "loss": round(float(np.mean([s["loss"] for s in stats])), 4),
                   "digit_acc": round(float(np.nanmean([s["digit_acc"] for s in stats])), 4)}
            stats = []
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step % args.save_every == 0 or step == args.steps:
            model.eval()
            save_checkpoint(seg, out / "checkpoint")
            if args.eval_scenes:
                split, first = ("train", args.scene_offset) if args.eval_train else \
                    ("train", args.monitor_offset) if args.monitor_offset >= 0 else ("val", 0)
                metrics = evaluate(seg, split, args.eval_scenes, seed=first, subsets=args.eval_subsets)
                rec = {"step": step, "eval": metrics}
                print(json.dumps(rec), flush=True)
                log.write(json.dumps(rec) + "\n")
                log.flush()
            model.train()
    log.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train (``--out``), or evaluate a checkpoint (``--eval``)."""
    p = argparse.ArgumentParser(prog="python -m lisa_agent.reasoner.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="run folder (checkpoint/, train_log.jsonl)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="start from this checkpoint folder (default: a fresh tabletop-shaped model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--scenes", type=int, default=1, help="scenes per step")
    p.add_argument("--queries", type=int, default=4, help="queries per scene (at most one per object)")
    p.add_argument("--train-scenes", type=int, default=1_000_000, help="draw scenes among the first N train seeds")
    p.add_argument("--scene-offset", type=int, default=0, help="first train index drawn")
    p.add_argument("--explicit-steps", type=int, default=0, help="explicit queries only for the first N steps")
    p.add_argument("--implicit-frac", type=float, default=0.5)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-scenes", type=int, default=0, help="evaluate on N val scenes at every save")
    p.add_argument("--eval-train", action="store_true", help="evaluate on the training scenes instead (overfit)")
    p.add_argument("--monitor-offset", type=int, default=-1,
                   help="evaluate at every save on train-split scenes from this index (beyond --train-scenes: never "
                        "trained on) instead of val, so val is looked at only when choosing")
    p.add_argument("--eval-subsets", nargs="+", default=["explicit", "implicit"])
    p.add_argument("--eval", help="evaluate this checkpoint folder and exit")
    p.add_argument("--split", default="val")
    p.add_argument("--scenes-eval", type=int, default=40)
    p.add_argument("--query", action="append", help="with --eval: ask this text of every scene instead")
    args = p.parse_args(argv)
    if args.eval:
        torch.set_num_threads(args.threads)
        seg = load_for_training(args.eval)
        metrics = evaluate(seg, args.split, args.scenes_eval, queries=args.query, log_every=10)
        print(json.dumps(metrics, indent=1))
        return
    if not args.out:
        p.error("--out or --eval is required")
    train(args)


if __name__ == "__main__":
    main()
