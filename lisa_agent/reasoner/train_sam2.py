"""Train a tiny transformers SAM 2 (``Sam2Model``) on the synthetic tabletop world to turn a box plus one point
inside an object into that object's mask, prompted exactly as
:meth:`~lisa_agent.reasoner.segmenter.ReasonerSegmenter.masks_for` prompts SAM 2.

What a training step sees (:func:`make_batch`, :func:`sam2_loss`):

- frames of the tabletop world (:func:`lisa_agent.data.tabletop.render_scene`, training seeds only, the default
  frame sizes 480 x 640, 640 x 480 and 512 x 512), each object's prompt the object's box jittered by a few % of
  its side (rounded to int pixels, clipped into the frame) and one point inside its mask (a random interior
  pixel, or the mask's most interior pixel), all in frame pixels and passed through the checkpoint's
  ``Sam2Processor`` as at inference (box, point with label 1);
- ``multimask_output=True``: SAM 2's three masks per prompt, their low-resolution logits upsampled (bilinear, as
  ``post_process_masks`` does) to the processor's square and compared with the object's mask resized to that
  square (area-averaged: a soft target);
- SAM's min-over-outputs loss: per output BCE + Dice, only the best of the three is back-propagated; the IoU
  head regresses the true IoU of every output (that head picks the mask kept at inference); the object-score
  head (unused for images) is told the object is present (BCE, target 1).

The IoU head is regressed with a cross-entropy against the true IoU as a soft target, not SAM's MSE / SAM 2's
L1: all three have their minimum at the true IoU, but the head ends in a sigmoid, and early in training from
scratch (true IoUs near 0) MSE or L1 under Adam drove it deep into the sigmoid's flat tail, where its gradient
vanished and it predicted ~1e-5 for every mask (seen in a first run); the cross-entropy's gradient at the
logit is ``predicted - true`` and never vanishes.

Frames are rendered into a pool (one new scene per step by default) from which batches are drawn, so rendering
(~80 ms a frame) does not dominate a step.

Usage (the shipped checkpoint's run: ``lisa_agent/assets/tabletop-sam2-tiny/MODEL_CARD.md``)::

    python -m lisa_agent.reasoner.train_sam2 --out runs/sam2 --steps 100000 --minutes 48 --warmup 100 --seed 10
    python -m lisa_agent.reasoner.train_sam2 --out runs/sam2 --steps 5000 --seed 0 --threads 1
    python -m lisa_agent.reasoner.train_sam2 --out runs/sam2b --init runs/sam2/best --steps 2000 --lr 3e-4

``OUT/last`` (every ``--save-every`` steps), ``OUT/best`` (best validation IoU, when ``--val-every`` > 0) and
``OUT/final`` are checkpoints :func:`~lisa_agent.reasoner.loading.load_sam2` loads; ``OUT/log.jsonl`` holds the
training and validation records. :func:`evaluate` measures a checkpoint on a split.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: The processor's square (pixels): frames are resized to IMAGE_SIZE x IMAGE_SIZE; masks come out at a quarter.
IMAGE_SIZE = 256
#: The square (pixels) the loss compares masks in: the logits upsampled to it, the true masks area-resized to it.
LOSS_SIZE = 128
#: How many random interior pixels of each object are kept for point sampling.
INTERIOR_SAMPLES = 256


# ---------------------------------------------------------------------------------------------------------------
# The shape
# ---------------------------------------------------------------------------------------------------------------
def tabletop_sam2_config(image_size: int = IMAGE_SIZE) -> Any:
    """The ``Sam2Config`` of the tabletop SAM 2: a 4-stage Hiera (widths 16 / 32 / 64 / 128, 1 / 2 / 3 / 1
    blocks, 8-pixel windows, the last block of stage 3 global) at ``image_size`` px, an FPN and a prompt encoder /
    mask decoder 64 wide (2 two-way layers, 4 heads, MLP 256). About 0.58M parameters."""
    from transformers import Sam2Config

    grid = image_size // 4
    return Sam2Config(
        vision_config={
            "backbone_config": {"model_type": "sam2_hiera_det_model", "hidden_size": 16, "num_attention_heads": 1,
                                "image_size": [image_size, image_size], "blocks_per_stage": [1, 2, 3, 1],
                                "embed_dim_per_stage": [16, 32, 64, 128], "num_attention_heads_per_stage": [1, 1, 2, 4],
                                "window_size_per_stage": [8, 8, 8, 8], "global_attention_blocks": [5],
                                "window_positional_embedding_background_size": [4, 4]},
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[grid, grid], [grid // 2, grid // 2], [grid // 4, grid // 4]],
            "fpn_hidden_size": 64},
        prompt_encoder_config={"hidden_size": 64, "image_size": image_size, "patch_size": 16, "mask_input_channels": 8},
        mask_decoder_config={"hidden_size": 64, "mlp_dim": 256, "num_attention_heads": 4, "iou_head_hidden_dim": 64})


def tie_positional_embeddings(model: Any) -> bool:
    """Give the prompt encoder the image's random Fourier basis (``shared_image_embedding``); returns whether
    they differed.

    SAM 2 encodes the positions of image tokens and of prompt points with one random Fourier basis (one
    ``PositionEmbeddingRandom`` in the original; the published transformers conversions hold the same values in
    both buffers), so that a point's code matches the codes of the image tokens at its place. A randomly
    initialised transformers ``Sam2Model`` draws two independent bases (``shared_image_embedding`` and
    ``prompt_encoder.shared_embedding``, both non-trainable buffers): a point's position then means nothing to
    the image tokens, and a first run learned to segment every object in the frame while ignoring the prompt.
    Both buffers are saved, so a tied checkpoint stays tied when loaded."""
    image = model.shared_image_embedding.positional_embedding
    prompt = model.prompt_encoder.shared_embedding.positional_embedding
    differed = not torch.equal(image, prompt)
    with torch.no_grad():
        prompt.copy_(image)
    return differed


def align_decoder_attention(model: Any, gain: float) -> int:
    """Start every attention of the mask decoder's two-way transformer with equal query and key projections
    (one random orthogonal matrix times ``gain``, zero biases); returns how many were set.

    Why: with transformers' default init (normal, std 0.02) the decoder's attention is uniform, so a prompt's
    position reaches every image token alike; trained from scratch, the decoder found it easier to segment every
    object in the frame and learned to ignore the prompt entirely (the masks' spread across prompts of one frame
    was 0.1% of their spread overall, in two runs). Equal projections make ``q . k`` a positive semi-definite
    form, under which a token's positional code (the tied Fourier bases: :func:`tie_positional_embeddings`)
    matches those of the image tokens at the same place: attention starts out local to the prompt."""
    from transformers.models.sam2.modeling_sam2 import Sam2Attention

    count = 0
    for module in model.mask_decoder.transformer.modules():
        if isinstance(module, Sam2Attention):
            with torch.no_grad():
                torch.nn.init.orthogonal_(module.q_proj.weight, gain=gain)
                module.k_proj.weight.copy_(module.q_proj.weight)
                module.q_proj.bias.zero_()
                module.k_proj.bias.zero_()
            count += 1
    return count


def torch_default_init(module: torch.nn.Module) -> int:
    """Re-draw every linear, convolution and embedding layer under ``module`` with PyTorch's own default
    initialisation (``reset_parameters``: Kaiming-uniform weights, N(0, 1) embeddings), as the original SAM 2 code
    leaves its prompt encoder and mask decoder; returns how many layers were re-drawn.

    transformers initialises them with N(0, 0.02), several times smaller: through the decoder's attention
    (a product of query and key projections) and its three-layer hypernetwork MLPs, a prompt's position then
    starts with almost no say over the mask, and the decoder learned objectness without ever using the prompt."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Embedding)
    count = 0
    for layer in module.modules():
        if isinstance(layer, kinds):
            layer.reset_parameters()
            count += 1
    return count


def init_tabletop_sam2(seed: int = 0, image_size: int = IMAGE_SIZE, *, torch_init: bool = True,
                       align_gain: float = 1.0) -> Any:
    """A randomly initialised tabletop ``Sam2Model`` (:func:`tabletop_sam2_config`), as training starts from it:
    ``torch.manual_seed(seed)``, transformers' init, then (``torch_init``) PyTorch's default init for the prompt
    encoder and mask decoder (:func:`torch_default_init`), (``align_gain`` > 0) equal query / key projections
    in the decoder's attention (:func:`align_decoder_attention`), and the two positional bases tied
    (:func:`tie_positional_embeddings`). The defaults are the shipped checkpoint's recipe."""
    from transformers import Sam2Model

    torch.manual_seed(seed)
    model = Sam2Model(tabletop_sam2_config(image_size))
    if torch_init:
        torch_default_init(model.prompt_encoder)
        torch_default_init(model.mask_decoder)
    if align_gain:
        align_decoder_attention(model, align_gain)
    tie_positional_embeddings(model)
    return model


def make_tabletop_sam2(out_dir: str | Path, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    """Write the untrained tabletop SAM 2 (:func:`init_tabletop_sam2` with ``seed``: the shipped checkpoint's
    shape and initialisation) and its ``Sam2Processor`` (``image_size`` square) to ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    init_tabletop_sam2(seed, image_size).eval().save_pretrained(out)
    make_processor(image_size).save_pretrained(out)
    return out


def make_processor(image_size: int = IMAGE_SIZE) -> Any:
    """A ``Sam2Processor`` resizing frames to ``image_size`` x ``image_size`` (coordinates scaled to match)."""
    from transformers import Sam2ImageProcessor, Sam2Processor

    return Sam2Processor(image_processor=Sam2ImageProcessor(size={"height": image_size, "width": image_size}))


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedScene:
    """A rendered scene reduced to what training needs.

    Attributes:
        image: H x W x 3 uint8 RGB frame.
        targets: N x T x T float16 object masks resized (area average) to the loss's T x T square (the
            processor's square at a lower resolution: the frame resized without keeping its aspect ratio).
        boxes: N x 4 int64 inclusive (x1, y1, x2, y2) boxes of the masks, frame pixels.
        centers: N x 2 int64 (x, y) of each mask's most interior pixel (largest distance to the background).
        interior: per object an M x 2 int64 array of random (x, y) pixels inside its mask (M <= INTERIOR_SAMPLES).
    """

    image: np.ndarray
    targets: np.ndarray
    boxes: np.ndarray
    centers: np.ndarray
    interior: list[np.ndarray]


def most_interior_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of ``mask`` (H x W bool) farthest from the background (the frame's edge counts as
    background)."""
    import cv2

    padded = np.pad(mask.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def prepare_scene(scene: Any, target_size: int = LOSS_SIZE, rng: np.random.Generator | None = None
                  ) -> PreparedScene:
    """Reduce a :class:`~lisa_agent.data.tabletop.Scene` to a :class:`PreparedScene` (targets at
    ``target_size``; interior pixels drawn with ``rng``, default the scene's seed)."""
    import cv2

    rng = np.random.default_rng(scene.seed) if rng is None else rng
    targets, boxes, centers, interior = [], [], [], []
    for obj in scene.objects:
        mask = obj.mask
        targets.append(cv2.resize(mask.astype(np.float32), (target_size, target_size), interpolation=cv2.INTER_AREA))
        boxes.append(obj.bbox)
        centers.append(most_interior_point(mask))
        ys, xs = np.nonzero(mask)
        pick = rng.choice(len(xs), size=min(INTERIOR_SAMPLES, len(xs)), replace=False)
        interior.append(np.stack([xs[pick], ys[pick]], axis=1).astype(np.int64))
    return PreparedScene(scene.image, np.stack(targets).astype(np.float16), np.asarray(boxes, np.int64),
                         np.asarray(centers, np.int64), interior)


def jitter_box(box: Sequence[int], frame_hw: tuple[int, int], rng: np.random.Generator, jitter: float
               ) -> list[int]:
    """``box`` (inclusive x1, y1, x2, y2) with each side moved by N(0, ``jitter`` x the box's side) pixels
    (at most 2.5 sigma), rounded, clipped into the frame, corners kept ordered."""
    x1, y1, x2, y2 = (float(v) for v in box)
    h, w = frame_hw
    sx, sy = jitter * (x2 - x1 + 1), jitter * (y2 - y1 + 1)
    noise = np.clip(rng.normal(0.0, 1.0, 4), -2.5, 2.5) * np.array([sx, sy, sx, sy])
    nx1, ny1, nx2, ny2 = (int(round(v)) for v in (x1 + noise[0], y1 + noise[1], x2 + noise[2], y2 + noise[3]))
    nx1, nx2 = min(max(nx1, 0), w - 1), min(max(nx2, 0), w - 1)
    ny1, ny2 = min(max(ny1, 0), h - 1), min(max(ny2, 0), h - 1)
    if nx2 <= nx1 or ny2 <= ny1:
        return [int(v) for v in box]
    return [nx1, ny1, nx2, ny2]


@dataclass
class Batch:
    """One training batch: the processor's tensors and the targets.

    Attributes:
        inputs: the ``Sam2Processor`` output: ``pixel_values`` B x 3 x S x S float32, ``input_boxes`` B x K x 4,
            ``input_points`` B x K x 1 x 2 float32, ``input_labels`` B x K x 1 int64, ``original_sizes`` B x 2.
        targets: B x K x T x T float32 soft masks in [0, 1] (the processor's square at the loss's resolution).
    """

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor


def make_batch(items: Sequence[PreparedScene], processor: Any, rng: np.random.Generator, *, objects: int = 3,
               jitter: float = 0.04, center_prob: float = 0.3) -> Batch:
    """Prompt ``objects`` objects of every scene in ``items`` (drawn without replacement when the scene has as
    many, else with) with a jittered box and one interior point (the most interior pixel with probability
    ``center_prob``, else a random interior pixel), all through ``processor`` as at inference."""
    boxes: list[list[list[int]]] = []
    points: list[list[list[list[int]]]] = []
    targets = []
    for item in items:
        n = len(item.boxes)
        chosen = rng.choice(n, size=objects, replace=n < objects)
        frame_hw = (int(item.image.shape[0]), int(item.image.shape[1]))
        boxes.append([jitter_box(item.boxes[k], frame_hw, rng, jitter) for k in chosen])
        pts = []
        for k in chosen:
            if rng.random() < center_prob:
                x, y = item.centers[k]
            else:
                x, y = item.interior[k][int(rng.integers(len(item.interior[k])))]
            pts.append([[int(x), int(y)]])
        points.append(pts)
        targets.append(item.targets[chosen])
    labels = [[[1] for _ in range(objects)] for _ in items]
    inputs = processor(images=[item.image for item in items], input_boxes=boxes, input_points=points,
                       input_labels=labels, return_tensors="pt")
    return Batch(dict(inputs), torch.from_numpy(np.stack(targets).astype(np.float32)))


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------
def sam2_loss(out: Any, targets: torch.Tensor, *, dice_weight: float = 1.0, iou_weight: float = 1.0,
              object_weight: float = 0.1, all_outputs_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """SAM's multimask loss for a ``Sam2Model`` output with ``multimask_output=True``.

    Args:
        out: the model's output: ``pred_masks`` B x K x 3 x g x g logits, ``iou_scores`` B x K x 3 in [0, 1],
            ``object_score_logits`` B x K x 1.
        targets: B x K x T x T float32 soft masks in [0, 1]: the processor's square at the loss's resolution T
            (the logits are upsampled bilinearly to T x T, as ``post_process_masks`` upsamples them to the frame).
        dice_weight, iou_weight, object_weight: weights of the Dice, IoU-head and object-score terms.
        all_outputs_weight: weight of the mask loss averaged over all three outputs, added to the best output's
            (0: SAM's pure min-over-outputs). From scratch the min alone let the three outputs specialise in
            object shapes while ignoring the prompt (a first run); this term pushes every output to the
            prompted object.

    Returns:
        ``loss`` (scalar, to back-propagate), its parts ``mask`` (BCE + Dice of the best output, mean over
        prompts), ``iou_head`` (cross-entropy of the predicted IoU against the true IoU, all outputs), ``iou_l1``
        (their mean absolute difference, no gradient) and ``object``, and (no gradient) ``iou_best`` / ``iou_kept``: the mean true IoU of
        the best output and of the output the IoU head picks, and ``true_iou`` B x K x 3.
    """
    logits = out.pred_masks.float()
    b, k, m, g, _ = logits.shape
    size = targets.shape[-1]
    up = F.interpolate(logits.reshape(b * k, m, g, g), size=(size, size), mode="bilinear", align_corners=False)
    target = targets.reshape(b * k, 1, size, size).expand(-1, m, -1, -1)
    bce = F.binary_cross_entropy_with_logits(up, target, reduction="none").mean(dim=(2, 3))
    prob = up.sigmoid()
    inter = (prob * target).sum(dim=(2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) + 1.0)
    per_output = bce + dice_weight * dice                                      # (B*K, 3)
    best = per_output.detach().argmin(dim=1, keepdim=True)
    mask_loss = per_output.gather(1, best).mean()
    if all_outputs_weight:
        mask_loss = mask_loss + all_outputs_weight * per_output.mean()
    with torch.no_grad():
        hard, truth = up > 0, target > 0.5
        union = (hard | truth).sum(dim=(2, 3)).float()
        true_iou = torch.where(union > 0, (hard & truth).sum(dim=(2, 3)).float() / union.clamp(min=1), 1.0)
    pred_iou = out.iou_scores.float().reshape(b * k, m)
    # cross-entropy against the soft target: its gradient at the head's logit is (pred - true), see the docstring
    iou_loss = F.binary_cross_entropy(pred_iou.clamp(1e-6, 1 - 1e-6), true_iou)
    obj = out.object_score_logits.float()
    obj_loss = F.binary_cross_entropy_with_logits(obj, torch.ones_like(obj))
    loss = mask_loss + iou_weight * iou_loss + object_weight * obj_loss
    kept = pred_iou.detach().argmax(dim=1, keepdim=True)
    return {"loss": loss, "mask": mask_loss.detach(), "iou_head": iou_loss.detach(),
            "iou_l1": (pred_iou.detach() - true_iou).abs().mean(), "object": obj_loss.detach(),
            "iou_best": true_iou.gather(1, best).mean(), "iou_kept": true_iou.gather(1, kept).mean(),
            "true_iou": true_iou.reshape(b, k, m)}


def train_step(model: Any, batch: Batch, optimizer: torch.optim.Optimizer, *, clip: float = 1.0,
               **loss_kwargs: float) -> dict[str, float]:
    """One optimisation step on ``batch``; returns the loss parts as floats (see :func:`sam2_loss`)."""
    model.train()
    inputs = batch.inputs
    out = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                input_points=inputs["input_points"], input_labels=inputs["input_labels"], multimask_output=True)
    parts = sam2_loss(out, batch.targets, **loss_kwargs)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in parts.items() if k != "true_iou"}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def evaluate(sam_dir: str | Path, split: str = "val", scenes: int = 24, *, start: int = 0,
             point: str = "center", threads: int | None = None) -> dict[str, Any]:
    """Mean IoU of the kept mask against the true mask over every object of ``scenes`` scenes of ``split``
    (indices ``start`` ...), the checkpoint loaded with :func:`~lisa_agent.reasoner.loading.load_sam2` (fp32,
    CPU) and prompted through :meth:`ReasonerSegmenter.masks_for` itself: the object's true box and one point
    inside it (``point="center"``: the mask's most interior pixel; ``"random"``: a random interior pixel drawn
    from the scene's seed), label 1, three masks, the best-scored kept, logits thresholded at 0.

    Returns ``mean_iou``, ``frac_iou_05`` (fraction of objects with IoU >= 0.5), ``objects``, ``scenes``,
    ``per_category`` (mean IoU per category) and ``seconds``.
    """
    from ..data.tabletop import render_scene, split_seed
    from .loading import load_sam2
    from .parsing import ReasonerObject
    from .segmenter import ReasonerSegmenter

    if threads is not None:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    sam, processor = load_sam2(str(sam_dir), torch.float32, torch.device("cpu"))
    # masks_for only reads the reasoning model's device: a one-parameter stand-in on the CPU
    segmenter = ReasonerSegmenter(torch.nn.Linear(1, 1), None, sam, processor)
    ious: list[float] = []
    per_category: dict[str, list[float]] = {}
    for i in range(int(scenes)):
        scene = render_scene(split_seed(split, start + i))
        rng = np.random.default_rng(scene.seed)
        objects = []
        for obj in scene.objects:
            if point == "center":
                px, py = most_interior_point(obj.mask)
            else:
                ys, xs = np.nonzero(obj.mask)
                j = int(rng.integers(len(xs)))
                px, py = int(xs[j]), int(ys[j])
            x1, y1, x2, y2 = (int(v) for v in obj.bbox)
            objects.append(ReasonerObject(box=(x1, y1, x2, y2), points=((px, py),),
                                          model_box=(float(x1), float(y1), float(x2), float(y2))))
        with torch.inference_mode():
            masks, _, _ = segmenter.masks_for(scene.image, objects)
        for obj, mask in zip(scene.objects, masks, strict=True):
            union = int((mask | obj.mask).sum())
            iou = float((mask & obj.mask).sum()) / union if union else 1.0
            ious.append(iou)
            per_category.setdefault(obj.category, []).append(iou)
    arr = np.asarray(ious)
    return {"mean_iou": float(arr.mean()), "frac_iou_05": float((arr >= 0.5).mean()), "objects": len(ious),
            "scenes": int(scenes), "split": split, "start": int(start), "point": point,
            "per_category": {k: round(float(np.mean(v)), 4) for k, v in sorted(per_category.items())},
            "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(model: Any, processor: Any, path: Path) -> None:
    """``save_pretrained`` of the model (safetensors) and its processor to ``path``, replacing it atomically."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def lr_at(step: int, progress: float, lr: float, warmup: int, final: float = 0.05) -> float:
    """Linear warm-up over the first ``warmup`` steps, then cosine decay from ``lr`` to ``final`` x ``lr`` as
    ``progress`` (the run's done fraction, 0-1) goes to 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, max(0.0, progress))
    return lr * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lisa_agent.reasoner.train_sam2", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run folder (last/, best/, final/, log.jsonl)")
    p.add_argument("--steps", type=int, required=True, help="optimisation steps (the schedule's length)")
    p.add_argument("--minutes", type=float, default=None,
                   help="also a wall-time budget: the schedule follows whichever of steps and minutes runs out "
                        "first, and training stops there")
    p.add_argument("--seed", type=int, default=0, help="random init, prompts and training scenes (0-98)")
    p.add_argument("--init", default=None, help="start from this checkpoint instead of a random init")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reinit-iou-head", action="store_true", help="fresh random weights for the IoU head")
    p.add_argument("--blank-steps", type=int, default=0,
                   help="curriculum: for the first N steps the frames are blanked (pixel_values 0, the mean "
                        "colour), so only the prompt says where the object is")
    p.add_argument("--torch-init-decoder", action=argparse.BooleanOptionalAction, default=True,
                   help="at a random init, PyTorch's default init for the prompt encoder and mask decoder "
                        "(default; --no-torch-init-decoder: transformers' N(0, 0.02), which left the prompt unused)")
    p.add_argument("--align-attention", type=float, default=1.0,
                   help="gain of equal query / key projections for the decoder's attention at a random init "
                        "(default 1, the shipped recipe; 0: transformers' init)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=8, help="scenes per step")
    p.add_argument("--objects", type=int, default=3, help="prompted objects per scene")
    p.add_argument("--jitter", type=float, default=0.04, help="box jitter, fraction of the box's side (sigma)")
    p.add_argument("--center-prob", type=float, default=0.3, help="chance the point is the most interior pixel")
    p.add_argument("--pool", type=int, default=384, help="rendered scenes kept for drawing batches")
    p.add_argument("--render-per-step", type=int, default=1, help="new scenes rendered into the pool per step")
    p.add_argument("--loss-size", type=int, default=LOSS_SIZE, help="square the masks are compared in (pixels)")
    p.add_argument("--dice-weight", type=float, default=1.0)
    p.add_argument("--all-outputs-weight", type=float, default=0.0,
                   help="weight of the mask loss of all three outputs, added to the best one's")
    p.add_argument("--iou-weight", type=float, default=1.0)
    p.add_argument("--val-every", type=int, default=1000, help="validate (and keep best/) every N steps; 0: never")
    p.add_argument("--val-scenes", type=int, default=24)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--deadline", default=None, help="stop (saving) at this UTC time, HH:MM, if not done")
    return p.parse_args(argv)


def _deadline(text: str | None) -> float | None:
    if not text:
        return None
    import datetime as dt

    hh, mm = (int(v) for v in text.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    when = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if when < now - dt.timedelta(hours=12):
        when += dt.timedelta(days=1)
    return when.timestamp()


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run training as ``args`` (:func:`parse_args`) say; returns the last validation record (or {})."""
    import cv2
    from transformers import Sam2Model, Sam2Processor

    from ..data.tabletop import render_scene, split_seed

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    if not 0 <= args.seed < 99:
        raise SystemExit("--seed must be in [0, 99) (it also picks the training scenes)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.init:
        model = Sam2Model.from_pretrained(args.init, dtype=torch.float32)
        processor = Sam2Processor.from_pretrained(args.init)
    else:
        model = init_tabletop_sam2(args.seed, torch_init=args.torch_init_decoder, align_gain=args.align_attention)
        processor = make_processor()
    if args.reinit_iou_head:
        for module in model.mask_decoder.iou_prediction_head.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
    tied = tie_positional_embeddings(model)
    size = int(processor.image_processor.size["height"])
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    deadline = _deadline(args.deadline)
    log = (out / "log.jsonl").open("a")

    def record(entry: dict[str, Any]) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()
        print(json.dumps(entry), flush=True)

    record({"event": "start", "argv": sys.argv, "params": params, "image_size": size, "tied_positional_bases": tied,
            **vars(args)})
    next_scene = args.seed * 100_000

    def render() -> PreparedScene:
        nonlocal next_scene
        scene = render_scene(split_seed("train", next_scene))
        next_scene += 1
        return prepare_scene(scene, args.loss_size, rng)

    pool = [render() for _ in range(min(args.pool, max(args.batch * 4, 32)))]
    t_start = time.perf_counter()
    sums: dict[str, float] = {}
    best_val, last_val = -1.0, {}
    step = 0
    budget = None if args.minutes is None else args.minutes * 60.0
    for step in range(args.steps):
        progress = step / args.steps
        if budget is not None:
            progress = max(progress, (time.perf_counter() - t_start) / budget)
            if progress >= 1.0:
                record({"event": "budget", "step": step})
                step -= 1
                break
        for _ in range(args.render_per_step):
            if len(pool) < args.pool:
                pool.append(render())
            else:
                pool[int(rng.integers(len(pool)))] = render()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress, args.lr, args.warmup)
        items = [pool[int(i)] for i in rng.choice(len(pool), size=args.batch, replace=False)]
        batch = make_batch(items, processor, rng, objects=args.objects, jitter=args.jitter,
                           center_prob=args.center_prob)
        if step < args.blank_steps:
            batch.inputs["pixel_values"] = torch.zeros_like(batch.inputs["pixel_values"])
        parts = train_step(model, batch, optimizer, dice_weight=args.dice_weight, iou_weight=args.iou_weight,
                           all_outputs_weight=args.all_outputs_weight)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        done = step + 1
        if done % args.log_every == 0:
            elapsed = time.perf_counter() - t_start
            record({"event": "train", "step": done, "lr": round(optimizer.param_groups[0]["lr"], 6),
                    **{k: round(v / args.log_every, 4) for k, v in sums.items()},
                    "progress": round(progress, 4), "s_per_step": round(elapsed / done, 3), "minutes": round(elapsed / 60, 2), "scenes": next_scene})
            sums = {}
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint(model.eval(), processor, out / "last")
        if args.val_every and (done % args.val_every == 0 or done == args.steps):
            save_checkpoint(model.eval(), processor, out / "last")
            last_val = evaluate(out / "last", "val", args.val_scenes)
            torch.set_num_threads(args.threads)
            record({"event": "val", "step": done, **last_val})
            if last_val["mean_iou"] > best_val:
                best_val = last_val["mean_iou"]
                shutil.rmtree(out / "best", ignore_errors=True)
                shutil.copytree(out / "last", out / "best")
        if deadline is not None and time.time() > deadline:
            record({"event": "deadline", "step": done})
            break
    save_checkpoint(model.eval(), processor, out / "final")
    if args.val_every and step + 1 > 0 and (step + 1) % args.val_every and step + 1 != args.steps:
        last_val = evaluate(out / "final", "val", args.val_scenes)
        record({"event": "val", "step": step + 1, "checkpoint": "final", **last_val})
        if last_val["mean_iou"] > best_val:
            best_val = last_val["mean_iou"]
            shutil.rmtree(out / "best", ignore_errors=True)
            shutil.copytree(out / "final", out / "best")
    record({"event": "end", "step": step + 1, "minutes": round((time.perf_counter() - t_start) / 60, 2),
            "best_val_mean_iou": best_val})
    log.close()
    return last_val


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (:func:`parse_args`)."""
    train(parse_args(argv))


if __name__ == "__main__":
    main()


__all__ = ["IMAGE_SIZE", "LOSS_SIZE", "Batch", "PreparedScene", "evaluate", "jitter_box", "lr_at", "make_batch",
           "align_decoder_attention", "init_tabletop_sam2", "make_processor", "make_tabletop_sam2",
           "torch_default_init", "most_interior_point", "prepare_scene", "sam2_loss",
           "tabletop_sam2_config", "tie_positional_embeddings", "train", "train_step"]
