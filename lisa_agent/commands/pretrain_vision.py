"""``lisa-agent pretrain-vision``: teach a small checkpoint's CLIP tower what each patch shows."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder, Hub id or tabletop-tiny")
    parser.add_argument("--out", required=True, help="output folder (published layout)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--scenes", type=int, default=3000, help="training scenes rendered once")
    parser.add_argument("--seed", type=int, default=9_000_000, help="first train-split scene seed")
    parser.add_argument("--new-tower", default=None, metavar="IMAGE/PATCH/WIDTH/LAYERS[/HEADS]",
                        help="start from a fresh CLIP tower of this shape (and a new projector), e.g. 224/28/192/4")
    parser.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import InvalidArgumentError
    from ..training.vision_pretrain import TowerShape, VisionPretrainConfig, pretrain_vision

    if args.steps < 1 or args.batch < 1 or args.scenes < 1:
        raise InvalidArgumentError("--steps, --batch and --scenes must be positive")
    try:
        tower = None if args.new_tower is None else TowerShape.parse(args.new_tower)
    except ValueError as exc:
        raise InvalidArgumentError(f"--new-tower: {exc}") from exc
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = VisionPretrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, scenes=args.scenes, seed=args.seed,
                               new_tower=tower)
    print(json.dumps(pretrain_vision(args.model, args.out, cfg)))
    return 0
