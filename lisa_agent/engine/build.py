"""The LISA model's configuration (``config.json``) and its construction.

:class:`LisaConfig` holds LISA's fields of ``config.json`` and the LLaMA config (validated at construction);
:func:`build_model` is the one place a :class:`~lisa_agent.engine.modeling.lisa.LisaModel` is constructed
(loading, tiny checkpoints, the benchmark's random 7B/13B shapes), refusing a transformers older than
:data:`MIN_TRANSFORMERS`; :func:`assemble` makes a model whose weights are in place ready for inference (cast,
buffers, quantization, device, CLIP features, SAM's attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config import MASK_TTA_VIEWS
from ..errors import CheckpointError, DependencyError
from .modeling.lisa import LisaModel
from .modeling.sam import SamSpec
from .quantization import quantize_llm, quantize_llm_torchao
from .weights import rebuild_buffers

if TYPE_CHECKING:
    from .modeling.clip import ClipPatchFeatures

#: config.json fields LISA adds on top of LLaMA's (not passed to ``LlamaConfig``).
LISA_FIELDS = (
    "mm_vision_tower", "vision_tower", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature",
    "mm_use_im_start_end", "mm_use_im_patch_token", "out_dim", "train_mask_decoder", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "image_aspect_ratio", "image_grid_pinpoints", "sam_image_size", "conv_template",
    "sam_decoder_num_heads", "architectures", "model_type", "_name_or_path", "transformers_version",
    "torch_dtype", "dtype", "use_mm_proj", "mm_projector_type", "lisa_agent",
)

#: The oldest transformers we run on; ``pyproject.toml`` pins the same. 5.0 to 5.3 caches take a
#: ``cache_position`` argument our decoders do not pass; 5.4 and 5.5 cannot read a CLIP tower saved without
#: the ``vision_model.`` prefix (as 5.6 and later save it, the bundled tabletop-tiny's included).
MIN_TRANSFORMERS = "5.6.0"


@dataclass
class LisaConfig:
    """LISA's fields of ``config.json`` plus the LLaMA config (validated at construction)."""

    llama: dict[str, Any]
    vision_tower: str
    mm_hidden_size: int
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_use_im_start_end: bool = True
    out_dim: int = 256
    sam_image_size: int | None = None
    conv_template: str = "llava_v1"
    sam_decoder_num_heads: int = 8
    #: ``lisa_agent.presence_gate`` of config.json (ours): {"threshold", "decline_prefix"} or None
    presence_gate: dict[str, Any] | None = None
    #: ``lisa_agent.mask_tta`` of config.json (ours): the views the checkpoint asks for; ``off`` if unset
    mask_tta: str = "off"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> LisaConfig:
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in d]
        if missing:
            raise CheckpointError(f"{source} lacks LLaMA fields {missing}")
        tower = d.get("vision_tower") or d.get("mm_vision_tower")
        if not tower:
            raise CheckpointError(f"{source} names no vision tower (vision_tower / mm_vision_tower)")
        cfg = cls(
            llama={k: v for k, v in d.items() if k not in LISA_FIELDS},
            vision_tower=str(tower),
            mm_hidden_size=int(d.get("mm_hidden_size", 1024)),
            mm_vision_select_layer=int(d.get("mm_vision_select_layer", -2)),
            mm_vision_select_feature=str(d.get("mm_vision_select_feature", "patch")),
            mm_use_im_start_end=bool(d.get("mm_use_im_start_end", True)),
            out_dim=int(d.get("out_dim", 256)),
            sam_image_size=int(d["sam_image_size"]) if d.get("sam_image_size") else None,
            conv_template=str(d.get("conv_template") or default_template(d)),
            sam_decoder_num_heads=int(d.get("sam_decoder_num_heads", 8)),
        )
        ours = d.get("lisa_agent") or {}
        if not isinstance(ours, dict):
            raise CheckpointError(f"{source}: lisa_agent must be an object; got {ours!r}")
        gate = ours.get("presence_gate")
        if gate is not None and not isinstance(gate, dict):
            raise CheckpointError(f"{source}: lisa_agent.presence_gate must be an object; got {gate!r}")
        cfg.presence_gate = dict(gate) if gate else None
        cfg.mask_tta = str(ours.get("mask_tta", "off"))
        if cfg.mask_tta not in MASK_TTA_VIEWS:
            raise CheckpointError(f"{source}: lisa_agent.mask_tta must be one of {', '.join(MASK_TTA_VIEWS)}; "
                                  f"got {cfg.mask_tta!r}")
        if cfg.mm_vision_select_feature not in ("patch", "cls_patch"):
            raise CheckpointError(f"{source}: unknown mm_vision_select_feature {cfg.mm_vision_select_feature!r}")
        return cfg

    def llama_config(self):  # noqa: ANN201
        from transformers import LlamaConfig

        cfg = LlamaConfig(**self.llama)
        cfg.use_cache = True
        cfg._attn_implementation = "sdpa"
        return cfg


def default_template(d: dict[str, Any]) -> str:
    """``llava_v1``: LISA's chat, demo and training scripts use it for every released model, the
    13B-llama2 ones included; ``llava_llama_2`` only when asked for (``template=`` or ``conv_template``)."""
    del d
    return "llava_v1"


def check_transformers(version: str | None = None) -> None:
    """Refuse a transformers older than :data:`MIN_TRANSFORMERS` (``version``: the installed one when None),
    with a :class:`DependencyError` that names both versions."""
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    if Version(version) < Version(MIN_TRANSFORMERS):
        raise DependencyError(f"transformers {version} is installed; lisa-agent needs transformers>={MIN_TRANSFORMERS},<6 "
                              "(older 5.x releases decode without our KV cache or cannot read our CLIP towers, and "
                              f"would answer wrongly): pip install 'transformers>={MIN_TRANSFORMERS},<6'")


def build_model(config: LisaConfig, sam_spec: SamSpec, meta: bool = True) -> LisaModel:
    """An (uninitialised when ``meta``) :class:`LisaModel` of the given configuration: the one place a
    LISA model is constructed (loading, tiny checkpoints, the benchmark's random 7B/13B shapes). Refuses a
    transformers older than :data:`MIN_TRANSFORMERS`."""
    check_transformers()
    llama_cfg = config.llama_config()
    if meta:
        with torch.device("meta"):
            return LisaModel(llama_cfg, sam_spec, config.mm_hidden_size, config.out_dim)
    return LisaModel(llama_cfg, sam_spec, config.mm_hidden_size, config.out_dim)


def assemble(model: LisaModel, vision: ClipPatchFeatures, *, dtype: torch.dtype, device: torch.device,
             quantization: str | None = None, sam_attention: str = "auto",
             quant_backend: str | None = "bitsandbytes") -> LisaModel:
    """Make a model whose weights are in place ready for inference: cast to ``dtype`` (SAM's neck stays
    float32 under fp16, as in LISA), rebuild the buffers checkpoints do not carry, quantize the LLM,
    move to ``device``, attach the CLIP features ``vision``, choose SAM's attention, freeze."""
    model.to(dtype)
    if dtype == torch.float16:
        model.sam.image_encoder.neck.float()  # as LISA: the neck's LayerNorm2d overflows in fp16
    rebuild_buffers(model, model.llm.config)  # after the cast: rotary frequencies stay float32
    if quantization and quant_backend == "bitsandbytes":
        quantize_llm(model, quantization, dtype, device)
    model.to(device)
    if quantization and quant_backend == "torchao":
        quantize_llm_torchao(model, quantization)
    model.attach_vision(vision.to(device))
    if sam_attention == "sdpa" or (sam_attention == "auto" and device.type == "cuda"):
        from .modeling.sam_attention import use_sdpa_attention

        use_sdpa_attention(model.sam)
    model.eval().requires_grad_(False)
    return model
