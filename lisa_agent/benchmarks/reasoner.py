"""Per-stage timings of a reasoner (``lisa-agent bench`` with a reasoner ``--model`` or ``--shape reasoner-*``).

A reasoner is generation-bound: it writes tens to hundreds of tokens before its answer. So what is timed is
not LISA's modes but where the time of one query goes, each from an uncached frame:

- ``prefill``: the query with a budget of one new token (resize, chat template, image processor, the vision
  encoder and the prefill of ~900 image and ~120 text tokens, one token);
- ``generate``: the query with ``new_tokens`` new tokens, EOS and the stop string never end it early (random
  weights write nonsense; a checkpoint's answer is cut off alike), so its ``generate`` stage is prefill plus
  ``new_tokens - 1`` decoding steps;
- ``sam``: a forced one-object answer (no generation): SAM 2's encoder and one prompted decode.

``decode_ms_per_token`` is ``(generate - prefill) / (new_tokens - 1)`` of the medians' ``generate`` stages, and
``query_ms_estimate`` what one query that writes ``new_tokens`` tokens and finds one object costs:
``generate``'s total plus ``sam``'s SAM 2 stages.

Shapes (random weights, no download): ``reasoner-tiny`` (the test checkpoints of :mod:`lisa_agent.reasoner.tiny`,
written to a temporary folder and loaded through the real loader) and ``reasoner-7b`` (Qwen2.5-VL-7B with SAM 2.1
Hiera-L, built directly on the device in its dtype; the tokenizer is the tiny one, so the instruction has fewer
text tokens than Qwen's tokenizer makes of it: ~120 against ~150, a few percent of the prefill).
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import EngineConfig
from ..errors import InvalidArgumentError
from .engine import _default_dtype, _device_name, _median_stages, _MemoryProbe, lever_settings, take_turns

if TYPE_CHECKING:  # pragma: no cover
    from ..reasoner.segmenter import ReasonerSegmenter

#: Shapes ``bench --shape`` builds for a reasoner.
REASONER_SHAPES = ("reasoner-tiny", "reasoner-7b")

#: Qwen2.5-VL-7B-Instruct's architecture (the base of VisionReasoner-7B and Seg-Zero-7B).
QWEN2_5_VL_7B: dict[str, Any] = {
    "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2},
}

#: SAM 2.1 Hiera-L's image encoder (``facebook/sam2.1-hiera-large``); the prompt encoder and mask decoder keep
#: transformers' defaults, which are SAM 2's.
SAM2_HIERA_L: dict[str, Any] = {
    "backbone_config": {"model_type": "sam2_hiera_det_model", "hidden_size": 144, "num_attention_heads": 2,
                        "blocks_per_stage": [2, 6, 36, 4], "embed_dim_per_stage": [144, 288, 576, 1152],
                        "num_attention_heads_per_stage": [2, 4, 8, 16], "global_attention_blocks": [23, 33, 43],
                        "window_size_per_stage": [8, 4, 16, 8],
                        "window_positional_embedding_background_size": [7, 7]},
    "backbone_channel_list": [1152, 576, 288, 144],
}

#: The forced answer of the ``sam`` mode: one object in the middle of the 840 x 840 square.
ONE_OBJECT = '<think>bench</think><answer>[{"bbox_2d": [300,300,540,540], "point_2d": [420,420]}]</answer>'


def load_reasoner_for_bench(config: EngineConfig, shape: str | None = None) -> tuple[ReasonerSegmenter, str]:
    """The reasoner to time and its name: ``config.model`` (a reasoner checkpoint), or random weights of
    ``shape`` (:data:`REASONER_SHAPES`)."""
    from ..reasoner.loading import load_reasoner

    if shape is None:
        return load_reasoner(config), config.model
    if shape == "reasoner-tiny":
        from ..reasoner.tiny import make_tiny_reasoner, make_tiny_sam2

        root = tempfile.mkdtemp(prefix="lisa-reasoner-bench-")
        folder, sam = make_tiny_reasoner(f"{root}/reasoner"), make_tiny_sam2(f"{root}/sam2")
        return load_reasoner(config.replace(model=str(folder), sam_model=str(sam))), shape
    if shape == "reasoner-7b":
        return build_random_reasoner(config), shape
    raise InvalidArgumentError(f"unknown reasoner shape {shape!r}; choose one of {', '.join(REASONER_SHAPES)}")


def build_random_reasoner(config: EngineConfig, text: dict[str, Any] | None = None,
                          vision: dict[str, Any] | None = None, sam: dict[str, Any] | None = None,
                          sam_image_size: int = 1024) -> ReasonerSegmenter:
    """A VisionReasoner-7B-shaped reasoner (:data:`QWEN2_5_VL_7B`, SAM 2.1 Hiera-L) with random weights built on
    ``config``'s device in its dtype (no float32 staging: a 7B model in float32 is ~33 GB), with the tiny
    tokenizer and the published image processor. ``text`` / ``vision`` override Qwen2.5-VL's text and vision
    fields, ``sam`` replaces ``Sam2Config``'s arguments (default: the Hiera-L image encoder) and
    ``sam_image_size`` is its input side (tests build small ones). Quantization is refused (time a real
    checkpoint for that)."""
    from transformers import Sam2Config, Sam2ImageProcessor, Sam2Model, Sam2Processor

    from ..engine.device import resolve_precision
    from ..reasoner.loading import generation_switches
    from ..reasoner.segmenter import ReasonerSegmenter
    from ..reasoner.templates import style_for
    from ..reasoner.tiny import qwen_config, qwen_model, qwen_processor, tiny_tokenizer

    if config.quantization is not None:
        raise InvalidArgumentError("--shape reasoner-7b times bf16 / fp16 / fp32 weights; for 8-bit or 4-bit time a "
                                   "real checkpoint with --model")
    dtype, device = resolve_precision(config)
    tokenizer = tiny_tokenizer()
    qwen = qwen_config(tokenizer, text={**QWEN2_5_VL_7B["text_config"], **(text or {})},
                       vision={**QWEN2_5_VL_7B["vision_config"], **(vision or {})})
    with torch.device(device), _default_dtype(dtype):
        model: Any = qwen_model(qwen)
        sam_model: Any = Sam2Model(Sam2Config(**(sam or {"vision_config": SAM2_HIERA_L}))).eval()
    side = int(sam_image_size)
    sam_processor = Sam2Processor(image_processor=Sam2ImageProcessor(size={"height": side, "width": side}))
    return ReasonerSegmenter(model, qwen_processor(tokenizer), sam_model, sam_processor,
                             style=style_for(None, "VisionReasoner-7B"), name="random-reasoner-7b",
                             sam_name="random-sam2.1-hiera-large", config=config,
                             **generation_switches(config, device))


def _time(fn: Any, runs: int, warmup: int) -> dict[str, Any]:
    """Medians of ``fn()``'s results' stages over ``runs`` calls after ``warmup``; with what the last call gave:
    ``tokens`` generated and ``masks``."""
    for _ in range(warmup):
        fn()
    results = [fn() for _ in range(runs)]
    samples = [r.timings_ms for r in results]
    stages = _median_stages(samples)
    return {"median_ms": stages["total"], "stages_ms": stages, "runs": runs, "samples": samples,
            "tokens": len(results[-1].output_ids), "masks": len(results[-1])}


def run_reasoner_bench(seg: ReasonerSegmenter, *, runs: int = 10, warmup: int = 2, new_tokens: int = 64,
                       image_hw: tuple[int, int] = (480, 640), query: str = "grab something to cut with"
                       ) -> dict[str, Any]:
    """Median per-stage timings of the ``prefill``, ``generate`` and ``sam`` modes (module docstring), in the
    report format of :func:`lisa_agent.benchmarks.engine.run_bench` (``format_table`` prints it), plus
    ``decode_ms_per_token`` and ``query_ms_estimate``. ``new_tokens`` >= 2."""
    if int(new_tokens) < 2:
        raise InvalidArgumentError(f"a reasoner's bench needs --new-tokens >= 2 (prefill is timed apart); got {new_tokens}")
    frame = np.random.default_rng(0).integers(0, 255, size=(*image_hw, 3), dtype=np.uint8)
    memory = _MemoryProbe(seg.device)
    eos, stop = seg.model.generation_config.eos_token_id, seg.stop_at_answer
    out: dict[str, Any] = {"device": _device_name(seg.device), "dtype": str(seg.dtype).replace("torch.", ""),
                           "new_tokens": int(new_tokens), "image_hw": list(image_hw), "mask_tta": "off",
                           "settings": reasoner_settings(seg), "modes": {}}
    seg.model.generation_config.eos_token_id = None  # exactly the budget's tokens, whatever the weights write
    seg.stop_at_answer = False
    try:
        out["modes"]["prefill"] = _time(lambda: seg.segment(frame, query, max_new_tokens=1), runs, warmup)
        out["modes"]["generate"] = _time(lambda: seg.segment(frame, query, max_new_tokens=int(new_tokens)), runs,
                                         warmup)
        out["modes"]["sam"] = _time(lambda: seg.segment(frame, query, answer=ONE_OBJECT), runs, warmup)
    finally:
        seg.model.generation_config.eos_token_id, seg.stop_at_answer = eos, stop
    _derive(out)
    out["peak_memory_mb"] = memory.peak_mb()
    out["peak_reserved_mb"] = memory.peak_reserved_mb()
    return out


def reasoner_settings(seg: ReasonerSegmenter) -> dict[str, Any]:
    """The reasoner's settings that change its speed."""
    return {"dtype": str(seg.dtype).replace("torch.", ""), "quantization": seg.quantization,
            "quant_backend": seg.quant_backend, "static_cache": seg.static_cache, "cuda_graphs": seg.cuda_graphs,
            "think": seg.think, "style": seg.style.name}


def compare_reasoner(seg: ReasonerSegmenter, *, rounds: int = 3, **bench: Any) -> dict[str, Any]:
    """:func:`run_reasoner_bench` with every generation lever that runs on this device on (the static cache; on
    CUDA also the compiled decoding step), then with them turned off one at a time, cumulatively (CUDA graphs,
    then the static cache), taking turns ``rounds`` times on the same weights; the same return shape as
    :func:`lisa_agent.benchmarks.engine.compare`: ratios of the modes' medians and of ``decode_ms_per_token``.
    The reasoner's own settings are restored at the end."""
    configured = {"static_cache": seg.static_cache, "cuda_graphs": seg.cuda_graphs}
    seg.set_optimizations(static_cache=True, cuda_graphs=True)  # graphs stay off where there is no CUDA
    start = {"static_cache": seg.static_cache, "cuda_graphs": seg.cuda_graphs}
    settings_ = lever_settings(start, ("cuda_graphs", "static_cache"))
    rounds = max(1, int(rounds))
    share = {**bench, "runs": max(1, -(-int(bench.get("runs", 10)) // rounds))}
    run_reasoner_bench(seg, **{**bench, "runs": 1, "warmup": 1})  # untimed: compiles, first-call costs
    runs = take_turns(seg, settings_, lambda: run_reasoner_bench(seg, **share), rounds, _merge, restore=configured)
    ratios: dict[str, dict[str, float]] = {}
    for before, after in zip(runs, runs[1:], strict=False):
        ratios[f"{after['levers_off'][-1]} (slower without it)"] = _ratio(before["report"], after["report"])
    return {"runs": runs, "ratios": ratios}


def _ratio(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    out = {mode: round(after["modes"][mode]["median_ms"] / before["modes"][mode]["median_ms"], 3)
           for mode in before["modes"]}
    if before["decode_ms_per_token"] > 0:
        out["decode_ms_per_token"] = round(after["decode_ms_per_token"] / before["decode_ms_per_token"], 3)
    return out


def _merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several of the same setting: medians over all their runs."""
    out = {**reports[0], "modes": {}, "peak_memory_mb": max(r["peak_memory_mb"] for r in reports)}
    for mode in reports[0]["modes"]:
        samples = [t for r in reports for t in r["modes"][mode]["samples"]]
        stages = _median_stages(samples)
        out["modes"][mode] = {"median_ms": stages["total"], "stages_ms": stages, "runs": len(samples),
                              "samples": samples}
    return _derive(out)


def _derive(report: dict[str, Any]) -> dict[str, Any]:
    """Add ``decode_ms_per_token``, ``query_ms_estimate`` and ``ratios`` to ``report`` from its modes' medians."""
    modes, n = report["modes"], report["new_tokens"]
    report["decode_ms_per_token"] = round((modes["generate"]["stages_ms"]["generate"]
                                           - modes["prefill"]["stages_ms"]["generate"]) / (n - 1), 3)
    report["query_ms_estimate"] = round(modes["generate"]["median_ms"] + modes["sam"]["stages_ms"]["sam_encoder"]
                                        + modes["sam"]["stages_ms"]["decoder"], 3)
    report["ratios"] = {"generate_over_prefill": round(modes["generate"]["median_ms"] / modes["prefill"]["median_ms"],
                                                       2)}
    return report


def summary(report: dict[str, Any]) -> str:
    """The derived figures as one line, under ``format_table``'s table."""
    return (f"decode {report['decode_ms_per_token']:.2f} ms/token; one query of {report['new_tokens']} tokens and "
            f"one object: {report['query_ms_estimate']:.1f} ms (median stages)")


__all__ = ["ONE_OBJECT", "QWEN2_5_VL_7B", "REASONER_SHAPES", "SAM2_HIERA_L", "build_random_reasoner",
           "compare_reasoner", "load_reasoner_for_bench", "reasoner_settings", "run_reasoner_bench", "summary"]
