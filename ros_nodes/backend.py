"""The model behind the node: an in-process ``LisaSegmenter`` or a ``LisaClient`` to a model server.

Both offer ``segment(image, query, *, mode=..., frame_id=...) -> SegmentationResult``. Loading is
explicit (:func:`load_backend`) and slow (seconds to minutes): never call it in a callback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackendConfig:
    """What the node's parameters say about the model.

    ``model``: Hub id, local folder or ``tabletop-tiny``; ``server``: a model server endpoint
    (``tcp://host:port``), which wins over ``model`` when set; ``device``/``dtype``: ``auto`` picks
    ``cuda``/``bf16`` where CUDA is available and ``cpu``/``fp32`` otherwise; ``mask_tta``: the
    engine's mask test-time augmentation (``checkpoint``, ``off``, ``hflip`` or ``flips``; a server
    uses its own).
    """

    model: str = "tabletop-tiny"
    vision_tower: str = ""
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = ""
    mask_tta: str = "checkpoint"
    server: str = ""
    server_timeout: float = 10.0

    def describe(self) -> str:
        if self.server:
            return f"server {self.server}"
        return f"model {self.model!r} ({self.device}, {self.dtype}{', ' + self.quantization if self.quantization else ''})"


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """Replace ``auto`` device/dtype: CUDA + bf16 where available, else CPU + fp32."""
    if device in ("", "auto"):
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:  # pragma: no cover - torch is a hard dependency of the engine
            device = "cpu"
    if dtype in ("", "auto"):
        dtype = "fp32" if device == "cpu" else "bf16"
    return device, dtype


def load_backend(config: BackendConfig) -> Any:
    """Connect to ``config.server`` or load ``config.model``; raises ``lisa_agent.errors.LisaError``."""
    if config.server:
        from lisa_agent import LisaClient

        return LisaClient(config.server, timeout=config.server_timeout)
    from lisa_agent import LisaSegmenter

    device, dtype = resolve_device(config.device, config.dtype)
    return LisaSegmenter.from_pretrained(
        config.model,
        vision_tower=config.vision_tower or None,
        dtype=dtype,
        device=device,
        quantization=config.quantization or None,
        mask_tta=config.mask_tta or "checkpoint",
    )
