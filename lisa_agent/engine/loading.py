"""Loading LISA checkpoints in the published layout (Hub id or folder) and saving in it.

Layout (as ``xinlai/LISA-7B-v1``): ``config.json`` (LLaMA fields + LISA's ``mm_*``/``out_dim``
fields), ``added_tokens.json``, a tokenizer (``tokenizer.model`` sentencepiece, or ``tokenizer.json``),
weights as sharded ``pytorch_model-0000N-of-0000M.bin`` + ``pytorch_model.bin.index.json`` (read with
``weights_only=True``) or safetensors (single or sharded). The CLIP tower is not in the checkpoint:
it loads from ``vision_tower`` (a Hub id, a folder, or a folder relative to the checkpoint).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import MASK_TTA_VIEWS, EngineConfig
from ..errors import (
    CheckpointError,
    DependencyError,
    InvalidArgumentError,
    ModelNotFoundError,
    QuantizationError,
)
from .modeling.lisa import (
    IGNORABLE_PREFIXES,
    IGNORABLE_SUFFIXES,
    LisaModel,
    to_internal_key,
    to_published_key,
)
from .modeling.sam import SamSpec, infer_sam_spec

if TYPE_CHECKING:
    from transformers import CLIPVisionModel

    from .modeling.clip import ClipPatchFeatures

log = logging.getLogger(__name__)

#: Short names for models shipped inside the package.
BUNDLED_MODELS = {"tabletop-tiny": Path(__file__).resolve().parents[1] / "assets" / "tabletop-tiny"}

#: config.json fields LISA adds on top of LLaMA's (not passed to ``LlamaConfig``).
LISA_FIELDS = (
    "mm_vision_tower", "vision_tower", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature",
    "mm_use_im_start_end", "mm_use_im_patch_token", "out_dim", "train_mask_decoder", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "image_aspect_ratio", "image_grid_pinpoints", "sam_image_size", "conv_template",
    "sam_decoder_num_heads", "architectures", "model_type", "_name_or_path", "transformers_version",
    "torch_dtype", "dtype", "use_mm_proj", "mm_projector_type", "lisa_agent",
)

#: torch dtype of each precision name of :data:`lisa_agent.config.DTYPES` (``auto`` is resolved first)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: The oldest transformers we run on; ``pyproject.toml`` pins the same. 5.0 to 5.3 caches take a
#: ``cache_position`` argument our decoders do not pass; 5.4 and 5.5 cannot read a CLIP tower saved without
#: the ``vision_model.`` prefix (as 5.6 and later save it, the bundled tabletop-tiny's included).
MIN_TRANSFORMERS = "5.6.0"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    return _download(text, ["*.json", "*.bin", "*.safetensors", "tokenizer.model", "*.txt"])


def _download(repo_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # the Hub client raises many types: name the model and the cause
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Check the id, your network, or pass a local folder.") from exc


# ------------------------------------------------------------------------- weights
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


# ------------------------------------------------------------------------- precision
def resolve_precision(config: EngineConfig) -> tuple[torch.dtype, torch.device]:
    """The torch dtype and device of ``config``: ``auto`` device is CUDA when available, else the CPU;
    ``auto`` dtype is bf16 on CUDA and fp32 elsewhere; quantized models compute in bf16 unless fp16
    is asked for (fp16 compute with 4-bit is reported to give blank masks)."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tdevice = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"unknown device {config.device!r}: {exc}") from exc
    if tdevice.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {config.device!r} asked for, but CUDA is not available here; use "
                                   "device='cpu' or 'auto'")
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bf16" if tdevice.type == "cuda" else "fp32"
    tdtype = TORCH_DTYPES[dtype]
    if config.quantization is not None:
        backend = resolve_quant_backend(config, tdevice)
        if backend == "bitsandbytes" and tdevice.type != "cuda":
            raise QuantizationError(f"{config.quantization} quantization with bitsandbytes needs a CUDA device; got "
                                    f"{tdevice} (quant_backend torchao quantizes 8bit on the CPU)")
        if backend == "torchao" and config.quantization == "4bit" and tdevice.type != "cuda":
            raise QuantizationError("4bit weights with torchao need a CUDA device (its int4 kernels); use 8bit on "
                                    f"the CPU; got {tdevice}")
        if tdtype == torch.float32 and tdevice.type == "cuda":
            tdtype = torch.bfloat16
    return tdtype, tdevice


def resolve_quant_backend(config: EngineConfig, device: torch.device) -> str | None:
    """Where ``config``'s quantized weights come from: its ``quant_backend``, or for ``auto`` bitsandbytes when
    it runs on ``device`` (a CUDA GPU its kernels were built for: the aarch64 wheels lacked Jetson Orin's sm_87)
    and torchao otherwise (the CPU included). None without quantization."""
    if config.quantization is None:
        return None
    if config.quant_backend != "auto":
        return config.quant_backend
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if _bitsandbytes_runs(index, config.quantization):
            return "bitsandbytes"
    return "torchao"


#: what :func:`_bitsandbytes_runs` runs in a child process: one bitsandbytes layer, forward, on cuda:<index>
_BNB_PROBE = """
import sys, torch, bitsandbytes as bnb
quantization, device = sys.argv[1], torch.device("cuda", int(sys.argv[2]))
with torch.no_grad():
    if quantization == "8bit":
        layer, dtype = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False), torch.float16
    else:
        layer, dtype = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"), torch.bfloat16
    layer.to(device)(torch.zeros(1, 64, dtype=dtype, device=device))
    torch.cuda.synchronize(device)
print("bitsandbytes runs")
"""


@functools.cache
def _bitsandbytes_runs(index: int, quantization: str, timeout: float = 180.0) -> bool:
    """Whether a bitsandbytes layer of ``quantization`` imports and runs a forward pass on ``cuda:<index>``,
    tried in a child process: bitsandbytes' native code has ended its process (``exit()``) on CUDA errors,
    which no ``try`` catches. Asked once per (device, quantization) and process."""
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-c", _BNB_PROBE, quantization, str(index)], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("bitsandbytes probe did not finish (%s); quantizing with torchao", exc)
        return False
    if proc.returncode == 0 and proc.stdout.strip().endswith("bitsandbytes runs"):
        return True
    last = next((line for line in reversed(proc.stderr.strip().splitlines()) if line.strip()), "no message")
    log.info("bitsandbytes does not run on cuda:%d (exit %d: %s); quantizing with torchao", index, proc.returncode,
             last[:200])
    return False


#: torchao's int4 weight layout: tinygemm's tile-packed weights, multiplied by PyTorch's own
#: ``aten._weight_int4pack_mm`` CUDA kernel (compute capability 8.0 and later: A100, H100/H200, Jetson Orin's
#: sm_87). torchao's default layout ("plain") needs the separate mslk kernel package, which Jetson lacks.
INT4_PACKING = "tile_packed_to_4d"
#: int4 group sizes, largest first: each linear layer takes the first that divides its input width
INT4_GROUP_SIZES = (128, 64, 32)


def torchao_config(quantization: str, in_features: int) -> Any | None:
    """torchao's weight-only config for one linear layer of ``in_features`` inputs: int8 per channel, or int4
    in :data:`INT4_PACKING` with the largest group size of :data:`INT4_GROUP_SIZES` that divides
    ``in_features`` (None when none does: that layer stays unquantized)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if quantization == "8bit":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    group = next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)
    if group is None:
        return None
    return Int4WeightOnlyConfig(group_size=group, int4_packing_format=INT4_PACKING, set_inductor_config=False)


def quantize_llm_torchao(model: LisaModel, quantization: str) -> None:
    """Weight-only int8 (CPU and CUDA) or int4 (CUDA, see :func:`torchao_config`) for the LLaMA decoder
    layers' linear layers with torchao, in place on the model's device; SAM, the projector,
    ``text_hidden_fcs``, embeddings and ``lm_head`` stay as they are."""
    try:
        from torchao.quantization import quantize_

        linears = [m for layer in model.llm.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        skipped = 0
        device = model.device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            for linear in linears:  # torchao's kernels check the current device's capability
                config = torchao_config(quantization, linear.in_features)
                if config is None:
                    skipped += 1
                    continue
                quantize_(linear, config)
        if skipped:
            log.warning("%d of %d linear layers stay unquantized: no int4 group size of %s divides their width",
                        skipped, len(linears), INT4_GROUP_SIZES)
    except Exception as exc:  # ImportError, or kernels this device lacks
        raise QuantizationError(f"torchao cannot quantize to {quantization} here ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); install lisa-agent[quant], "
                                "or choose another quantization") from exc


def quantize_llm(model: LisaModel, quantization: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Replace the LLaMA decoder layers' linear layers with bitsandbytes 8-bit / 4-bit (nf4, double quant).

    SAM, the projector, ``text_hidden_fcs``, embeddings and ``lm_head`` stay in 16-bit.
    """
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError or a CUDA setup error
        raise QuantizationError(f"bitsandbytes is not usable here ({exc}); install lisa-agent[quant]") from exc
    for layer in model.llm.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                w = child.weight.data.to(torch.float16).cpu()
                bias = child.bias is not None
                if quantization == "8bit":
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias,
                                            has_fp16_weights=False, threshold=6.0)
                    q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias,
                                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
                if bias:
                    q.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                setattr(parent, name, q.to(device))


# ------------------------------------------------------------------------- whole model
@dataclass
class LoadedLisa:
    model: LisaModel
    config: LisaConfig
    folder: Path


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
