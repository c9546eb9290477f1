"""``EngineConfig``: the one declaration of the engine's options, their defaults, choices and help.

Every door builds one: :meth:`LisaSegmenter.from_pretrained(model, **options)
<lisa_agent.engine.segmenter.LisaSegmenter.from_pretrained>` in Python, the command line's flags
(:func:`add_engine_arguments`, used by every model-loading command and ``serve``), the ROS node's
parameters and the launch file's arguments (:func:`engine_parameters`). Names, help texts, choices and
defaults come from the fields below, so the doors cannot drift apart.

Each option also has a *text form* (what a flag, a ROS parameter or a launch argument carries):
``vision_tower`` / ``template`` ``""`` mean "the checkpoint's own", ``quantization`` ``none`` means
none, ``presence_threshold`` is ``checkpoint``, ``off`` or a number. :meth:`EngineConfig.from_texts`
and :meth:`EngineConfig.to_texts` convert.

Nothing here imports torch: the CLI builds its parser and the launch file its arguments without it.
``device="auto"`` and ``dtype="auto"`` are resolved when the model loads
(:func:`lisa_agent.engine.device.resolve_precision`): CUDA when present, bf16 on CUDA and fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import InvalidArgumentError
from .options import (
    Declared,
    Option,
    add_arguments,
    from_args,
    none_text,
    option,
    parameters,
    parse_float,
    parse_int,
    parse_optional,
)

#: Precision names (``auto``: bf16 on CUDA, fp32 on the CPU) and the aliases accepted for them.
DTYPES = ("auto", "fp32", "bf16", "fp16")
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
#: LLM weight quantization, text form (``none`` is None).
QUANTIZATIONS = ("none", "8bit", "4bit")
#: Mask test-time augmentation -> the views SAM sees, as (flip rows, flip columns); the first is the frame.
MASK_TTA_VIEWS: dict[str, tuple[tuple[bool, bool], ...]] = {
    "off": ((False, False),),
    "hflip": ((False, False), (False, True)),
    "flips": ((False, False), (False, True), (True, False), (True, True)),
}
#: ``mask_tta`` values: ``checkpoint`` (what the checkpoint's config.json declares) or a view set.
MASK_TTA_CHOICES = ("checkpoint", *MASK_TTA_VIEWS)
#: SAM image-encoder attention implementations.
SAM_ATTENTION = ("auto", "sdpa", "original")
#: Where 8-bit / 4-bit weights come from: ``auto`` (bitsandbytes where it runs on the device, else torchao).
QUANT_BACKENDS = ("auto", "bitsandbytes", "torchao")
#: Hot-path optimizations: ``auto`` (on where they apply) or ``off``.
SWITCH = ("auto", "off")
#: An opt-out switch: ``on`` (the default) or ``off``.
SWITCH_ON = ("on", "off")
#: torch.compile of the image encoders: opt-in.
COMPILE = ("off", "on")
#: Where frames are resized and normalised: PIL on the CPU (``exact``) or torch on the engine's device.
PREPROCESS = ("auto", "exact", "device")
#: Conversation templates of the released LISA models (``None``: the checkpoint's own); the engine's
#: :data:`lisa_agent.engine.prompts.TEMPLATES` holds them (a test checks the two agree).
TEMPLATE_CHOICES = ("llava_v1", "llava_llama_2")
#: Prompt styles of reasoner checkpoints (Qwen2.5-VL: VisionReasoner, Seg-Zero), also accepted as ``template``;
#: :data:`lisa_agent.reasoner.templates.STYLES` holds them.
REASONER_TEMPLATE_CHOICES = ("vision_reasoner", "seg_zero")
#: How a reasoner's answer becomes masks: ``ours`` (one mask per object, a tolerant parser, a stop after
#: ``</answer>``) or ``public`` (the public code's single union mask, its parser, EOS only).
REASONER_BEHAVIOURS = ("ours", "public")
#: The default model: the bundled checkpoint, so every door works offline on a fresh machine.
DEFAULT_MODEL = "tabletop-tiny"

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _quantization(text: str) -> str | None:
    value = text.strip().lower()
    return None if value in ("", "none") else value


def _threshold(text: str) -> float | str | None:
    value = text.strip().lower()
    if value == "checkpoint":
        return value
    if value in ("off", "none", "false"):  # YAML (ROS parameters, launch files) reads a bare `off` as false
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"presence_threshold must be 'checkpoint', 'off' or a number in (0, 1); got {text!r}") from None


def _threshold_text(value: Any) -> str:
    return "off" if value is None else str(value)


def mask_budget(max_masks: int, max_mask_megapixels: float, views: int, height: int, width: int) -> int:
    """Masks one answer may have on a ``height`` x ``width`` frame: at most ``max_masks``, and at most
    ``max_mask_megapixels`` of masks x mirrored ``views`` x frame pixels (each mask is a full-frame float
    image per view). 0 when even one mask would cost more."""
    per_mask = max(1, int(views)) * int(height) * int(width) / 1e6
    return max(0, min(int(max_masks), int(float(max_mask_megapixels) // per_mask)))


@dataclass(frozen=True)
class EngineConfig(Declared):
    """Options of one :class:`~lisa_agent.engine.segmenter.LisaSegmenter`, validated at construction.

    Attributes:
        model: Hub id (``xinlai/LISA-7B-v1``), local checkpoint folder, or a bundled short name
            (``tabletop-tiny``, the default).
        vision_tower: CLIP tower id or folder; None: the checkpoint config's ``vision_tower``.
        device: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        dtype: ``auto`` (bf16 on CUDA, fp32 on the CPU), ``fp32``, ``bf16`` or ``fp16``.
        quantization: None, ``8bit`` or ``4bit``: LLaMA's decoder layers' weights only (``quant_backend``
            says with what; 4-bit needs CUDA, 8-bit runs on the CPU too with torchao).
        template: conversation template (``llava_v1`` / ``llava_llama_2``; for a reasoner checkpoint its prompt
            style, ``vision_reasoner`` / ``seg_zero``); None: the checkpoint's.
        mask_tta: mask test-time augmentation: ``checkpoint`` (what its config.json declares; off for
            published LISA), ``off``, ``hflip`` or ``flips``.
        presence_threshold: the presence gate of checkpoints that declare one: ``checkpoint`` (its own
            threshold), a number in (0, 1), or None (off: every ``[SEG]`` keeps its mask).
        sam_attention: SAM encoder attention: ``auto`` (sdpa on CUDA), ``sdpa`` or ``original``.
        cache_frames: how many frames' image features the engine keeps.
        max_masks: most ``[SEG]`` masks one answer may have: a forced answer with more is refused
            (``LimitExceededError``, code ``too_large``) before the model runs; generation stops
            emitting ``[SEG]`` after this many.
        max_mask_megapixels: most mask pixels one answer may cost, masks x mirrored views x frame pixels
            (each is a full-frame float mask): bounds the time and memory of one request; refused or
            capped like ``max_masks``.
        quant_backend: ``auto`` (bitsandbytes where it runs on the device, else torchao), ``bitsandbytes``
            (CUDA) or ``torchao`` (weight-only int8 / int4; int8 also on the CPU).
        static_cache: ``auto`` (a KV cache allocated once per length bucket; with CUDA graphs also the
            prompt and forced passes padded to buckets, fixed shapes) or ``off`` (the dynamic cache).
        cuda_graphs: ``auto`` (capture the fixed-shape stages in CUDA graphs on CUDA) or ``off``.
        overlap: ``auto`` (SAM's encoder on its own CUDA stream, overlapping CLIP and the LLM) or ``off``.
        compile: ``off`` (the default) or ``on``: SAM's and CLIP's image encoders through ``torch.compile``
            (inductor; each new frame size compiles at its first frame, minutes for SAM ViT-H; needs a C++
            compiler on the CPU). Replaces those encoders' CUDA graphs.
        preprocess: ``auto`` (``device`` with CUDA, ``exact`` on the CPU), ``exact`` (PIL on the CPU, as the
            published code: bit-exact inputs) or ``device`` (the frame uploaded once as uint8, resized and
            normalised by torch on the engine's device; within one grey level of PIL).
        sam_model: the SAM 2 checkpoint (transformers' format, Hub id or folder) of a reasoner checkpoint
            (``config.json`` model_type ``qwen2_5_vl``: :mod:`lisa_agent.reasoner`); None:
            ``facebook/sam2.1-hiera-large``. LISA checkpoints bring their own SAM and ignore it.
        reasoner_behaviour: a reasoner's ``ours`` (one mask per object, the tolerant answer parser, a stop right
            after ``</answer>``) or ``public`` (as the public VisionReasoner / Seg-Zero code: the union of the
            objects' masks as one mask, its answer extraction, EOS only). Ignored by LISA.
        reasoner_think: ``on`` (a reasoner writes its reasoning first, as published) or ``off`` (ours, for
            latency: its turn starts with an empty ``<think> </think>`` block; the models were not trained for it).
    """

    what: ClassVar[str] = "engine options"

    model: str = option(DEFAULT_MODEL, Option(
        "Hub id (xinlai/LISA-7B-v1, Ricky06662/VisionReasoner-7B), local checkpoint folder, or a bundled model "
        "(tabletop-tiny)",
        parse=str.strip, metavar="MODEL"))
    vision_tower: str | None = option(None, Option(
        "CLIP vision tower id or folder (empty: the checkpoint's own)", parse=parse_optional, text=none_text,
        metavar="TOWER"))
    device: str = option("auto", Option(
        "torch device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps",
        parse=str.strip, metavar="DEVICE"))
    dtype: str = option("auto", Option(
        "precision: auto (bf16 on CUDA, fp32 on the CPU), fp32, bf16 or fp16", parse=str.strip, choices=DTYPES))
    quantization: str | None = option(None, Option(
        "LLM weight quantization: none, 8bit or 4bit (LLaMA's decoder layers only; 4bit needs CUDA, 8bit runs "
        "on the CPU with torchao)",
        parse=_quantization, text=lambda v: "none" if v is None else str(v), choices=QUANTIZATIONS))
    template: str | None = option(None, Option(
        f"conversation template: {' or '.join(TEMPLATE_CHOICES)}; for a reasoner checkpoint its prompt style, "
        f"{' or '.join(REASONER_TEMPLATE_CHOICES)} (empty: the checkpoint's own)",
        parse=parse_optional, text=none_text, metavar="TEMPLATE"))
    mask_tta: str = option("checkpoint", Option(
        "mask test-time augmentation: checkpoint (what the checkpoint declares; off for published LISA), off, "
        "hflip (+ the mirrored frame) or flips (+ mirrored, upside-down and both; for cameras looking down)",
        parse=str.strip, choices=MASK_TTA_CHOICES))
    presence_threshold: float | str | None = option("checkpoint", Option(
        "presence gate of checkpoints that have one: checkpoint (its own threshold), a number in (0, 1), or off",
        parse=_threshold, text=_threshold_text, metavar="T"))
    sam_attention: str = option("auto", Option(
        "SAM encoder attention: auto (sdpa on CUDA), sdpa (scaled_dot_product_attention) or original",
        parse=str.strip, choices=SAM_ATTENTION))
    cache_frames: int = option(4, Option(
        "how many frames' image features to keep for further queries", parse=parse_int, metavar="N"))
    max_masks: int = option(16, Option(
        "most [SEG] masks per answer: a forced answer with more is refused, generation stops at this many",
        parse=parse_int, metavar="N"))
    max_mask_megapixels: float = option(256.0, Option(
        "most mask megapixels per answer (masks x mirrored views x frame pixels), bounding one request's "
        "time and memory", parse=parse_float, metavar="MPX"))
    quant_backend: str = option("auto", Option(
        "where quantized weights come from: auto (bitsandbytes where it runs on the device, else torchao), "
        "bitsandbytes or torchao (int8 also on the CPU)", parse=str.strip, choices=QUANT_BACKENDS))
    static_cache: str = option("auto", Option(
        "auto: a KV cache allocated once per length bucket (fixed shapes with CUDA graphs); off: the dynamic "
        "cache, grown per token",
        parse=str.strip, choices=SWITCH))
    cuda_graphs: str = option("auto", Option(
        "auto: capture the fixed-shape stages (decode step, forced pass, CLIP, SAM encoder, mask decoder) in CUDA "
        "graphs on CUDA; off: eager", parse=str.strip, choices=SWITCH))
    overlap: str = option("auto", Option(
        "auto: SAM's image encoder on its own CUDA stream, overlapping CLIP and the language model; off: in turn",
        parse=str.strip, choices=SWITCH))
    compile: str = option("off", Option(
        "on: SAM's and CLIP's image encoders through torch.compile (each frame size compiles at its first "
        "frame: minutes for SAM ViT-H); off: not compiled", parse=str.strip, choices=COMPILE))
    preprocess: str = option("auto", Option(
        "where frames are resized and normalised: auto (device with CUDA, exact on the CPU), exact (PIL on the "
        "CPU, as the published code) or device (uploaded once as uint8, resized by torch there; within one "
        "grey level of PIL)", parse=str.strip, choices=PREPROCESS))
    sam_model: str | None = option(None, Option(
        "SAM 2 checkpoint of a reasoner model (Qwen2.5-VL: VisionReasoner, Seg-Zero), a Hub id or folder in "
        "transformers' format (empty: facebook/sam2.1-hiera-large); LISA checkpoints bring their own SAM",
        parse=parse_optional, text=none_text, metavar="SAM2"))
    reasoner_behaviour: str = option("ours", Option(
        "a reasoner model's output: ours (one mask per object, a tolerant answer parser) or public (the public "
        "VisionReasoner / Seg-Zero code's single union mask and answer parser); LISA ignores it",
        parse=str.strip, choices=REASONER_BEHAVIOURS))
    reasoner_think: str = option("on", Option(
        "a reasoner model's reasoning: on (it reasons in <think> first, as published) or off (ours, for latency: "
        "its answer starts after an empty <think> </think>); LISA ignores it", parse=str.strip, choices=SWITCH_ON))

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.model, os.PathLike):
            put("model", os.fspath(self.model))
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidArgumentError(f"model must name a Hub id, a folder or a bundled model; got {self.model!r}")
        for name in ("vision_tower", "template", "sam_model"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if value is not None and not isinstance(value, str):
                raise InvalidArgumentError(f"{name} must be a string or None; got {type(value).__name__}")
            put(name, (value.strip() or None) if isinstance(value, str) else None)
        device = str(self.device).strip()  # also accepts a torch.device
        if not _DEVICE.match(device):
            raise InvalidArgumentError(f"unknown device {self.device!r}; use auto, cpu, cuda, cuda:N or mps")
        put("device", device)
        dtype = str(self.dtype).strip().removeprefix("torch.")  # also accepts a torch.dtype
        dtype = _DTYPE_ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        put("dtype", dtype)
        quant = self.quantization if self.quantization is None else _quantization(str(self.quantization))
        if quant not in (None, *QUANTIZATIONS[1:]):
            raise InvalidArgumentError(f"unknown quantization {self.quantization!r}; choose none, 8bit or 4bit")
        put("quantization", quant)
        if self.template is not None and self.template not in (*TEMPLATE_CHOICES, *REASONER_TEMPLATE_CHOICES):
            raise InvalidArgumentError(f"unknown conversation template {self.template!r}; known: "
                                       f"{', '.join(TEMPLATE_CHOICES)} (LISA), "
                                       f"{', '.join(REASONER_TEMPLATE_CHOICES)} (reasoners)")
        if self.mask_tta not in MASK_TTA_CHOICES:
            raise InvalidArgumentError(f"mask_tta must be one of {', '.join(MASK_TTA_CHOICES)}; got {self.mask_tta!r}")
        threshold = self.presence_threshold
        if isinstance(threshold, str):
            try:
                threshold = _threshold(threshold)
            except ValueError as exc:
                raise InvalidArgumentError(str(exc)) from None
        if threshold is not None and threshold != "checkpoint":
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                    or not math.isfinite(threshold) or not 0.0 < float(threshold) < 1.0:
                raise InvalidArgumentError("presence_threshold must be 'checkpoint', None (off) or a number in "
                                           f"(0, 1); got {self.presence_threshold!r}")
            threshold = float(threshold)
        put("presence_threshold", threshold)
        for name, choices in (("quant_backend", QUANT_BACKENDS), ("static_cache", SWITCH), ("cuda_graphs", SWITCH),
                              ("overlap", SWITCH), ("compile", COMPILE),
                              ("preprocess", PREPROCESS), ("reasoner_behaviour", REASONER_BEHAVIOURS),
                              ("reasoner_think", SWITCH_ON)):
            if getattr(self, name) not in choices:
                raise InvalidArgumentError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.sam_attention not in SAM_ATTENTION:
            raise InvalidArgumentError(f"sam_attention must be one of {', '.join(SAM_ATTENTION)}; "
                                       f"got {self.sam_attention!r}")
        for name in ("cache_frames", "max_masks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be a whole number >= 1; got {value!r}")
        mpx = self.max_mask_megapixels
        if isinstance(mpx, bool) or not isinstance(mpx, (int, float)) or not math.isfinite(mpx) or mpx <= 0:
            raise InvalidArgumentError(f"max_mask_megapixels must be a positive number; got {mpx!r}")
        put("max_mask_megapixels", float(mpx))

    def describe(self) -> str:
        """One line for logs: model, device, dtype and what differs from the defaults."""
        defaults = EngineConfig().to_texts()
        extra = [f"{k}={v}" for k, v in self.to_texts().items()
                 if k not in ("model", "device", "dtype") and v != defaults[k]]
        return f"{self.model!r} ({self.device}, {self.dtype}{', ' + ', '.join(extra) if extra else ''})"


def add_engine_arguments(parser: argparse.ArgumentParser, *, exclude: Iterable[str] = (),
                         defaults: Mapping[str, Any] | None = None) -> None:
    """Add one flag per :class:`EngineConfig` field (minus ``exclude``) to ``parser`` (``args.engine_<field>``);
    :func:`engine_config_from_args` reads them back (see :func:`lisa_agent.options.add_arguments`)."""
    add_arguments(parser, EngineConfig, prefix="engine", title="model options (lisa_agent.config.EngineConfig)",
                  exclude=exclude, defaults=defaults)


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The :class:`EngineConfig` of the flags :func:`add_engine_arguments` added (plus ``overrides``)."""
    return from_args(EngineConfig, args, prefix="engine", **overrides)


def engine_parameters() -> list[tuple[str, Any, str]]:
    """``(name, default, description)`` of the engine's ROS node parameters and launch arguments.

    Defaults are text forms (integers stay integers); the node declares them with dynamic typing
    and reads them back with :meth:`EngineConfig.from_texts`, so ``-p presence_threshold:=0.3`` or a
    launch argument's string both work.
    """
    return parameters(EngineConfig)
