"""The LISA model: LLaMA + CLIP patch features -> projector, SAM, and the [SEG] head.

Module tree (ours) and the published checkpoint key prefixes it maps to:

==========================  ===================================
ours                        published checkpoint
==========================  ===================================
``llm.model.*``             ``model.*`` (embed_tokens, layers, norm)
``llm.lm_head.*``           ``lm_head.*``
``mm_projector.*``          ``model.mm_projector.*``
``sam.*``                   ``model.visual_model.*``
``text_hidden_fcs.*``       ``model.text_hidden_fcs.*``
``vision.tower.*``          not in the checkpoint (own id/folder)
==========================  ===================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import CheckpointError
from ..prompts import IMAGE_TOKEN_INDEX
from .sam import SamSpec, build_sam

if TYPE_CHECKING:
    from .clip import ClipPatchFeatures

#: (published prefix, our prefix); first match wins, so the specific ones come first.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("model.mm_projector.", "mm_projector."),
    ("model.visual_model.", "sam."),
    ("model.text_hidden_fcs.", "text_hidden_fcs."),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
)

#: Keys a checkpoint may carry that hold nothing we need (recomputed buffers).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", ".pixel_mean", ".pixel_std")
#: LLaVA-style saves may include the CLIP tower; LISA loads it from its own id, so these are skipped.
IGNORABLE_PREFIXES = ("model.vision_tower.",)


def to_internal_key(key: str) -> str | None:
    """Our parameter name for a published checkpoint key, or None if it maps to nothing."""
    for published, ours in KEY_MAP:
        if key.startswith(published):
            return ours + key[len(published):]
    return None


def to_published_key(key: str) -> str | None:
    """Inverse of :func:`to_internal_key` (None for modules that are not saved, e.g. the CLIP tower)."""
    for published, ours in KEY_MAP:
        if key.startswith(ours):
            return published + key[len(ours):]
    return None


def make_text_hidden_fcs(hidden: int, out_dim: int) -> nn.ModuleList:
    """LISA's projection from the LLM's hidden state to the SAM prompt: Linear, ReLU, Linear, Dropout(0)."""
    return nn.ModuleList([nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, out_dim), nn.Dropout(0.0))])


class LisaModel(nn.Module):
    """LISA for inference and training; the vision tower is attached with :meth:`attach_vision`.

    Args:
        llama_config: a transformers ``LlamaConfig``.
        sam_spec: SAM shape.
        mm_hidden_size: CLIP feature width (1024 for ViT-L/14).
        out_dim: SAM prompt width (256).
    """

    def __init__(self, llama_config, sam_spec: SamSpec, mm_hidden_size: int, out_dim: int):  # noqa: ANN001
        super().__init__()
        from transformers import LlamaForCausalLM

        if out_dim != sam_spec.prompt_embed_dim:
            raise CheckpointError(f"out_dim {out_dim} differs from SAM's prompt width {sam_spec.prompt_embed_dim}")
        hidden = llama_config.hidden_size
        self.llm = LlamaForCausalLM(llama_config)
        self.mm_projector = nn.Linear(mm_hidden_size, hidden)
        self.sam = build_sam(sam_spec)
        self.text_hidden_fcs = make_text_hidden_fcs(hidden, out_dim)
        self.vision: ClipPatchFeatures | None = None
        self.sam_spec = sam_spec

    def attach_vision(self, vision: ClipPatchFeatures) -> None:
        """Attach a :class:`~lisa_agent.engine.modeling.clip.ClipPatchFeatures` (not part of the checkpoint)."""
        self.vision = vision

    # ---------------------------------------------------------------- image encoders
    @property
    def device(self) -> torch.device:
        return self.mm_projector.weight.device

    def encode_sam(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized, zero-padded frames -> (B, C, S/16, S/16) SAM image embeddings."""
        enc = self.sam.image_encoder
        x = enc.patch_embed(pixels.to(enc.patch_embed.proj.weight.dtype))
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for block in enc.blocks:
            x = block(x)
        neck_dtype = enc.neck[0].weight.dtype  # float32 when the rest is fp16 (see loading)
        return enc.neck(x.permute(0, 3, 1, 2).to(neck_dtype)).to(x.dtype)

    def encode_clip(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) CLIP-normalized crops -> (B, N, H) projected image tokens for the LLM."""
        if self.vision is None:
            raise RuntimeError("no vision tower attached: call attach_vision() first")
        feats = self.vision(pixels.to(next(self.vision.parameters()).dtype))
        return self.mm_projector(feats.to(self.mm_projector.weight.dtype))

    # ---------------------------------------------------------------- LLM inputs
    def embed_with_image(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a (B, L) id batch in which each row holds exactly one :data:`IMAGE_TOKEN_INDEX`.

        Returns ``(inputs_embeds (B, L - 1 + N, H), merged_positions (B, L))``: the placeholder is
        replaced by the N image tokens of ``image_tokens`` ((B, N, H) or (1, N, H), shared);
        ``merged_positions[b, j]`` is where prompt position j landed (image placeholder: its first
        image token). Raises ``ValueError`` if a row does not have exactly one placeholder.
        """
        is_img = ids == IMAGE_TOKEN_INDEX
        counts = is_img.sum(dim=1)
        if not bool((counts == 1).all()):
            raise ValueError(f"each prompt needs exactly one image placeholder; found {counts.tolist()}")
        bsz, length = ids.shape
        n_img = image_tokens.shape[1]
        embed = self.llm.get_input_embeddings()
        text = embed(ids.clamp(min=0))
        img_pos = is_img.float().argmax(dim=1)  # (B,)
        # Position of each prompt token in the merged sequence: shift by N-1 after the placeholder.
        ar = torch.arange(length, device=ids.device).expand(bsz, length)
        merged = torch.where(ar > img_pos[:, None], ar + n_img - 1, ar)
        out = text.new_zeros(bsz, length - 1 + n_img, text.shape[-1])
        keep = ~is_img
        rows = torch.arange(bsz, device=ids.device)[:, None].expand(bsz, length)
        out[rows[keep], merged[keep]] = text[keep]
        img = image_tokens.to(out.dtype).expand(bsz, -1, -1)
        cols = img_pos[:, None] + torch.arange(n_img, device=ids.device)[None]
        out[torch.arange(bsz, device=ids.device)[:, None], cols] = img
        return out, merged

    # ---------------------------------------------------------------- masks
    def decode_masks(self, seg_hidden: torch.Tensor, image_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[SEG] hidden states (n, H) + one frame's SAM embedding (1, C, h, w) -> masks.

        Returns ``(low_res_logits (n, 1, 4h, 4w), iou_pred (n, 1), prompts (n, C))``; prompts are the
        ``text_hidden_fcs`` outputs sent to the decoder as sparse embeddings (:meth:`decode_prompts`).
        """
        fcs = cast(nn.Sequential, self.text_hidden_fcs[0])  # see make_text_hidden_fcs
        prompts = fcs(seg_hidden.to(cast(nn.Linear, fcs[0]).weight.dtype))
        low_res, iou = self.decode_prompts(prompts, image_embedding)
        return low_res, iou, prompts

    def decode_prompts(self, prompts: torch.Tensor, image_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder prompts (n, C) (``text_hidden_fcs`` outputs) + one frame's SAM embedding (1, C, h, w) ->
        ``(low_res_logits (n, 1, 4h, 4w), iou_pred (n, 1))``: sparse embeddings, the dense prompt set to
        ``no_mask_embed`` and ``multimask_output=False`` (first mask token), as LISA does."""
        pe = self.sam.prompt_encoder
        dec = self.sam.mask_decoder
        dtype = dec.iou_token.weight.dtype
        n = prompts.shape[0]
        sparse = prompts.to(dtype)[:, None, :]
        dense = pe.no_mask_embed.weight.to(dtype).reshape(1, -1, 1, 1).expand(n, -1, *pe.image_embedding_size)
        low_res, iou = dec(
            image_embeddings=image_embedding.to(dtype),
            image_pe=self.dense_pe(dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return low_res, iou

    def dense_pe(self, dtype: torch.dtype) -> torch.Tensor:
        """SAM's (1, C, h, w) positional encoding of the embedding grid, computed in the dtype of its
        Fourier matrix as LISA's prompt encoder does (so bf16 models match LISA's bf16 path), cached.

        segment_anything builds the grid in float32 and cannot multiply it with a 16-bit matrix."""
        pe_layer = self.sam.prompt_encoder.pe_layer
        gauss = pe_layer.positional_encoding_gaussian_matrix
        key = (dtype, gauss.dtype, gauss.device)
        cache = self.__dict__.setdefault("_dense_pe_cache", {})
        if key not in cache:
            h, w = self.sam.prompt_encoder.image_embedding_size
            grid = torch.ones((h, w), device=gauss.device, dtype=gauss.dtype)
            ys = (grid.cumsum(dim=0) - 0.5) / h
            xs = (grid.cumsum(dim=1) - 0.5) / w
            pe = pe_layer._pe_encoding(torch.stack([xs, ys], dim=-1))  # (h, w, C)
            cache.clear()
            cache[key] = pe.permute(2, 0, 1)[None].to(dtype)
        return cache[key]

    def postprocess_masks(self, low_res: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> torch.Tensor:
        """LISA's postprocess: bilinear to S x S, crop to the pre-padding size, bilinear to the original.

        (n, 1, s, s) logits -> (n, H, W) float32 logits at the original frame size.
        """
        size = self.sam_spec.img_size
        x = F.interpolate(low_res.float(), (size, size), mode="bilinear", align_corners=False)
        x = x[..., : resized_hw[0], : resized_hw[1]]
        x = F.interpolate(x, original_hw, mode="bilinear", align_corners=False)
        return x[:, 0]
