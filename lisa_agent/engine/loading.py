"""Loading LISA checkpoints in the published layout (Hub id or folder): the entry points.

Layout (as ``xinlai/LISA-7B-v1``): ``config.json`` (LLaMA fields + LISA's ``mm_*``/``out_dim``
fields), ``added_tokens.json``, a tokenizer (``tokenizer.model`` sentencepiece, or ``tokenizer.json``),
weights as sharded ``pytorch_model-0000N-of-0000M.bin`` + ``pytorch_model.bin.index.json`` (read with
``weights_only=True``) or safetensors (single or sharded). The CLIP tower is not in the checkpoint:
it loads from ``vision_tower`` (a Hub id, a folder, or a folder relative to the checkpoint).

Here: finding the checkpoint (:func:`resolve_checkpoint`), the CLIP tower (:func:`load_vision_tower`) and
the whole model (:func:`load_lisa`). The pieces: :mod:`~lisa_agent.engine.weights` (reading and mapping
weights), :mod:`~lisa_agent.engine.build` (``config.json`` and constructing the model),
:mod:`~lisa_agent.engine.quantization` (8-bit / 4-bit) and :mod:`~lisa_agent.engine.device` (device and dtype);
:mod:`~lisa_agent.engine.checkpoints` writes checkpoints.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, ModelNotFoundError
from .build import (
    LISA_FIELDS,
    MIN_TRANSFORMERS,
    LisaConfig,
    assemble,
    build_model,
    check_transformers,
    default_template,
)
from .device import TORCH_DTYPES, resolve_precision
from .modeling.lisa import LisaModel
from .modeling.sam import infer_sam_spec
from .quantization import (
    INT4_GROUP_SIZES,
    INT4_PACKING,
    quantize_llm,
    quantize_llm_torchao,
    resolve_quant_backend,
    torchao_config,
)
from .weights import load_weights, map_published_keys, published_state_dict, read_state_dict, rebuild_buffers

if TYPE_CHECKING:
    from transformers import CLIPVisionModel

#: What this module exported before its pieces moved to :mod:`~lisa_agent.engine.build`,
#: :mod:`~lisa_agent.engine.weights`, :mod:`~lisa_agent.engine.quantization` and
#: :mod:`~lisa_agent.engine.device`: still importable from here.
__all__ = [
    "BUNDLED_MODELS", "INT4_GROUP_SIZES", "INT4_PACKING", "LISA_FIELDS", "MIN_TRANSFORMERS", "TORCH_DTYPES",
    "LisaConfig", "LoadedLisa", "assemble", "build_model", "check_transformers", "default_template", "load_lisa",
    "load_vision_tower", "load_weights", "map_published_keys", "published_state_dict", "quantize_llm",
    "quantize_llm_torchao", "read_state_dict", "rebuild_buffers", "resolve_checkpoint", "resolve_precision",
    "resolve_quant_backend", "torchao_config",
]

#: Short names for models shipped inside the package.
BUNDLED_MODELS = {"tabletop-tiny": Path(__file__).resolve().parents[1] / "assets" / "tabletop-tiny"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------------- locating
def resolve_checkpoint(model: str | os.PathLike[str]) -> Path:
    """Folder holding ``model``: a bundled short name, a local folder, or a Hub id (downloaded).

    Raises :class:`ModelNotFoundError` naming the model and what was tried.
    """
    text = str(model)
    if text in BUNDLED_MODELS:
        path = BUNDLED_MODELS[text]
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"bundled model {text!r} is not in this installation (expected {path})")
        return path
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json: not a LISA checkpoint")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    if not _HUB_ID.match(text):
        raise ModelNotFoundError(
            f"model {text!r} is neither a local folder nor a Hub id (owner/name); "
            f"bundled models: {sorted(BUNDLED_MODELS)}")
    return download_snapshot(text, ["*.json", "*.bin", "*.safetensors", "tokenizer.model", "*.txt"])


def download_snapshot(repo_id: str, patterns: list[str]) -> Path:
    """The local folder of Hub repository ``repo_id`` with the files matching ``patterns`` (ModelNotFoundError naming the
    model and the cause when it cannot be fetched)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # the Hub client raises many types: name the model and the cause
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Check the id, your network, or pass a local folder.") from exc


# ------------------------------------------------------------------------- vision tower
def load_vision_tower(name: str, checkpoint_dir: Path | None, dtype: torch.dtype) -> CLIPVisionModel:
    """A transformers ``CLIPVisionModel`` from a folder (absolute or relative to the checkpoint) or Hub id."""
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    candidates = [Path(name).expanduser()]
    if checkpoint_dir is not None:
        candidates.insert(0, checkpoint_dir / name)
    loaded: Any  # (model, loading info) with output_loading_info
    for cand in candidates:
        if cand.is_dir():
            try:
                loaded = CLIPVisionModel.from_pretrained(str(cand), dtype=dtype, output_loading_info=True)
            except Exception as exc:  # transformers / safetensors / json raise many types on damaged files
                raise CheckpointError(f"cannot load the vision tower in {cand} ({type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); its files are "
                                      "damaged or incomplete") from exc
            return _all_weights_read(loaded[0], loaded[1], str(cand))
    if not _HUB_ID.match(name):
        raise ModelNotFoundError(f"vision tower {name!r} is neither a folder nor a Hub id")
    try:
        loaded = CLIPVisionModel.from_pretrained(name, dtype=dtype, output_loading_info=True)
    except Exception as exc:
        raise ModelNotFoundError(
            f"vision tower {name!r} could not be loaded ({type(exc).__name__}); it is not part of LISA "
            "checkpoints: pass vision_tower=<local folder of openai/clip-vit-large-patch14> when offline") from exc
    return _all_weights_read(loaded[0], loaded[1], name)


def _all_weights_read(tower: CLIPVisionModel, info: dict[str, Any], source: str) -> CLIPVisionModel:
    """``tower`` in eval mode, or a :class:`CheckpointError` when transformers left weights it did not find
    randomly initialised (it only logs them): a CLIP tower with random layers answers wrongly, silently."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        import transformers

        raise CheckpointError(
            f"the vision tower in {source} lacks {len(missing)} weights that CLIPVisionModel expects "
            f"({', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}) with transformers "
            f"{transformers.__version__}: a damaged tower, or a key layout this transformers cannot read")
    return tower.eval()


# ------------------------------------------------------------------------- whole model
@dataclass
class LoadedLisa:
    """What :func:`load_lisa` returns: the model ready for inference, its checkpoint's config and folder."""

    model: LisaModel
    config: LisaConfig
    folder: Path


def load_lisa(folder: Path, *, vision_tower: str | None, dtype: torch.dtype, device: torch.device,
              quantization: str | None = None, sam_attention: str = "auto",
              quant_backend: str | None = "bitsandbytes") -> LoadedLisa:
    """Read config and weights from ``folder``, build the model, load the CLIP tower; ready for inference."""
    from .modeling.clip import ClipPatchFeatures

    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON: {exc}") from exc
    config = LisaConfig.from_dict(raw, str(folder / "config.json"))
    state = read_state_dict(folder)
    mapped, _ignored, unknown = map_published_keys(state)
    del state
    sam_spec = infer_sam_spec(mapped, prefix="sam.", decoder_num_heads=config.sam_decoder_num_heads)
    if config.sam_image_size and config.sam_image_size != sam_spec.img_size:
        raise CheckpointError(f"config sam_image_size {config.sam_image_size} disagrees with the SAM weights "
                              f"({sam_spec.img_size} px)")
    model = build_model(config, sam_spec, meta=True)
    load_weights(model, mapped, unknown)
    tower = load_vision_tower(vision_tower or config.vision_tower, folder, dtype)
    vision = ClipPatchFeatures(tower, config.mm_vision_select_layer, config.mm_vision_select_feature)
    if vision.hidden_size != config.mm_hidden_size:
        raise CheckpointError(f"vision tower width {vision.hidden_size} differs from mm_hidden_size "
                              f"{config.mm_hidden_size} in config.json")
    assemble(model, vision, dtype=dtype, device=device, quantization=quantization, sam_attention=sam_attention,
             quant_backend=quant_backend)
    return LoadedLisa(model=model, config=config, folder=folder)
