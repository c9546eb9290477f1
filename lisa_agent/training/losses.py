"""LISA's mask losses, per mask, with ignore pixels excluded.

BCE: mean over a mask's pixels, averaged over all masks of the batch (LISA sums per-mask losses and
divides by the number of masks). Dice: on sigmoid probabilities scaled by 1/1000
(numerically the same ratio; LISA scales to keep sums small), eps 1e-6, averaged over masks.
Total loss = 1.0 x CE + 2.0 x BCE + 0.5 x Dice.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

CE_WEIGHT, BCE_WEIGHT, DICE_WEIGHT = 1.0, 2.0, 0.5


def sigmoid_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(K, H, W) logits and 0/1 targets -> (K,) per-mask mean BCE (pixels where ``valid`` is False left out).

    Average over all masks of a batch (``torch.cat(...).mean()``), as LISA weighs every mask equally."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if valid is None:
        return loss.flatten(1).mean(1)
    valid = valid.float().expand_as(loss)
    return (loss * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1.0)


def dice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
         scale: float = 1000.0, eps: float = 1e-6) -> torch.Tensor:
    """LISA's Dice loss per mask, (K,): ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)``, sums scaled."""
    p = logits.sigmoid()
    if valid is not None:
        valid = valid.float().expand_as(p)
        p = p * valid
        target = target * valid
    p, t = p.flatten(1), target.flatten(1)
    num = 2 * (p / scale * t).sum(-1)
    den = (p / scale).sum(-1) + (t / scale).sum(-1)
    return 1 - (num + eps) / (den + eps)
