"""``lisa-agent finetune``: LISA's training recipe (LoRA or full) on a ReasonSeg-layout folder or the
synthetic tabletop world; checkpoints in the published layout, resumable."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import cast

from ..errors import InvalidArgumentError


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="starting checkpoint: Hub id, folder or tabletop-tiny")
    parser.add_argument("--vision-tower", default=None)
    parser.add_argument("--data", required=True,
                        help="ReasonSeg-layout folder, or 'synthetic' for endless tabletop scenes (train seeds)")
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
    parser.add_argument("--val-data", default=None, help="ReasonSeg-layout folder for periodic gIoU/cIoU")
    parser.add_argument("--val-every", type=int, default=200)
    parser.add_argument("--val-limit", type=int, default=40)
    parser.add_argument("--val-answer", default="forced", choices=["forced", "generated"])
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/trainer_state.pt")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..loading import resolve_checkpoint
    from ..segmenter import LisaSegmenter
    from ..training.batches import folder_scenes, synthetic_scenes
    from ..training.trainer import TrainConfig, Trainer

    # option errors first, before the (slow) model load
    curriculum = _steps(args.presence_curriculum)
    if args.sam_aux_weight and args.data != "synthetic":
        raise InvalidArgumentError("--sam-aux-weight needs --data synthetic (it uses the scenes' object labels)")
    if args.absent_seg_per_scene and args.presence_weight <= 0:
        raise InvalidArgumentError("--absent-seg-per-scene trains the presence head: give --presence-weight > 0")
    if not 0.0 < args.presence_threshold < 1.0:
        raise InvalidArgumentError(f"--presence-threshold must be in (0, 1); got {args.presence_threshold}")
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

        from ..modeling.lisa import make_text_hidden_fcs

        torch.manual_seed(args.seed)
        fcs = cast(torch.nn.Sequential, seg.model.text_hidden_fcs[0])  # Linear, ReLU, Linear, Dropout
        first, last = cast(torch.nn.Linear, fcs[0]), cast(torch.nn.Linear, fcs[2])
        seg.model.text_hidden_fcs = make_text_hidden_fcs(first.in_features, last.out_features)
    trainer = Trainer(seg, source, Path(args.out), cfg, val_data=args.val_data)
    start = 0
    if args.resume:
        state = Path(args.out) / "trainer_state.pt"
        if not state.is_file():
            raise InvalidArgumentError(f"--resume: {state} does not exist")
        trainer.resume(state)
        start = trainer.step * cfg.scenes_per_batch
    if args.data == "synthetic":
        scenes = synthetic_scenes("train", args.seed, _sizes(args.frame_sizes), start=start,
                                  named_prob=args.named_answers, no_target=args.no_target_per_scene,
                                  named_colour=args.named_colour, describe=args.describe_per_scene,
                                  presence=args.presence_per_scene,
                                  presence_curriculum=curriculum,
                                  scenes_per_step=cfg.scenes_per_batch, absent_seg=args.absent_seg_per_scene)
    else:
        scenes = folder_scenes(args.data, args.seed + start)
    trainer.fit(scenes, progress=not args.no_progress)
    out = trainer.save()
    summary = {"out": str(out), "steps": trainer.step, "last": trainer.history[-1] if trainer.history else None}
    if args.val_data:
        summary["val"] = trainer.validate()
    print(json.dumps(summary))
    return 0
