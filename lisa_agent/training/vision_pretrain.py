"""Pre-train a small CLIP vision tower on the tabletop world, as CLIP is pre-trained before LISA.

LISA's CLIP ViT-L/14 comes pre-trained on image-text pairs; its patch features already say what is
where. A tower trained from scratch only through LISA's losses does not learn that: a linear probe
on the features of the first tabletop-tiny model predicted which categories are in a frame at chance
level, so its language model could not tell what is (or is not) on the table. This stage teaches
the tower (and the ``mm_projector`` after it) what each patch shows: for every patch of the CLIP
crop, the share of it covered by each category and by each colour, learned with a linear head and
binary cross-entropy on those soft targets. The head is thrown away; the checkpoint keeps the
published layout with the new ``vision_tower/`` and projector.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.knowledge import CATEGORIES, COLOURS
from ..data.tabletop import Scene, render_scene, split_seed
from ..engine.preprocess import clip_crop_geometry, clip_preprocess


@dataclass
class VisionPretrainConfig:
    """Hyper-parameters: ``scenes`` rendered once (train split, from ``seed``), ``steps`` Adam steps
    of ``batch`` crops at ``lr`` (linear decay to 0)."""

    steps: int = 2000
    batch: int = 32
    lr: float = 1e-3
    scenes: int = 3000
    seed: int = 9_000_000
    sizes: tuple[tuple[int, int], ...] = ((192, 256), (256, 192), (224, 224), (240, 320), (320, 240))
    new_tower: TowerShape | None = None  # replace the tower (and projector) with a fresh one first


@dataclass(frozen=True)
class TowerShape:
    """A CLIP ViT's shape: ``image`` px square input cut in ``patch`` px patches, ``width`` wide,
    ``layers`` deep, ``heads`` attention heads. ``(image // patch) ** 2`` image tokens reach the LLM."""

    image: int
    patch: int
    width: int
    layers: int
    heads: int = 4

    @classmethod
    def parse(cls, text: str) -> TowerShape:
        """``"IMAGE/PATCH/WIDTH/LAYERS[/HEADS]"``, e.g. ``"224/28/192/4"``; ValueError names what is wrong."""
        parts = text.split("/")
        try:
            values = [int(v) for v in parts]
        except ValueError:
            values = []
        if len(values) not in (4, 5) or min(values) < 1:
            raise ValueError(f"tower shape must be IMAGE/PATCH/WIDTH/LAYERS[/HEADS] positive integers, got {text!r}")
        shape = cls(*values)
        if shape.image % shape.patch:
            raise ValueError(f"image size {shape.image} is not a multiple of the patch size {shape.patch}")
        if shape.width % shape.heads:
            raise ValueError(f"width {shape.width} is not a multiple of {shape.heads} heads")
        if shape.layers < 2:
            raise ValueError("the tower needs at least 2 layers (LISA reads the features of layer -2)")
        return shape


def replace_vision_tower(model: Any, shape: TowerShape, seed: int) -> None:
    """Give ``model`` (a :class:`~lisa_agent.engine.modeling.lisa.LisaModel`) a freshly initialised CLIP tower of
    ``shape`` and a new ``mm_projector`` from its width to the LLM's; the LLM, SAM and [SEG] head keep
    their weights. Same feature choice (layer, CLS dropped or not) as the tower it replaces."""
    from transformers import CLIPVisionModel

    from ..engine.modeling.clip import ClipPatchFeatures
    from ..engine.tiny import clip_vision_config

    old = model.vision
    torch.manual_seed(seed)
    cfg = clip_vision_config(shape.image, shape.patch, shape.width, shape.layers, shape.heads)
    vision = ClipPatchFeatures(CLIPVisionModel(cfg), old.select_layer, old.select_feature)
    model.attach_vision(vision.to(model.device))
    model.mm_projector = torch.nn.Linear(shape.width, model.mm_projector.out_features).to(model.device)


LABELS: tuple[str, ...] = tuple(CATEGORIES) + tuple(COLOURS)


def patch_targets(scene: Scene, size: int, grid: int) -> np.ndarray:
    """(grid * grid, len(LABELS)) float32: per CLIP patch (row-major), the share of it covered by
    each category and each colour, seen through the same resize and centre crop as the frame."""
    h, w = scene.image.shape[:2]
    nh, nw, top, left = clip_crop_geometry(h, w, size)
    out = np.zeros((grid * grid, len(LABELS)), np.float32)
    cell = size // grid
    for obj in scene.objects:
        m = Image.fromarray(obj.mask.astype(np.uint8) * 255).resize((nw, nh), Image.Resampling.BILINEAR)
        crop = np.asarray(m, np.float32)[top: top + size, left: left + size] / 255.0
        cover = crop[: grid * cell, : grid * cell].reshape(grid, cell, grid, cell).mean(axis=(1, 3)).reshape(-1)
        for label in (obj.category, obj.colour):
            j = LABELS.index(label)
            out[:, j] = np.maximum(out[:, j], cover)
    return out


class VisionPretrainer:
    """Train ``model.vision`` and ``model.mm_projector`` of a :class:`~lisa_agent.engine.modeling.lisa.LisaModel`
    on patch targets; :meth:`probe` measures what the features say about presence."""

    def __init__(self, model: Any, config: VisionPretrainConfig, log: Any = print):
        self.model, self.cfg, self.log = model, config, log
        self.size = model.vision.image_size
        with torch.no_grad():
            n_tokens = model.encode_clip(torch.zeros(1, 3, self.size, self.size, device=model.device)).shape[1]
        self.grid = int(round(n_tokens ** 0.5))
        if self.grid * self.grid != n_tokens:
            raise ValueError(f"{n_tokens} image tokens do not form a square grid")
        hidden = model.mm_projector.out_features
        self.head = torch.nn.Linear(hidden, len(LABELS)).to(model.device)

    def render_pool(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` train-split scenes -> (n, 3, s, s) CLIP inputs and (n, grid*grid, labels) targets."""
        rng = np.random.default_rng(seed)
        pixels, targets = [], []
        for k in range(n):
            size = self.cfg.sizes[int(rng.integers(0, len(self.cfg.sizes)))]
            scene = render_scene(split_seed("train", seed + k), size=size)
            pixels.append(clip_preprocess(scene.image, self.size)[0])
            targets.append(torch.from_numpy(patch_targets(scene, self.size, self.grid)))
        return torch.stack(pixels), torch.stack(targets)

    def _logits(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.model.encode_clip(pixels.to(self.model.device))  # (B, N, H) in the LLM's input space
        # the LLM reads them through RMSNorm, so the head reads them scale-free too
        return self.head(F.layer_norm(tokens, tokens.shape[-1:]))

    def fit(self) -> list[float]:
        """Run ``config.steps`` steps; returns the loss history."""
        cfg = self.cfg
        t0 = time.perf_counter()
        pixels, targets = self.render_pool(cfg.scenes, cfg.seed)
        self.log(f"rendered {cfg.scenes} scenes in {time.perf_counter() - t0:.0f} s")
        params = [*self.model.vision.parameters(), *self.model.mm_projector.parameters(), *self.head.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / cfg.steps))
        gen = torch.Generator().manual_seed(cfg.seed)
        history = []
        self.model.train()
        for step in range(cfg.steps):
            idx = torch.randint(0, len(pixels), (cfg.batch,), generator=gen)
            x = pixels[idx]
            y = targets[idx]
            if bool(torch.rand((), generator=gen) < 0.5):  # mirror: the labels mirror with the patches
                x = x.flip(-1)
                y = y.view(cfg.batch, self.grid, self.grid, -1).flip(2).reshape_as(y)
            loss = F.binary_cross_entropy_with_logits(self._logits(x), y.to(self.model.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append(loss.item())
            if (step + 1) % max(1, cfg.steps // 10) == 0:
                self.log(f"step {step + 1}: loss {np.mean(history[-50:]):.4f} "
                         f"({time.perf_counter() - t0:.0f} s)")
        self.model.eval()
        return history

    @torch.no_grad()
    def probe(self, n: int = 200, seed: int = 9_500_000) -> dict[str, float]:
        """Held-out check with the trained head: a category / colour counts as present in a crop when
        some patch's predicted cover exceeds 0.5 (truth: some patch is at least half covered).
        Returns accuracy over (crop, label) pairs and the accuracy of always answering "absent"."""
        pixels, targets = self.render_pool(n, seed)
        pred = torch.sigmoid(self._logits(pixels)).amax(dim=1) > 0.5
        truth = targets.amax(dim=1).to(pred.device) > 0.5
        return {"accuracy": round(float((pred == truth).float().mean()), 4),
                "all_absent": round(float((~truth).float().mean()), 4),
                "recall": round(float((pred & truth).sum() / truth.sum().clamp(min=1)), 4)}


def pretrain_vision(model: str | Path, out_dir: str | Path, config: VisionPretrainConfig,
                    log: Any = print) -> dict[str, Any]:
    """Load a checkpoint (folder, Hub id or ``tabletop-tiny``), pre-train its vision tower and
    projector, save it to ``out_dir`` (published layout, the other weights unchanged). Returns the
    held-out presence probe of the trained features."""
    from ..engine.loading import resolve_checkpoint
    from ..engine.segmenter import LisaSegmenter
    from .trainer import TrainConfig, Trainer

    source = resolve_checkpoint(str(model))
    seg = LisaSegmenter.from_pretrained(source, dtype="fp32", device="cpu")
    if config.new_tower is not None:
        replace_vision_tower(seg.model, config.new_tower, config.seed)
        vision = seg.model.vision
        assert vision is not None  # replace_vision_tower attached the new tower
        seg.clip_size = vision.image_size
    torch.manual_seed(config.seed)
    pre = VisionPretrainer(seg.model, config, log)
    history = pre.fit()
    probe = pre.probe()
    trainer = Trainer(seg, Path(source), Path(out_dir), TrainConfig(method="full", steps=0), log=log)
    trainer.save()
    return {"out": str(out_dir), "steps": config.steps, "image_tokens": pre.grid ** 2,
            "final_loss": round(float(np.mean(history[-50:])), 4), "probe": probe}
