"""SAM (Meta's ``segment_anything`` modules) built to the shape a checkpoint's weights say.

Published LISA checkpoints carry SAM ViT-H under ``model.visual_model.*``; smaller SAMs (ViT-B/L, or
our tiny test models) are recognised from their weight shapes, so no config field is needed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...errors import CheckpointError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamSpec:
    """Hyper-parameters of a SAM. Defaults are ViT-H as in ``sam_vit_h_4b8939.pth`` / LISA."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    extra: dict = field(default_factory=dict)

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for ViT-H at 1024 px)."""
        return self.img_size // self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        return d


SAM_PRESETS: dict[str, SamSpec] = {
    "vit_h": SamSpec(),
    "vit_l": SamSpec(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": SamSpec(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
}


def infer_sam_spec(state: dict[str, torch.Tensor], prefix: str = "", decoder_num_heads: int = 8) -> SamSpec:
    """Read a :class:`SamSpec` off SAM weights (keys as in ``segment_anything``, under ``prefix``).

    Encoder width, depth, heads, patch and input size, window size and the global-attention blocks
    are all determined by parameter shapes (``rel_pos_h`` is ``(2*S-1, head_dim)`` with S the window
    or, for global blocks, the grid side). Only the decoder's head count is not visible in shapes:
    ``decoder_num_heads`` (8 in every released SAM) gives it.
    """
    def get(key: str) -> torch.Tensor:
        try:
            return state[prefix + key]
        except KeyError:
            raise CheckpointError(f"SAM weight {prefix + key!r} missing from the checkpoint") from None

    patch_w = get("image_encoder.patch_embed.proj.weight")  # (E, 3, P, P)
    embed_dim, patch = int(patch_w.shape[0]), int(patch_w.shape[-1])
    grid = int(get("image_encoder.pos_embed").shape[1])  # (1, G, G, E)
    block_ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"image_encoder\.blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1 if block_ids else 0
    if depth == 0:
        raise CheckpointError(f"no SAM image encoder blocks under {prefix!r}image_encoder.blocks")
    head_dim = int(get("image_encoder.blocks.0.attn.rel_pos_h").shape[1])
    if embed_dim % head_dim:
        raise CheckpointError(f"SAM encoder width {embed_dim} is not a multiple of its head dim {head_dim}")
    sides = [(int(get(f"image_encoder.blocks.{i}.attn.rel_pos_h").shape[0]) + 1) // 2 for i in range(depth)]
    global_idx = tuple(i for i, s in enumerate(sides) if s == grid)
    windows = {s for s in sides if s != grid}
    if len(windows) > 1:
        raise CheckpointError(f"SAM encoder blocks disagree on the window size: {sorted(windows)}")
    window = windows.pop() if windows else 0
    mlp_hidden = int(get("image_encoder.blocks.0.mlp.lin1.weight").shape[0])
    prompt_dim = int(get("image_encoder.neck.0.weight").shape[0])
    dec_ids = {int(m.group(1)) for k in state
               if (m := re.match(re.escape(prefix) + r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    return SamSpec(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        mlp_ratio=mlp_hidden / embed_dim,
        window_size=window,
        global_attn_indexes=global_idx,
        prompt_embed_dim=prompt_dim,
        decoder_depth=max(dec_ids) + 1 if dec_ids else 2,
        decoder_mlp_dim=int(get("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0]),
        decoder_num_heads=decoder_num_heads,
        iou_head_hidden_dim=int(get("mask_decoder.iou_prediction_head.layers.0.weight").shape[0]),
        mask_in_chans=int(get("prompt_encoder.mask_downscaling.3.weight").shape[0]),
    )


def build_sam(spec: SamSpec) -> Sam:
    """A ``segment_anything.modeling.Sam`` of the given shape (random init; load weights after)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = spec.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.depth,
            embed_dim=spec.embed_dim,
            img_size=spec.img_size,
            mlp_ratio=spec.mlp_ratio,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=spec.num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(spec.img_size, spec.img_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()
