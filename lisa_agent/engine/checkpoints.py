"""Writing checkpoints in the published LISA layout (reading them is :mod:`lisa_agent.engine.loading`, the
weights :mod:`lisa_agent.engine.weights`).

Every writer goes through here: tiny checkpoints (:mod:`lisa_agent.engine.tiny`), the trainer's saves
(:class:`lisa_agent.training.trainer.Trainer`), ``resize-sam`` and ``calibrate-gate --write``. The
layout: ``config.json``, the tokenizer files, weights under the published key names as 2 ``.bin``
shards + ``pytorch_model.bin.index.json`` (or one ``model.safetensors``), and the CLIP tower in its own
folder named by ``config.json``'s ``vision_tower``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

#: Tokenizer files of the published layout (whichever a checkpoint has are copied along).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
#: Where a written checkpoint keeps its CLIP tower (named relatively in config.json).
VISION_TOWER_DIR = "vision_tower"


def read_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of the checkpoint in ``folder`` as a dict."""
    return json.loads((Path(folder) / "config.json").read_text())


def write_config(out: str | Path, config: dict[str, Any]) -> Path:
    """Write ``config`` as ``out/config.json`` (indented, as the released checkpoints); returns its path."""
    path = Path(out) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def copy_tokenizer(source: str | Path, out: str | Path) -> None:
    """Copy the tokenizer files :data:`TOKENIZER_FILES` that ``source`` has into ``out``."""
    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)


def save_state_dict(state: dict[str, torch.Tensor], out: str | Path, *, shards: int = 2,
                    safetensors: bool = False) -> None:
    """Write published-name weights as ``shards`` ``.bin`` files + index (or one safetensors file),
    replacing the weight files ``out`` held before."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("pytorch_model*.bin"), *out.glob("pytorch_model.bin.index.json"),
                *out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        old.unlink()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[s * per:(s + 1) * per]}
        torch.save(part, out / name)
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def clip_preprocessor_config(image_size: int) -> dict[str, Any]:
    """``preprocessor_config.json`` of a CLIP tower: resize the shortest side to ``image_size``,
    centre-crop a square of it, CLIP's mean / std (as openai/clip-vit-large-patch14, at another size)."""
    from .preprocess import CLIP_MEAN, CLIP_STD

    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True}


def save_vision_tower(tower: Any, out: str | Path, image_size: int, preprocessor: dict[str, Any] | None = None) -> None:
    """Save a transformers ``CLIPVisionModel`` to ``out`` with its ``preprocessor_config.json``
    (``preprocessor``, or CLIP's defaults, with the crop set to the tower's ``image_size``)."""
    out = Path(out)
    tower.save_pretrained(str(out))
    proc = dict(preprocessor) if preprocessor is not None else clip_preprocessor_config(image_size)
    proc["size"] = {"shortest_edge": image_size}
    proc["crop_size"] = {"height": image_size, "width": image_size}
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2))


def copy_vision_tower(source: str | Path, out: str | Path, config: dict[str, Any]) -> None:
    """Copy ``source``'s CLIP tower folder (``config['vision_tower']``, when it is a folder there) into ``out``."""
    tower = config.get("vision_tower", "")
    if tower and (Path(source) / tower).is_dir() and Path(source).resolve() != Path(out).resolve():
        shutil.copytree(Path(source) / tower, Path(out) / tower, dirs_exist_ok=True)


def write_checkpoint(out: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor], *,
                     source: str | Path | None = None, shards: int = 2, safetensors: bool = False) -> Path:
    """Write a whole checkpoint: ``config.json``, weights, and (from ``source``) the tokenizer files.

    The vision tower is the caller's: :func:`copy_vision_tower` or :func:`save_vision_tower`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if source is not None:
        copy_tokenizer(source, out)
    write_config(out, config)
    save_state_dict(state, out, shards=shards, safetensors=safetensors)
    return out
