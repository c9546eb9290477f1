"""LISA's training recipe on our model: LoRA fine-tuning of published checkpoints, or full training of
small models from scratch. Checkpoints are written in the published layout the loader reads."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..engine.checkpoints import VISION_TOWER_DIR, read_config, save_vision_tower, write_checkpoint
from ..engine.segmenter import LisaSegmenter
from ..engine.weights import published_state_dict
from ..errors import InvalidArgumentError
from .batches import Batch, TrainingImage, collate
from .losses import BCE_WEIGHT, CE_WEIGHT, DICE_WEIGHT, dice, sigmoid_bce

#: How our tabletop data's no-target answers begin ("Sorry, there is no hammer in this image.").
DECLINE_PREFIX = "Sorry,"



@dataclass
class TrainConfig:
    """Hyper-parameters (defaults: LISA's LoRA recipe)."""

    method: str = "lora"  # "lora" | "full"
    steps: int = 500
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup: int = 100
    scenes_per_batch: int = 2
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    grad_clip: float = 1.0
    val_every: int = 200
    val_limit: int = 40
    val_answer: str = "forced"  # "forced" (LISA's "[SEG].") or "generated" (chat mode)
    save_every: int = 500
    seed: int = 0
    threads: int | None = None
    freeze_vision: bool = False  # keep the CLIP tower fixed, as LISA does (the projector still trains)
    freeze_llm: bool = False  # keep the LLM, projector and CLIP fixed: answers stay as they were (mask side trains)
    # Ours, not LISA's: weight of a BCE that trains the mask decoder's score output (SAM's IoU head) to
    # say whether each [SEG]'s target is in the image; > 0 also writes the presence gate into config.json.
    presence_weight: float = 0.0
    presence_threshold: float = 0.5  # the gate's threshold on sigmoid(score), written with it
    # Ours, training only: weight of a dense BCE that teaches SAM's image embedding, through a 1x1
    # convolution that is not saved, which category and colour covers each cell (synthetic scenes).
    sam_aux_weight: float = 0.0


def dense_targets(masks: np.ndarray, labels: np.ndarray, resized_hw: tuple[int, int], size: int,
                  grid: tuple[int, int]) -> torch.Tensor:
    """Each SAM embedding cell's share of every label channel: (L, g, g) float32 in [0, 1].

    ``masks``: K x H x W bool object silhouettes of the frame; ``labels``: K x L 0/1. The masks are
    letterboxed as SAM sees the frame (resized to ``resized_hw``, zero-padded bottom / right to
    ``size``), then averaged over the ``grid`` cells; objects do not overlap, so shares add up."""
    target = torch.zeros(labels.shape[1], *grid)
    if len(masks):
        m = F.interpolate(torch.from_numpy(np.asarray(masks, np.float32))[None], resized_hw, mode="area")
        m = F.pad(m, (0, size - resized_hw[1], 0, size - resized_hw[0]))
        share = F.adaptive_avg_pool2d(m, grid)[0]  # (K, g, g)
        target = torch.einsum("khw,kl->lhw", share, torch.from_numpy(np.asarray(labels, np.float32)))
    return target.clamp(0.0, 1.0)


class Trainer:
    """Train ``segmenter.model`` in place on an endless iterator of :class:`TrainingImage`.

    Args:
        segmenter: the starting model, loaded with :meth:`LisaSegmenter.from_pretrained` (fp32).
        source_dir: the folder it was loaded from (tokenizer files and config are copied from it).
        out_dir: where checkpoints (published layout) and ``trainer_state.pt`` go.
        val_data: optional ReasonSeg-layout folder for periodic gIoU / cIoU, or with ``val_split`` the
            RefCOCO-layout folder holding that referring split.
        val_split: a referring split of ``val_data`` (``"refcoco|unc|val"``, LISA's ``--val_dataset``).
    """

    def __init__(self, segmenter: LisaSegmenter, source_dir: Path, out_dir: Path, config: TrainConfig,
                 val_data: str | None = None, log: Any = print, val_split: str | None = None):
        if config.method not in ("lora", "full"):
            raise InvalidArgumentError(f"method must be 'lora' or 'full', got {config.method!r}")
        if segmenter.dtype != torch.float32:
            raise InvalidArgumentError("train in fp32 (load with dtype='fp32')")
        self.seg = segmenter
        self.model = segmenter.model
        self.source_dir = Path(source_dir)
        self.out_dir = Path(out_dir)
        self.cfg = config
        self.val_data = val_data
        self.val_split = val_split
        self.log = log
        self.step = 0
        self.history: list[dict[str, Any]] = []
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self._setup_trainable()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.aux_head: torch.nn.Conv2d | None = None
        if config.sam_aux_weight > 0:
            from .batches import dense_label_names

            width = self.model.sam.mask_decoder.transformer_dim
            self.aux_head = torch.nn.Conv2d(width, len(dense_label_names()), 1).to(self.model.device)
            params += list(self.aux_head.parameters())
        self.opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)

    # ------------------------------------------------------------------ setup
    def _lr_factor(self, step: int) -> float:
        warm = max(1, self.cfg.warmup)
        if step < warm:
            return (step + 1) / warm
        # LISA's DeepSpeed WarmupDecayLR: linear warm-up, then linear decay to 0 at the last step.
        return max(0.0, (self.cfg.steps - step) / max(1, self.cfg.steps - warm))

    def _setup_trainable(self) -> None:
        m = self.model
        m.requires_grad_(False)
        if self.cfg.method == "full":
            m.requires_grad_(True)
        else:
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                              target_modules=["q_proj", "v_proj"])
            inject_adapter_in_model(lora, m.llm)
            for name, p in m.llm.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
            m.llm.lm_head.requires_grad_(True)
            m.llm.get_input_embeddings().requires_grad_(True)
            m.sam.mask_decoder.requires_grad_(True)
            m.text_hidden_fcs.requires_grad_(True)
        if self.cfg.freeze_vision and m.vision is not None:
            m.vision.requires_grad_(False)
        if self.cfg.freeze_llm:
            m.llm.requires_grad_(False)
            m.mm_projector.requires_grad_(False)
            if m.vision is not None:
                m.vision.requires_grad_(False)
        n = sum(p.numel() for p in m.parameters() if p.requires_grad)
        self.log(f"trainable parameters: {n:,} ({self.cfg.method})")

    # ------------------------------------------------------------------ one step
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.model
        dev = m.device
        ids = batch.ids.to(dev)
        image_tokens = m.encode_clip(batch.clip_pixels.to(dev))  # (S, N, H)
        sam_emb = m.encode_sam(batch.sam_pixels.to(dev))  # (S, C, h, w)
        tokens = image_tokens[torch.tensor(batch.image_of, device=dev)]
        embeds, merged = m.embed_with_image(ids, tokens)
        hidden = m.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        rows, cols, targets, seg_rows, seg_cols = [], [], [], [], []
        merged_pos, ids_list = merged.tolist(), batch.ids.tolist()  # one host copy per batch
        text_loss = batch.text_loss or [True] * len(batch.lengths)
        for b, (start, length) in enumerate(zip(batch.answer_start, batch.lengths, strict=True)):
            for j in range(start, length):
                p = merged_pos[b][j] - 1
                if text_loss[b]:
                    rows.append(b)
                    cols.append(p)
                    targets.append(ids_list[b][j])
                if ids_list[b][j] == self.seg.seg_token_id:
                    seg_rows.append(b)
                    seg_cols.append(p)
        if rows:
            ce = F.cross_entropy(m.llm.lm_head(hidden[rows, cols]), torch.tensor(targets, device=dev))
        else:
            ce = hidden.sum() * 0.0
        bce_terms, dice_terms, score_logits, score_targets = [], [], [], []
        seg_states = hidden[seg_rows, seg_cols] if seg_rows else None
        k = 0
        for b in range(len(batch.lengths)):
            n = batch.masks[b].shape[0]
            if n == 0:
                continue
            s = batch.image_of[b]
            assert seg_states is not None  # each target mask has its [SEG] in the answer
            low, score, _ = m.decode_masks(seg_states[k:k + n], sam_emb[s: s + 1])
            k += n
            present = batch.present[b].to(dev) if batch.present else torch.ones(n, device=dev)
            score_logits.append(score[:, 0].float())
            score_targets.append(present)
            keep = present > 0.5  # an absent target's [SEG] trains the presence head only
            if not bool(keep.any()):
                continue
            logits = m.postprocess_masks(low[keep], batch.resized_hw[s], batch.original_hw[s])
            target = batch.masks[b].to(dev)[keep]
            valid_b = batch.valid[b]
            valid = None if valid_b is None else valid_b.to(dev)
            bce_terms.append(sigmoid_bce(logits, target, valid))
            dice_terms.append(dice(logits, target, valid))
        bce = torch.cat(bce_terms).mean() if bce_terms else ce.new_zeros(())
        dsc = torch.cat(dice_terms).mean() if dice_terms else ce.new_zeros(())
        total = CE_WEIGHT * ce + BCE_WEIGHT * bce + DICE_WEIGHT * dsc
        parts = {"ce": ce.item(), "bce": bce.item(), "dice": dsc.item()}
        if self.aux_head is not None:
            aux = self.dense_aux_loss(batch, sam_emb)
            if aux is not None:
                total = total + self.cfg.sam_aux_weight * aux
                parts["sam_aux"] = aux.item()
        if self.cfg.presence_weight > 0 and score_logits:
            presence = F.binary_cross_entropy_with_logits(torch.cat(score_logits), torch.cat(score_targets))
            total = total + self.cfg.presence_weight * presence
            parts["presence"] = presence.item()
        return total, {"loss": total.item(), **parts}

    def dense_aux_loss(self, batch: Batch, sam_emb: torch.Tensor) -> torch.Tensor | None:
        """BCE between ``aux_head(sam_emb)`` (S, L, g, g) and :func:`dense_targets` of each scene that has
        object labels (None when none has)."""
        logits, targets = [], []
        for s, (masks, labels) in enumerate(zip(batch.object_masks, batch.object_labels, strict=True)):
            if masks is None or labels is None:
                continue
            targets.append(dense_targets(masks, labels, batch.resized_hw[s], self.model.sam_spec.img_size,
                                         (sam_emb.shape[-2], sam_emb.shape[-1])).to(sam_emb.device))
            assert self.aux_head is not None  # called only when the trainer has an aux head
            logits.append(self.aux_head(sam_emb[s: s + 1])[0])
        if not logits:
            return None
        return F.binary_cross_entropy_with_logits(torch.stack(logits), torch.stack(targets))

    def fit(self, scenes: Iterator[TrainingImage], steps: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
        """Run until ``steps`` (default ``config.steps``) optimizer steps have been taken in total."""
        from tqdm import tqdm

        target = self.cfg.steps if steps is None else steps
        self.model.train()
        bar = tqdm(total=target, initial=self.step, disable=not progress, desc="train", dynamic_ncols=True)
        t0 = time.perf_counter()
        while self.step < target:
            batch = collate([next(scenes) for _ in range(self.cfg.scenes_per_batch)], self.seg.tokenizer,
                            self.seg.template.name, self.seg.use_im_start_end, self.seg.sam_size,
                            self.seg.clip_size, self.seg.seg_token_id)
            loss, losses = self.loss(batch)
            parts: dict[str, Any] = losses  # the step's losses, then its step, lr, seconds and validation
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               self.cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            self.step += 1
            parts.update(step=self.step, lr=self.sched.get_last_lr()[0], seconds=round(time.perf_counter() - t0, 1))
            self.history.append(parts)
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", ce=f"{parts['ce']:.3f}", dice=f"{parts['dice']:.3f}")
            if self.val_data and self.cfg.val_every and self.step % self.cfg.val_every == 0:
                parts["val"] = self.validate()
                self.log(f"step {self.step}: val {json.dumps(parts['val'])}")
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < target:
                self.save()
        bar.close()
        self.model.eval()
        return self.history

    # ------------------------------------------------------------------ validation
    def inference_segmenter(self) -> LisaSegmenter:
        """A segmenter sharing the weights being trained (fresh feature cache)."""
        return LisaSegmenter(self.model, self.seg.tokenizer, template=self.seg.template.name,
                             use_im_start_end=self.seg.use_im_start_end, name=str(self.out_dir))

    def validate(self) -> dict[str, Any]:
        from ..data.reasonseg import iter_samples
        from ..evaluation.evaluate import evaluate

        assert self.val_data is not None, "validate() needs val_data"
        was_training = self.model.training
        self.model.eval()
        try:
            if self.val_split:
                from ..data.refcoco import open_refer_split

                samples = open_refer_split(self.val_data, self.val_split).samples(limit=self.cfg.val_limit)
                report = evaluate(self.inference_segmenter(), samples, answer=self.cfg.val_answer, subsets=())
            else:
                report = evaluate(self.inference_segmenter(), iter_samples(self.val_data, limit=self.cfg.val_limit),
                                  answer=self.cfg.val_answer)
        finally:
            self.model.train(was_training)
        keep: dict[str, Any] = {k: report[k] for k in ("gIoU", "cIoU", "n") if k in report}
        for name, sub in report.get("subsets", {}).items():
            keep[name] = {k: v for k, v in sub.items() if k in ("gIoU", "n", "right_object_rate")}
        return keep

    # ------------------------------------------------------------------ saving
    def merged_state(self) -> dict[str, torch.Tensor]:
        """Published-name weights with LoRA merged into the base layers (the model is left unchanged)."""
        state = published_state_dict(self.model)
        if self.cfg.method != "lora":
            return state
        out = {}
        scale = self.cfg.lora_alpha / self.cfg.lora_r
        for key, value in state.items():
            if "lora_" in key:
                continue
            base = key.replace(".base_layer.", ".")
            if ".base_layer." in key and key.endswith("weight"):
                stem = key[: -len("base_layer.weight")]
                a = state[stem + "lora_A.default.weight"]
                b = state[stem + "lora_B.default.weight"]
                value = value + scale * (b @ a)
            out[base] = value
        return out

    def save(self, out_dir: Path | None = None) -> Path:
        """Write a loadable checkpoint (published layout, LoRA merged) and the resumable trainer state."""
        out = Path(out_dir or self.out_dir)
        config = read_config(self.source_dir)
        vision = self.model.vision
        assert vision is not None  # a LisaSegmenter's model always has its vision tower
        if self.cfg.method == "full" or (self.source_dir / config.get("vision_tower", "")).is_dir():
            src_proc = self.source_dir / config.get("vision_tower", "") / "preprocessor_config.json"
            # the tower may have been replaced (pretrain-vision --new-tower): its size decides the crop
            save_vision_tower(vision.tower, out / VISION_TOWER_DIR, vision.image_size,
                              json.loads(src_proc.read_text()) if src_proc.is_file() else None)
            config["vision_tower"] = config["mm_vision_tower"] = VISION_TOWER_DIR
        config["mm_hidden_size"] = vision.hidden_size
        source_extra = config.get("lisa_agent") or {}
        config["lisa_agent"] = {"trained_steps": self.step, "method": self.cfg.method}
        if "mask_tta" in source_extra:  # an inference setting of the source checkpoint: kept
            config["lisa_agent"]["mask_tta"] = source_extra["mask_tta"]
        if self.cfg.presence_weight > 0:
            # the score head now says whether a [SEG]'s target is present: generation declines below this
            config["lisa_agent"]["presence_gate"] = {"threshold": self.cfg.presence_threshold,
                                                     "decline_prefix": DECLINE_PREFIX}
        write_checkpoint(out, config, self.merged_state(), source=self.source_dir)
        torch.save({"step": self.step, "config": asdict(self.cfg), "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "history": self.history,
                    "aux_head": None if self.aux_head is None else self.aux_head.state_dict()},
                   out / "trainer_state.pt")
        return out

    def resume(self, state_path: Path) -> None:
        """Continue from a ``trainer_state.pt`` written by :meth:`save`."""
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        if self.aux_head is not None and state.get("aux_head") is not None:
            self.aux_head.load_state_dict(state["aux_head"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.log(f"resumed at step {self.step}")
