"""``torch.compile`` for the image encoders (opt-in, any device).

:class:`CompiledEncoders`: SAM's and CLIP's image encoders compiled with inductor, once per input shape at first
use (minutes for SAM ViT-H). A compilation that fails is logged once and that encoder stays eager. Compiled
encoders replace their CUDA graphs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .graphs import failure_reason

log = logging.getLogger(__name__)


class CompiledEncoders:
    """SAM's and CLIP's image encoders through ``torch.compile`` (static shapes: each new input shape
    compiles once, at its first call).

    ``clip(pixels)``: (B, 3, C, C) -> CLIP patch tokens; ``sam(pixels)``: (V, 3, S, S) -> (V, 256, s, s) SAM
    embeddings, as :meth:`LisaModel.encode_clip` / :meth:`LisaModel.encode_sam` return them. An encoder
    whose compilation or compiled run fails is logged once and runs eagerly from then on (never an error).
    ``backend`` is ``torch.compile``'s (``inductor`` by default).
    """

    def __init__(self, model: Any, *, backend: Any = "inductor", mode: str | None = None) -> None:
        self.model = model
        self._compiled = {
            "clip": torch.compile(model.encode_clip, backend=backend, mode=mode, dynamic=False),
            "sam": torch.compile(model.encode_sam, backend=backend, mode=mode, dynamic=False),
        }
        self._eager = {"clip": model.encode_clip, "sam": model.encode_sam}
        #: names of the encoders whose compilation failed (they run eagerly)
        self.failed: set[str] = set()

    def _run(self, name: str, pixels: torch.Tensor) -> torch.Tensor:
        if name not in self.failed:
            try:
                return self._compiled[name](pixels)
            except Exception as exc:  # noqa: BLE001 - an encoder that cannot be compiled runs eagerly
                self.failed.add(name)
                log.warning("torch.compile of the %s encoder failed (%s); it runs eagerly", name, failure_reason(exc))
        return self._eager[name](pixels)

    def clip(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run("clip", pixels)

    def sam(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run("sam", pixels)
