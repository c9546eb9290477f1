"""Give a checkpoint's SAM a larger input size before fine-tuning (``lisa-agent resize-sam``).

SAM cuts its letterboxed input into 16 px patches, so at the tabletop model's 256 px its image embedding is
a 16 x 16 grid over the whole frame, and every object boundary has to be carried by a few coarse cells.
Resizing the input to k times the size gives a k times finer grid over the same frame, at about k^2 times
the encoder's cost. The weights carry over unchanged except where the size shows:

- the absolute position embedding ``image_encoder.pos_embed`` (1, G, G, E) is resampled (bicubic) to
  (1, kG, kG, E);
- every block's relative-position tables ``attn.rel_pos_h`` / ``rel_pos_w`` ((2S - 1, head_dim), S the
  grid side for global blocks, the window for windowed ones) are stretched (linear) to (2kS - 1, head_dim),
  so an offset of k new cells reads what one old cell did; windowed blocks thereby get k times larger
  windows and still cover the same part of the frame.

Nothing else in SAM depends on the input size (the prompt encoder's Fourier features work in normalised
coordinates; the mask decoder sees whatever grid it is given; its low-resolution masks become 4kG square).
The result loads like any checkpoint (the loader reads SAM's shape off the weights) and then needs
fine-tuning at the new size: the patch statistics change when a frame is upsampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.modeling.lisa import to_published_key
from ..errors import InvalidArgumentError

#: published prefix of SAM's weights ("model.visual_model.") and of its image encoder
SAM_PREFIX = str(to_published_key("sam."))
ENCODER_PREFIX = SAM_PREFIX + "image_encoder."


def resize_sam_state(state: dict[str, torch.Tensor], old_size: int, new_size: int) -> dict[str, torch.Tensor]:
    """Published-name weights with SAM's input resized from ``old_size`` to ``new_size`` px (a whole multiple).

    Returns a new dict (the input is not modified); tensors other than SAM's position terms are shared.
    Raises :class:`InvalidArgumentError` if ``new_size`` is not a whole multiple of ``old_size`` or the
    weights hold no SAM image encoder.
    """
    if old_size <= 0 or new_size < old_size or new_size % old_size:
        raise InvalidArgumentError(f"the new SAM input size must be a whole multiple of the current "
                                   f"{old_size} px; got {new_size}")
    pos_key = ENCODER_PREFIX + "pos_embed"
    if pos_key not in state:
        raise InvalidArgumentError(f"no SAM image encoder in these weights ({pos_key} missing)")
    k = new_size // old_size
    out = dict(state)
    pos = state[pos_key]  # (1, G, G, E)
    grid = int(pos.shape[1])
    if grid * (old_size // grid) != old_size:
        raise InvalidArgumentError(f"SAM's position grid {grid} does not divide its stated input size {old_size}")
    out[pos_key] = F.interpolate(pos.float().permute(0, 3, 1, 2), size=(grid * k, grid * k), mode="bicubic",
                                 align_corners=False).permute(0, 2, 3, 1).to(pos.dtype).contiguous()
    for key, table in state.items():
        if key.startswith(ENCODER_PREFIX) and key.endswith((".rel_pos_h", ".rel_pos_w")):
            out[key] = stretch_rel_pos(table, k)
    return out


def stretch_rel_pos(table: torch.Tensor, k: int) -> torch.Tensor:
    """A relative-position table (2S - 1, C) (row ``S - 1 + d`` for offset d in [-(S-1), S-1]) for a grid k
    times finer: (2kS - 1, C), row ``kS - 1 + d`` holding the old table at offset d / k (linear between rows,
    the ends held), so ``new[kS - 1 + k * d] == old[S - 1 + d]`` exactly."""
    n = int(table.shape[0])
    side = (n + 1) // 2
    offsets = torch.arange(2 * side * k - 1, dtype=torch.float64) - (side * k - 1)
    pos = (offsets / k + (side - 1)).clamp(0, n - 1)
    lo = pos.floor().long().clamp(max=max(n - 2, 0))
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo).unsqueeze(1)
    t = table.double()
    return ((1 - w) * t[lo] + w * t[hi]).to(table.dtype).contiguous()
