"""Reading a checkpoint's weights and mapping them onto the model.

:func:`read_state_dict` reads every tensor of a checkpoint folder (sharded or single ``pytorch_model*.bin``,
read with ``weights_only=True``, or safetensors); :func:`map_published_keys` renames the published keys to
ours and :func:`published_state_dict` goes back; :func:`load_weights` puts them into a meta-initialised
:class:`~lisa_agent.engine.modeling.lisa.LisaModel`, checking that every parameter is accounted for, and
:func:`rebuild_buffers` recreates what checkpoints do not carry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .modeling.lisa import (
    IGNORABLE_PREFIXES,
    IGNORABLE_SUFFIXES,
    LisaModel,
    to_internal_key,
    to_published_key,
)


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (sharded or single ``.bin`` / safetensors), on the CPU."""
    for index_name, loader in (("model.safetensors.index.json", _load_safetensors),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index_path} is not a valid shard index: {exc}") from exc
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise CheckpointError(f"shard {shard} listed in {index_name} is missing from {folder}")
                state.update(loader(folder / shard))
            listed = set(weight_map)
            if listed != set(state):
                raise CheckpointError(
                    f"{index_name} and its shards disagree: listed but absent {sorted(listed - set(state))[:5]}, "
                    f"present but unlisted {sorted(set(state) - listed)[:5]}")
            return state
    if (folder / "model.safetensors").is_file():
        return _load_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _load_bin(folder / "pytorch_model.bin")
    raise CheckpointError(
        f"no weights in {folder}: expected pytorch_model.bin(.index.json) or model.safetensors(.index.json)")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a weights-only PyTorch file: {exc}") from exc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc


def map_published_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename published keys to ours. Returns ``(mapped, ignored, unknown)`` key lists."""
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        if key.endswith(IGNORABLE_SUFFIXES) or key.startswith(IGNORABLE_PREFIXES):
            ignored.append(key)
            continue
        ours = to_internal_key(key)
        if ours is None:
            unknown.append(key)
        else:
            mapped[ours] = value
    return mapped, ignored, unknown


def published_state_dict(model: LisaModel) -> dict[str, torch.Tensor]:
    """Our model's weights under the published key names (CLIP tower and recomputed buffers excluded)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision.") or key.endswith(IGNORABLE_SUFFIXES):
            continue
        pub = to_published_key(key)
        if pub is not None:
            out[pub] = value
    return out


def load_weights(model: LisaModel, mapped: dict[str, torch.Tensor], unknown: Iterable[str] = ()) -> None:
    """Load ``mapped`` into a (meta-initialised) model; every parameter must be accounted for.

    Raises :class:`CheckpointError` naming missing keys (published names), unexpected keys and
    shape mismatches.
    """
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("vision.")}
    expected_keys = {k for k in expected if not k.endswith(IGNORABLE_SUFFIXES)}
    missing = sorted(to_published_key(k) or k for k in expected_keys - set(mapped))
    unexpected = sorted([to_published_key(k) or k for k in set(mapped) - expected_keys] + list(unknown))
    bad_shapes = [f"{to_published_key(k)}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected_keys & set(mapped) if tuple(mapped[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}"
                        f"{' ...' if len(unexpected) > 12 else ''}")
    if bad_shapes:
        problems.append("shape mismatches: " + "; ".join(bad_shapes[:8]))
    if problems:
        raise CheckpointError("checkpoint does not match the LISA model: " + " | ".join(problems))
    model.load_state_dict(mapped, strict=False, assign=True)


def rebuild_buffers(model: LisaModel, llama_config: Any) -> None:
    """Recreate buffers that checkpoints do not carry (rotary frequencies, SAM pixel mean/std)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.llm.model.rotary_emb = LlamaRotaryEmbedding(config=llama_config)
    from .modeling.sam import PIXEL_MEAN, PIXEL_STD

    model.sam.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
    model.sam.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"weights never loaded for: {still_meta[:10]}")
