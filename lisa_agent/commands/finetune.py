"""``lisa-agent finetune``: LISA's training recipe (LoRA or full) on a mixture of data sources, each a
ReasonSeg-layout folder, RefCOCO-layout referring data or the synthetic tabletop world, drawn with
sampling rates as LISA's ``--dataset`` / ``--sample_rates``; checkpoints in the published layout, resumable.

``--data`` lists the sources, joined by ``||`` as LISA joins its dataset names::

    --data synthetic                                   # endless tabletop scenes (train seeds)
    --data DIR  or  --data reason_seg:DIR              # a ReasonSeg-layout folder (x.jpg + x.json)
    --data refer_seg:DIR                               # RefCOCO layout (DIR/refer_seg/refcoco/refs(unc).p ...)
    --data "refer_seg:DIR||reason_seg:RS/train||synthetic" --sample-rates 3,1,1

A referring sample is up to three sentences of one image's train refs, each asked with one of LISA's
short questions and answered with one of its answer templates (:class:`~lisa_agent.training.batches.ReferSource`).
``--val-data DIR --val-split refcoco|unc|val`` validates on a referring split (LISA's ``--val_dataset``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ..errors import InvalidArgumentError

if TYPE_CHECKING:  # pragma: no cover
    from ..training.batches import TrainingImage


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in part.lower().split("x")) for part in text.split(","))  # type: ignore[misc]


def _steps(text: str) -> tuple[int, ...]:
    """``"300,600"`` -> (300, 600): ascending positive step thresholds ("" -> none)."""
    if not text.strip():
        return ()
    try:
        steps = tuple(int(v) for v in text.split(","))
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1 or list(steps) != sorted(set(steps)):
        raise InvalidArgumentError(f"--presence-curriculum must be ascending positive steps like 300,600; got {text!r}")
    return steps


#: Source kinds ``--data`` names (a bare folder is ``reason_seg``).
SOURCE_KINDS = ("synthetic", "reason_seg", "refer_seg")


def parse_sources(text: str) -> list[tuple[str, str]]:
    """``"refer_seg:D1||synthetic||D2"`` -> [("refer_seg", "D1"), ("synthetic", ""), ("reason_seg", "D2")]."""
    sources = []
    for part in (p.strip() for p in text.split("||")):
        if not part:
            raise InvalidArgumentError(f"--data {text!r} has an empty source (sources are joined by '||')")
        kind, sep, path = part.partition(":")
        if part == "synthetic":
            sources.append(("synthetic", ""))
        elif sep and kind in ("reason_seg", "refer_seg"):
            if not path:
                raise InvalidArgumentError(f"--data source {part!r} names no folder")
            sources.append((kind, path))
        else:
            sources.append(("reason_seg", part))
    return sources


def parse_rates(text: str | None, n: int) -> list[float]:
    """``"9,3,1"`` -> [9.0, 3.0, 1.0], one per source (None: equal rates)."""
    if text is None:
        return [1.0] * n
    try:
        rates = [float(v) for v in text.split(",")]
    except ValueError:
        rates = []
    if len(rates) != n or any(not r >= 0 for r in rates) or sum(rates) <= 0:
        raise InvalidArgumentError(f"--sample-rates must be {n} non-negative numbers (one per --data source) with "
                                   f"a positive sum; got {text!r}")
    return rates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="starting checkpoint: Hub id, folder or tabletop-tiny")
    parser.add_argument("--vision-tower", default=None)
    parser.add_argument("--data", required=True, metavar="SOURCE[||SOURCE...]",
                        help="'synthetic' (endless tabletop scenes, train seeds), a ReasonSeg-layout folder "
                             "(or reason_seg:DIR), or refer_seg:DIR (RefCOCO layout, its train refs); several "
                             "joined by '||' are mixed by --sample-rates")
    parser.add_argument("--sample-rates", default=None, metavar="R,R,...",
                        help="one weight per --data source: each training image comes from a source picked with "
                             "these odds, as LISA's --sample_rates (default: equal)")
    parser.add_argument("--refer-seg-data", default=None, metavar="NAME||NAME",
                        help="refer_seg sources: which of refclef, refcoco, refcoco+, refcocog to read, each drawn "
                             "equally as LISA's --refer_seg_data (default: every one the folder holds)")
    parser.add_argument("--out", required=True, help="output folder (published layout + trainer_state.pt)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--lora", dest="method", action="store_const", const="lora",
                       help="LoRA r8/a16 on q_proj,v_proj; lm_head, embeddings, mask decoder, text_hidden_fcs "
                            "trained (default)")
    group.add_argument("--full", dest="method", action="store_const", const="full",
                       help="train everything (small models from scratch)")
    parser.set_defaults(method="lora")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=None, help="default 3e-4 (lora), 1e-3 (full)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--scenes-per-batch", type=int, default=2, help="images per batch (all their queries)")
    parser.add_argument("--named-answers", type=float, default=0.0,
                        help="synthetic data: share of answers that name each target before its [SEG] "
                             "('Sure, the red mug [SEG].'); helps models trained from scratch")
    parser.add_argument("--named-colour", default="always", choices=["always", "needed"],
                        help="synthetic named answers: colour always ('the red mug') or only when the scene "
                             "has another object of the category ('the mug')")
    parser.add_argument("--no-target-per-scene", type=int, default=1,
                        help="synthetic data: queries per scene about something absent (default 1)")
    parser.add_argument("--describe-per-scene", type=int, default=0,
                        help="synthetic data: questions per scene answered by listing its objects (no mask)")
    parser.add_argument("--presence-per-scene", type=int, default=0,
                        help="synthetic data: yes/no questions per scene about what is present (no mask)")
    parser.add_argument("--presence-curriculum", default="", metavar="STEP,STEP,...",
                        help="presence questions ask about only 2 categories before the first step, 4 before "
                             "the second, doubling; all categories and uses after the last")
    parser.add_argument("--absent-seg-per-scene", type=int, default=0,
                        help="synthetic data: queries per scene about something absent, answered with a [SEG] "
                             "marked absent (trains the presence head only; needs --presence-weight)")
    parser.add_argument("--presence-weight", type=float, default=0.0,
                        help="weight of the presence loss on the mask decoder's score output (ours, not LISA's); "
                             "> 0 writes a presence gate into config.json: generation declines (no mask) when "
                             "every [SEG] scores below --presence-threshold")
    parser.add_argument("--presence-threshold", type=float, default=0.5,
                        help="the gate's threshold on the presence probability (default 0.5)")
    parser.add_argument("--sam-aux-weight", type=float, default=0.0,
                        help="synthetic data: weight of a training-only dense loss that teaches SAM's image "
                             "embedding which category and colour covers each cell (ours, not LISA's)")
    parser.add_argument("--reinit-seg-head", action="store_true",
                        help="re-initialise text_hidden_fcs before training (e.g. after its ReLUs died)")
    parser.add_argument("--freeze-vision", action="store_true",
                        help="--full: keep the CLIP tower fixed as LISA does (e.g. after pretrain-vision)")
    parser.add_argument("--freeze-llm", action="store_true",
                        help="--full: keep the LLM, projector and CLIP tower fixed (the answers stay exactly as "
                             "they were; SAM and text_hidden_fcs train), e.g. to add the presence head")
    parser.add_argument("--frame-sizes", default="192x256,256x192,224x224", help="synthetic frame sizes HxW,...")
    parser.add_argument("--val-data", default=None,
                        help="ReasonSeg-layout folder for periodic gIoU/cIoU (or the RefCOCO-layout folder of --val-split)")
    parser.add_argument("--val-split", default=None, metavar="DATASET|SPLITBY|SPLIT",
                        help="validate on this referring split of --val-data, e.g. refcoco|unc|val (LISA's --val_dataset)")
    parser.add_argument("--val-every", type=int, default=200)
    parser.add_argument("--val-limit", type=int, default=40)
    parser.add_argument("--val-answer", default="forced", choices=["forced", "generated"])
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/trainer_state.pt")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..engine.loading import resolve_checkpoint
    from ..engine.segmenter import LisaSegmenter
    from ..training.batches import folder_scenes, mixed_scenes, synthetic_scenes
    from ..training.trainer import TrainConfig, Trainer

    # option and data errors first, before the (slow) model load
    curriculum = _steps(args.presence_curriculum)
    sources = parse_sources(args.data)
    rates = parse_rates(args.sample_rates, len(sources))
    if args.sam_aux_weight and all(kind != "synthetic" for kind, _ in sources):
        raise InvalidArgumentError("--sam-aux-weight needs --data synthetic (it uses the scenes' object labels)")
    if args.absent_seg_per_scene and args.presence_weight <= 0:
        raise InvalidArgumentError("--absent-seg-per-scene trains the presence head: give --presence-weight > 0")
    if not 0.0 < args.presence_threshold < 1.0:
        raise InvalidArgumentError(f"--presence-threshold must be in (0, 1); got {args.presence_threshold}")
    refer = [_open_source(kind, path, args.refer_seg_data) for kind, path in sources]
    if args.val_split:
        from ..data.refcoco import open_refer_split

        if not args.val_data:
            raise InvalidArgumentError("--val-split names a referring split of --val-data: give --val-data")
        open_refer_split(args.val_data, args.val_split)  # checked now, not after the model loads
    from ..reasoner.loading import is_reasoner

    if is_reasoner(args.model):
        raise InvalidArgumentError(f"{args.model} is a reasoner (Qwen2.5-VL + SAM 2): finetune trains LISA (a "
                                   "reasoner is trained with python -m lisa_agent.reasoner.train)")
    source = resolve_checkpoint(args.model)
    seg = LisaSegmenter.from_pretrained(source, vision_tower=args.vision_tower, dtype="fp32", device="cpu")
    lr = args.lr if args.lr is not None else (3e-4 if args.method == "lora" else 1e-3)
    cfg = TrainConfig(method=args.method, steps=args.steps, lr=lr, warmup=args.warmup,
                      scenes_per_batch=args.scenes_per_batch, val_every=args.val_every, val_limit=args.val_limit,
                      save_every=args.save_every, seed=args.seed, threads=args.threads, val_answer=args.val_answer,
                      freeze_vision=args.freeze_vision, freeze_llm=args.freeze_llm, presence_weight=args.presence_weight,
                      presence_threshold=args.presence_threshold, sam_aux_weight=args.sam_aux_weight)
    if args.reinit_seg_head:
        import torch

        from ..engine.modeling.lisa import make_text_hidden_fcs

        torch.manual_seed(args.seed)
        fcs = cast(torch.nn.Sequential, seg.model.text_hidden_fcs[0])  # Linear, ReLU, Linear, Dropout
        first, last = cast(torch.nn.Linear, fcs[0]), cast(torch.nn.Linear, fcs[2])
        seg.model.text_hidden_fcs = make_text_hidden_fcs(first.in_features, last.out_features)
    trainer = Trainer(seg, source, Path(args.out), cfg, val_data=args.val_data, val_split=args.val_split)
    start = 0
    if args.resume:
        state = Path(args.out) / "trainer_state.pt"
        if not state.is_file():
            raise InvalidArgumentError(f"--resume: {state} does not exist")
        trainer.resume(state)
        start = trainer.step * cfg.scenes_per_batch
    streams = []
    for (kind, path), opened in zip(sources, refer, strict=True):
        if kind == "synthetic":
            streams.append(synthetic_scenes("train", args.seed, _sizes(args.frame_sizes), start=start,
                                            named_prob=args.named_answers, no_target=args.no_target_per_scene,
                                            named_colour=args.named_colour, describe=args.describe_per_scene,
                                            presence=args.presence_per_scene, presence_curriculum=curriculum,
                                            scenes_per_step=cfg.scenes_per_batch,
                                            absent_seg=args.absent_seg_per_scene))
        elif opened is not None:  # refer_seg
            streams.append(opened(args.seed + start))
        else:
            streams.append(folder_scenes(path, args.seed + start))
    scenes = streams[0] if len(streams) == 1 else mixed_scenes(streams, rates, args.seed + start)
    trainer.fit(scenes, progress=not args.no_progress)
    out = trainer.save()
    summary = {"out": str(out), "steps": trainer.step, "last": trainer.history[-1] if trainer.history else None}
    if args.val_data:
        summary["val"] = trainer.validate()
    print(json.dumps(summary))
    return 0


def _open_source(kind: str, path: str, refer_seg_data: str | None) -> Callable[[int], Iterator[TrainingImage]] | None:
    """Check a source before the model loads; for refer_seg, its samples as a function of the seed."""
    if kind == "reason_seg":
        from ..data.reasonseg import list_images

        if not list_images(path):
            raise InvalidArgumentError(f"no image + json pairs in {path}")
    if kind != "refer_seg":
        return None
    from ..training.batches import ReferSource

    names = None if refer_seg_data is None else [n.strip() for n in refer_seg_data.split("||") if n.strip()]
    return ReferSource(path, names).scenes  # reads the files and checks every image now
