"""Loading a reasoner: which checkpoints are reasoners (:func:`checkpoint_model_type`, :func:`is_reasoner`) and
:func:`load_reasoner`, the Qwen2.5-VL model, its processor and SAM 2 in the precision an
:class:`~lisa_agent.config.EngineConfig` asks for.

A checkpoint is a reasoner when its ``config.json`` says ``"model_type": "qwen2_5_vl"`` (VisionReasoner-7B,
Seg-Zero-7B); LISA checkpoints say ``llava``. The SAM 2 checkpoint is ``EngineConfig.sam_model`` (None:
:data:`DEFAULT_SAM2`, transformers' conversion of SAM 2.1 Hiera-L; the public code uses the ``sam2`` package
with ``facebook/sam2-hiera-large``). 8-bit / 4-bit apply to the language model's decoder layers only, through
the same library choice as the LISA engine (:func:`~lisa_agent.engine.quantization.resolve_quant_backend`):
bitsandbytes via transformers' ``BitsAndBytesConfig`` at load time, or torchao's weight-only configs
(:func:`~lisa_agent.engine.quantization.torchao_config`) afterwards.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, TypedDict

import torch

from ..config import EngineConfig
from ..errors import InvalidArgumentError, ModelNotFoundError

log = logging.getLogger(__name__)

#: ``config.json`` model types that :func:`load_reasoner` loads.
REASONER_MODEL_TYPES = frozenset({"qwen2_5_vl"})
#: The SAM 2 checkpoint when ``EngineConfig.sam_model`` is None.
DEFAULT_SAM2 = "facebook/sam2.1-hiera-large"
#: What a reasoner checkpoint's Hub download fetches.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


def _read_model_type(config_json: Path) -> str | None:
    try:
        value = json.loads(config_json.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def checkpoint_model_type(model: str | os.PathLike[str]) -> str | None:
    """``config.json``'s ``model_type`` of ``model`` (a folder, or a Hub id: its config.json alone is fetched,
    or read from the cache); None for a bundled name or when it cannot be read (the LISA loader then reports
    what is wrong)."""
    from ..engine.loading import _HUB_ID, BUNDLED_MODELS

    text = os.fspath(model)
    if text in BUNDLED_MODELS:
        return None
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_model_type(path / "config.json")
    if path.exists() or not _HUB_ID.match(text):
        return None
    try:
        from huggingface_hub import hf_hub_download

        return _read_model_type(Path(hf_hub_download(text, "config.json")))
    except Exception:  # noqa: BLE001 - offline, unknown id, ...: the LISA loader names the problem
        return None


def is_reasoner(model: str | os.PathLike[str]) -> bool:
    """True when ``model``'s ``config.json`` names a reasoner model type (:data:`REASONER_MODEL_TYPES`)."""
    return checkpoint_model_type(model) in REASONER_MODEL_TYPES


def resolve_reasoner(model: str) -> Path:
    """The folder holding ``model`` (a local folder, or a Hub id downloaded with :data:`HUB_PATTERNS`)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json")
        return path
    from ..engine.loading import download_snapshot

    return download_snapshot(model, list(HUB_PATTERNS))


def _check_lisa_only(config: EngineConfig) -> None:
    """Refuse options that only mean something for LISA when they ask for something."""
    if config.vision_tower is not None:
        raise InvalidArgumentError("vision_tower is a LISA option: a reasoner checkpoint brings its own vision encoder")
    if config.mask_tta not in ("checkpoint", "off"):
        raise InvalidArgumentError(f"mask_tta {config.mask_tta} is a LISA option; a reasoner has none (use off)")
    if config.presence_threshold not in ("checkpoint", None):
        raise InvalidArgumentError("presence_threshold is a LISA option: a reasoner says 'nothing found' itself")


def _bnb_config(quantization: str, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    skip = ["visual", "lm_head"]
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)


def quantize_language_model_torchao(model: Any, quantization: str) -> int:
    """torchao weight-only int8 / int4 for the linear layers of the language model's decoder layers (the vision
    encoder, embeddings and ``lm_head`` stay); returns how many layers were quantized."""
    from ..engine.quantization import quantize_layers_torchao

    return quantize_layers_torchao(model.model.language_model.layers, next(model.parameters()).device, quantization)


def load_sam2(name: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """A transformers ``Sam2Model`` (eval, on ``device`` in ``dtype``) and its ``Sam2Processor`` from a folder
    or a Hub id."""
    from transformers import Sam2Model, Sam2Processor

    try:
        sam: Any = Sam2Model.from_pretrained(name, dtype=dtype)
        processor = Sam2Processor.from_pretrained(name)
    except OSError as exc:
        raise ModelNotFoundError(f"SAM 2 checkpoint {name!r} could not be loaded ({str(exc).splitlines()[0][:200]}); "
                                 "pass a local folder or a Hub id in transformers' format (sam_model)") from exc
    return sam.to(device).eval(), processor


def load_reasoner(config: EngineConfig) -> Any:
    """A :class:`~lisa_agent.reasoner.segmenter.ReasonerSegmenter` for ``config.model`` (a reasoner checkpoint:
    :func:`is_reasoner`), with ``config``'s device, precision, quantization, SAM 2 checkpoint (``sam_model``),
    template (a reasoner style, or None: the checkpoint's ``lisa_agent.reasoner_template``, else guessed from its
    name), ``reasoner_behaviour`` (``public``: union mask, strict parser, EOS only) and mask limits."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from ..engine.device import resolve_precision
    from ..engine.quantization import resolve_quant_backend
    from .segmenter import ReasonerSegmenter
    from .templates import STYLE_NAMES, style_for

    _check_lisa_only(config)
    if config.template is not None and config.template not in STYLE_NAMES:
        raise InvalidArgumentError(f"template {config.template!r} is a LISA template; a reasoner takes "
                                   f"{' or '.join(STYLE_NAMES)}")
    dtype, device = resolve_precision(config)
    folder = resolve_reasoner(config.model)
    declared = (json.loads((folder / "config.json").read_text()).get("lisa_agent") or {}).get("reasoner_template")
    style = style_for(config.template or declared, config.model)
    backend = resolve_quant_backend(config, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if config.quantization is not None and backend == "bitsandbytes":
        kwargs.update(quantization_config=_bnb_config(config.quantization, dtype), device_map={"": str(device)})
    try:
        model: Any = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, **kwargs)
        processor = AutoProcessor.from_pretrained(folder, padding_side="left")
    except OSError as exc:
        raise ModelNotFoundError(f"{config.model}: {str(exc).splitlines()[0][:200]}") from exc
    if "device_map" not in kwargs:
        model = model.to(device)
    model.eval()
    if config.quantization is not None and backend == "torchao":
        quantize_language_model_torchao(model, config.quantization)
    sam_name = config.sam_model or DEFAULT_SAM2
    sam, sam_processor = load_sam2(sam_name, dtype, device)
    log.info("loaded reasoner %s (%s) with SAM 2 %s", config.model, style.name, sam_name)
    public = config.reasoner_behaviour == "public"
    return ReasonerSegmenter(model, processor, sam, sam_processor, style=style, name=config.model, sam_name=sam_name,
                             union=public, strict=public, stop_at_answer=not public,
                             think=config.reasoner_think == "on",
                             max_masks=config.max_masks, max_mask_megapixels=config.max_mask_megapixels,
                             quantization=config.quantization, quant_backend=backend, config=config,
                             **generation_switches(config, device))


class GenerationSwitches(TypedDict):
    """The generation levers of :meth:`ReasonerSegmenter.set_optimizations`."""

    static_cache: bool
    cuda_graphs: bool


def generation_switches(config: EngineConfig, device: torch.device) -> GenerationSwitches:
    """The :meth:`ReasonerSegmenter.set_optimizations` switches ``config`` asks for on ``device``: ``static_cache``
    auto is on with CUDA only (on the CPU it measured no faster: docs/reasoner.md), ``cuda_graphs`` auto (the
    segmenter keeps it only on CUDA)."""
    return {"static_cache": config.static_cache == "auto" and device.type == "cuda",
            "cuda_graphs": config.cuda_graphs == "auto"}


__all__ = ["DEFAULT_SAM2", "HUB_PATTERNS", "REASONER_MODEL_TYPES", "GenerationSwitches", "checkpoint_model_type",
           "generation_switches", "is_reasoner", "load_reasoner", "load_sam2", "quantize_language_model_torchao", "resolve_reasoner"]
