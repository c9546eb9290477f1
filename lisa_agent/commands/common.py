"""Arguments and helpers shared by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InvalidImageError


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None = None, gate: bool = True) -> None:
    """--model, --vision-tower, --device, --dtype, --quantization (and --presence-threshold with ``gate``)."""
    parser.add_argument("--model", default=default_model, required=default_model is None,
                        help="Hub id (xinlai/LISA-7B-v1), checkpoint folder, or 'tabletop-tiny'")
    parser.add_argument("--vision-tower", default=None, help="CLIP tower id or folder (default: from the checkpoint)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--quantization", default=None, choices=["8bit", "4bit"], help="LLM quantization (CUDA)")
    add_mask_tta_argument(parser)
    if not gate:
        return
    parser.add_argument("--presence-threshold", default="checkpoint", type=presence_threshold, metavar="T",
                        help="presence gate of checkpoints that have one: 'checkpoint' (its own threshold, "
                             "default), a number in (0, 1), or 'off'")


#: ``checkpoint`` and ``lisa_agent.segmenter.MASK_TTA``'s keys (not imported: the CLI starts without torch)
MASK_TTA_CHOICES = ("checkpoint", "off", "hflip", "flips")


def add_mask_tta_argument(parser: argparse.ArgumentParser) -> None:
    """--mask-tta (see ``LisaSegmenter.from_pretrained``)."""
    parser.add_argument("--mask-tta", default="checkpoint", choices=MASK_TTA_CHOICES,
                        help="mask test-time augmentation: 'checkpoint' (what the checkpoint declares; off for "
                             "published LISA, default), off, hflip (+ the mirrored frame) or flips (+ mirrored, "
                             "upside-down and both; for cameras looking down)")


def presence_threshold(text: str) -> float | str | None:
    """``--presence-threshold`` values: 'checkpoint', 'off' (None) or a float (range checked on load)."""
    if text in ("checkpoint", "off"):
        return None if text == "off" else text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'checkpoint', 'off' or a number, got {text!r}") from None


def load_segmenter(args: argparse.Namespace):  # noqa: ANN201
    from ..segmenter import LisaSegmenter

    dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    return LisaSegmenter.from_pretrained(args.model, vision_tower=args.vision_tower, dtype=dtype,
                                         device=args.device, quantization=args.quantization,
                                         presence_threshold=getattr(args, "presence_threshold", "checkpoint"),
                                         mask_tta=getattr(args, "mask_tta", "checkpoint"))


def read_image(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB; raises InvalidImageError naming the file when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise InvalidImageError(f"image file {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidImageError(f"cannot read {str(path)!r} as an image: {exc}") from None


def write_image(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
