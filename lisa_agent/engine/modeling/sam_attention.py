"""SAM image-encoder attention through ``scaled_dot_product_attention``.

segment_anything's ``Attention`` materialises the softmax matrix itself and rebuilds its relative
position indices on the CPU at every call (a host-to-device copy that also blocks CUDA graph capture).
:class:`SdpaAttention` computes the same function: the decomposed relative-position term of MViTv2 is
built as an additive bias from index tables cached on the device, and the attention itself runs in
``F.scaled_dot_product_attention`` (fused kernels where the backend has them). Same parameters, same
state-dict keys; swap it in with :func:`use_sdpa_attention`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


def _rel_index(q: int, k: int, device: torch.device) -> torch.Tensor:
    """Indices into a (2*max(q,k)-1, C) table for every (query, key) pair along one axis."""
    qs = torch.arange(q, device=device)[:, None] * max(k / q, 1.0)
    ks = torch.arange(k, device=device)[None, :] * max(q / k, 1.0)
    return ((qs - ks) + (k - 1) * max(q / k, 1.0)).long()


def _table(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0)


class SdpaAttention(nn.Module):
    """Drop-in forward for ``segment_anything.modeling.image_encoder.Attention`` (same attributes)."""

    num_heads: int
    scale: float
    use_rel_pos: bool
    qkv: nn.Linear
    proj: nn.Linear
    rel_pos_h: nn.Parameter
    rel_pos_w: nn.Parameter

    def _indices(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.__dict__.setdefault("_rel_cache", {})
        key = (h, w, device)
        if key not in cache:
            cache[key] = (_rel_index(h, h, device), _rel_index(w, w, device))
        return cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nH, N, C)
        bias = None
        if self.use_rel_pos:
            ih, iw = self._indices(h, w, x.device)
            rh = _table(self.rel_pos_h, 2 * h - 1)[ih]  # (h, h, C)
            rw = _table(self.rel_pos_w, 2 * w - 1)[iw]  # (w, w, C)
            rq = q.reshape(b, self.num_heads, h, w, -1)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rh)
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rw)
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, n, n).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.reshape(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def use_sdpa_attention(sam: Sam) -> int:
    """Switch every image-encoder attention of ``sam`` to :class:`SdpaAttention`; returns how many."""
    from segment_anything.modeling.image_encoder import Attention

    count = 0
    for module in sam.image_encoder.modules():
        if type(module) is Attention:
            module.__class__ = type("SamSdpaAttention", (SdpaAttention, Attention), {})
            count += 1
    return count
