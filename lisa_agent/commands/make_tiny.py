"""``lisa-agent make-tiny OUT_DIR``: a tiny random-weight LISA checkpoint in the published layout."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--safetensors", action="store_true", help="one model.safetensors instead of 2 .bin shards")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "tabletop"],
                        help="tiny (~0.3M parameters) or tabletop (~3M, the bundled model's shape, tokenizer "
                             "trained on the tabletop world's queries)")


def run(args: argparse.Namespace) -> int:
    from ..engine.tiny import make_tiny_checkpoint

    if args.shape == "tabletop":
        from ..training.recipe import TABLETOP_SHAPE, tabletop_corpus

        path = make_tiny_checkpoint(args.out_dir, seed=args.seed, safetensors=args.safetensors,
                                    shape=TABLETOP_SHAPE, corpus=tabletop_corpus(), vocab_size=1000)
    else:
        path = make_tiny_checkpoint(args.out_dir, seed=args.seed, safetensors=args.safetensors)
    print(f"wrote a tiny RANDOM-WEIGHT LISA checkpoint to {path} (for plumbing tests; it segments nothing useful)")
    return 0
