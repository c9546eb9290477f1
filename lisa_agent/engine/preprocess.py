"""Exact image preprocessing of LISA: the SAM letterbox and the CLIP crop.

SAM: resize the longest side to S (new size ``int(h * S / max(h, w) + 0.5)`` per side, PIL bilinear as
``ResizeLongestSide.apply_image``, i.e. torchvision's default on a PIL image), normalize on the 0-255 scale with (123.675, 116.28, 103.53) /
(58.395, 57.12, 57.375), zero-pad right/bottom to S x S.

CLIP: resize the shortest side to s (PIL bicubic; long side ``int(s * long / short)``), center crop
s x s, scale to [0, 1], normalize with OpenAI's CLIP mean/std. Non-square frames are cropped for CLIP,
not for SAM. This matches transformers' ``CLIPImageProcessor`` (PIL backend) with the
``openai/clip-vit-large-patch14`` settings.

On the device (:func:`sam_preprocess_tensor`, :func:`clip_preprocess_tensor`; the engine's ``preprocess``
option): the same steps in torch on a (1, 3, H, W) uint8 frame already on the GPU, with antialiased
bilinear / bicubic resizing rounded to whole grey levels as PIL's uint8 output is. Measured against PIL on
rendered scenes, noise and a 1080p frame: every bilinear (SAM) pixel within one grey level; bicubic (CLIP)
pixels of rendered scenes within one level but for 1 in 10,000 (at most 2 levels). Enlarged noise differs
more (up to 20 levels in under 1% of pixels): bicubic overshoots there, and PIL clips after each of its two
separable passes where torch clips once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .modeling.sam import PIXEL_MEAN, PIXEL_STD

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def sam_resized_size(h: int, w: int, target: int) -> tuple[int, int]:
    """(new_h, new_w) of the longest-side resize to ``target`` (segment_anything's rounding)."""
    scale = target / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


@dataclass(frozen=True)
class SamInput:
    """``pixels`` (1, 3, S, S) float32 normalized and padded; ``resized_hw`` size before padding."""

    pixels: torch.Tensor
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]


def sam_preprocess(image: np.ndarray, size: int) -> SamInput:
    """HxWx3 uint8 RGB -> :class:`SamInput` for a SAM with input side ``size``."""
    h, w = image.shape[:2]
    nh, nw = sam_resized_size(h, w, size)
    resized = np.array(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    x = torch.from_numpy(resized).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    x = (x - mean) / std
    padded = torch.zeros(3, size, size)
    padded[:, :nh, :nw] = x
    return SamInput(pixels=padded[None], resized_hw=(nh, nw), original_hw=(h, w))


def clip_crop_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """Where CLIP's input comes from in an H x W frame: ``(nh, nw, top, left)``, the shortest-side resize
    to ``size`` and the top-left corner of the centred ``size`` x ``size`` crop in it."""
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    return nh, nw, (nh - size) // 2, (nw - size) // 2


def clip_preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 RGB -> (1, 3, size, size) float32 CLIP input (shortest-side resize, center crop)."""
    h, w = image.shape[:2]
    nh, nw, top, left = clip_crop_geometry(h, w, size)
    resized = Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC)
    crop: np.ndarray = np.asarray(resized, dtype=np.float32)[top: top + size, left: left + size] / 255.0
    crop = (crop - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))[None]


@lru_cache(maxsize=16)
def _constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a (1, 3, 1, 1) float32 tensor on ``device``, made once per device (not per frame: on
    CUDA each new small tensor is a synchronous copy)."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def _resize_like_pil(frame: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """(1, 3, H, W) uint8 -> (1, 3, h, w) float32 whole grey levels in [0, 255]: antialiased ``mode``
    (bilinear / bicubic) resizing, rounded as PIL's uint8 result is."""
    x = F.interpolate(frame.float(), size=hw, mode=mode, align_corners=False, antialias=True)
    return x.round_().clamp_(0.0, 255.0)


def sam_preprocess_tensor(frame: torch.Tensor, size: int) -> SamInput:
    """:func:`sam_preprocess` on the frame's device: ``frame`` (1, 3, H, W) uint8 RGB -> :class:`SamInput`
    whose ``pixels`` (1, 3, S, S) float32 stay on that device."""
    h, w = int(frame.shape[2]), int(frame.shape[3])
    nh, nw = sam_resized_size(h, w, size)
    x = _resize_like_pil(frame, (nh, nw), "bilinear")
    x = (x - _constants(PIXEL_MEAN, frame.device)) / _constants(PIXEL_STD, frame.device)
    padded = F.pad(x, (0, size - nw, 0, size - nh))
    return SamInput(pixels=padded, resized_hw=(nh, nw), original_hw=(h, w))


def clip_preprocess_tensor(frame: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`clip_preprocess` on the frame's device: (1, 3, H, W) uint8 RGB -> (1, 3, size, size) float32."""
    h, w = int(frame.shape[2]), int(frame.shape[3])
    nh, nw, top, left = clip_crop_geometry(h, w, size)
    x = _resize_like_pil(frame, (nh, nw), "bicubic")[:, :, top: top + size, left: left + size] / 255.0
    return ((x - _constants(CLIP_MEAN, frame.device)) / _constants(CLIP_STD, frame.device)).contiguous()
