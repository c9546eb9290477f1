"""CLIP vision tower features as LLaVA/LISA use them: a chosen hidden layer, CLS dropped."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import CLIPVisionModel


class _ClipEncoder(Protocol):
    @property
    def layers(self) -> nn.ModuleList: ...


class _ClipVisionTransformer(Protocol):
    """The parts of a CLIP vision transformer that :class:`ClipPatchFeatures` runs: transformers'
    ``CLIPVisionModel`` itself (5.x) or its ``vision_model`` (4.x)."""

    @property
    def embeddings(self) -> nn.Module: ...

    @property
    def pre_layrnorm(self) -> nn.Module: ...

    @property
    def encoder(self) -> _ClipEncoder: ...


class ClipPatchFeatures(nn.Module):
    """Wrap a transformers ``CLIPVisionModel`` and return LLaVA's image features.

    ``forward(pixels)``: ``pixels`` float (B, 3, S, S) normalized with CLIP's mean/std ->
    (B, N, C) features of hidden layer ``select_layer`` (``-2`` for LISA: the input of the last
    encoder layer), CLS dropped when ``select_feature == "patch"``. Layers after the selected one are
    never run (for ViT-L/14 that skips 1 of 24 layers), which gives the same numbers as
    ``output_hidden_states=True`` followed by indexing.
    """

    def __init__(self, tower: CLIPVisionModel, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        self.tower = tower
        n_layers = len(self._vision().encoder.layers)
        # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k.
        index = select_layer if select_layer >= 0 else n_layers + 1 + select_layer
        if not 0 <= index <= n_layers:
            raise ValueError(f"mm_vision_select_layer {select_layer} is outside a {n_layers}-layer tower")
        self.n_run = index
        self.select_layer = select_layer
        self.select_feature = select_feature

    def _vision(self) -> _ClipVisionTransformer:
        return getattr(self.tower, "vision_model", self.tower)

    @property
    def image_size(self) -> int:
        # CLIP vision configs allow a (h, w) pair; LLaVA/LISA towers are square, with one int side.
        return int(cast(int, self.tower.config.image_size))

    @property
    def hidden_size(self) -> int:
        return int(self.tower.config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        vm = self._vision()
        h = vm.pre_layrnorm(vm.embeddings(pixels))
        for layer in vm.encoder.layers[: self.n_run]:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
        return h[:, 1:] if self.select_feature == "patch" else h
