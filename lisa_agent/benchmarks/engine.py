"""Per-stage timings of the inference modes, measured in one process (``lisa-agent bench``).

What is timed: a checkpoint (``--model``, default the bundled ``tabletop-tiny``), or with ``--shape``
random weights: ``tiny`` (a tiny checkpoint written to a temporary folder and loaded through the
public loader), ``7b`` / ``13b`` (the LISA-7B / 13B architecture with SAM ViT-H and CLIP ViT-L/14,
built directly on the device: for GPU speed measurements without a download).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import EngineConfig
from ..errors import InvalidArgumentError
from .process import peak_rss_mb, rss_mb

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.modeling.sam import SamSpec
    from ..engine.segmenter import LisaSegmenter

#: the per-frame stages a result's timings_ms reports (zero when the frame was already encoded)
ENCODER_STAGES = ("digest", "preprocess", "sam_encoder", "clip")

LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32004, rms_norm_eps=1e-6, max_position_embeddings=4096),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32003, rms_norm_eps=1e-5, max_position_embeddings=4096),
}


#: CLIP ViT-L/14 at 224 px (``openai/clip-vit-large-patch14``), the tower of every released LISA
CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
              patch_size=14)


def build_random_segmenter(shape: str, config: EngineConfig) -> LisaSegmenter:
    """A LISA-{7b,13b}-shaped segmenter (SAM ViT-H, CLIP ViT-L/14) with random weights: :func:`random_segmenter`."""
    from ..engine.modeling.sam import SAM_PRESETS

    if shape not in LLAMA_SHAPES:
        raise InvalidArgumentError(f"unknown shape {shape!r}; choose one of {', '.join(LLAMA_SHAPES)}")
    return random_segmenter(LLAMA_SHAPES[shape], SAM_PRESETS["vit_h"], CLIP_L, config, name=f"random-{shape}")


def random_segmenter(llama: dict[str, Any], sam: SamSpec, clip: dict[str, Any], config: EngineConfig, *,
                     name: str = "random") -> LisaSegmenter:
    """A segmenter of the given LLaMA fields, SAM shape and CLIP vision config with random weights, built
    directly on ``config``'s device in its dtype (a LISA-7B staged in float32 would take ~27 GB, more than a
    32 GB Orin holds beside the rest) with every parameter and buffer initialised by the modules' own
    constructors (SAM's random positional-encoding matrix included), then assembled as a loaded checkpoint is
    (:func:`lisa_agent.engine.build.assemble`) with ``config``'s quantization, SAM attention and mask augmentation
    (``checkpoint``: off)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ..engine.build import LisaConfig, assemble, build_model
    from ..engine.device import resolve_precision
    from ..engine.modeling.clip import ClipPatchFeatures
    from ..engine.quantization import resolve_quant_backend
    from ..engine.segmenter import LisaSegmenter, optimization_switches
    from ..engine.tiny import add_lisa_tokens, train_tokenizer
    from ..engine.tokenization import LisaTokenizer

    dtype, device = resolve_precision(config)
    cfg = LisaConfig.from_dict({**llama, "vision_tower": "openai/clip-vit-large-patch14", "bos_token_id": 1,
                                "eos_token_id": 2, "mm_hidden_size": clip["hidden_size"],
                                "out_dim": sam.prompt_embed_dim})
    with torch.device(device), _default_dtype(dtype):
        model = build_model(cfg, sam, meta=False)
        tower = CLIPVisionModel(CLIPVisionConfig(**clip))
    _random_init(model)
    vision = ClipPatchFeatures(tower.eval(), -2, "patch")
    backend = resolve_quant_backend(config, device)
    assemble(model, vision, dtype=dtype, device=device, quantization=config.quantization,
             sam_attention=config.sam_attention, quant_backend=backend)
    tok = train_tokenizer()
    added = add_lisa_tokens(tok)
    tokenizer = LisaTokenizer(tok, "tokenizers", added, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return LisaSegmenter(model, tokenizer, name=name, quantization=config.quantization,
                         cache_frames=config.cache_frames, config=config, max_masks=config.max_masks,
                         max_mask_megapixels=config.max_mask_megapixels, quant_backend=backend,
                         mask_tta="off" if config.mask_tta == "checkpoint" else config.mask_tta,
                         **optimization_switches(config, device))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Floating tensors made without a dtype are ``dtype`` inside the block."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _random_init(model: torch.nn.Module) -> None:
    """Parameters in place: norms' weights 1, the rest N(0, 0.02) (buffers keep their constructors' values)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)


def load_for_bench(config: EngineConfig, shape: str | None = None) -> tuple[LisaSegmenter, str]:
    """The engine to time and its name: ``config.model``, or with ``shape`` a tiny random checkpoint
    (``tiny``, written to a temporary folder and loaded) or a random LISA-7B / 13B (``7b``, ``13b``)."""
    from ..engine.segmenter import LisaSegmenter

    if shape is None:
        return LisaSegmenter.from_config(config), config.model
    if shape == "tiny":
        from ..engine.tiny import make_tiny_checkpoint

        folder = make_tiny_checkpoint(tempfile.mkdtemp(prefix="lisa-tiny-bench-"))
        return LisaSegmenter.from_config(config.replace(model=str(folder))), "tiny"
    return build_random_segmenter(shape, config), shape


def _median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = runs[0].keys()
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}


def time_mode(fn: Callable[[], Any], runs: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    timings = [fn().timings_ms for _ in range(runs)]
    stages = _median_stages(timings)
    return {"median_ms": stages["total"], "stages_ms": stages, "runs": runs, "samples": timings}


def run_bench(seg: LisaSegmenter, *, runs: int = 10, warmup: int = 2, new_tokens: int = 32, image_hw: tuple[int, int] = (480, 640),
              modes: tuple[str, ...] = ("fast", "chat", "reference"), reference_runs: int | None = None,
              query: str = "grab something to cut with") -> dict[str, Any]:
    """Median per-stage timings; every run starts from an uncached frame (encoders included). Reports the
    settings in use, ``peak_memory_mb`` (CUDA: the most memory allocated to tensors; CPU: how far the process's
    resident memory grew while timing), ``peak_reserved_mb`` (CUDA: the most memory the caching allocator held,
    CUDA graphs' private pools included; None on the CPU) and ``graph_memory`` (the CUDA graphs and static KV
    caches the engine holds at the end, see :meth:`LisaSegmenter.graph_memory`)."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, size=(*image_hw, 3), dtype=np.uint8)
    seg.eos_token_id = -1  # benchmark: always generate exactly `new_tokens` tokens
    memory = _MemoryProbe(seg.device)
    out: dict[str, Any] = {"device": _device_name(seg.device), "dtype": str(seg.dtype).replace("torch.", ""),
                           "new_tokens": new_tokens, "image_hw": list(image_hw),
                           "mask_tta": getattr(seg, "mask_tta", "off"), "settings": settings(seg), "modes": {}}

    def once(mode: str) -> Callable[[], Any]:
        def call():  # noqa: ANN202
            seg.clear_cache()
            return seg.segment(frame, query, mode=mode, max_new_tokens=new_tokens)
        return call

    for mode in modes:
        n = reference_runs if (mode == "reference" and reference_runs) else runs
        out["modes"][mode] = time_mode(once(mode), n, warmup if mode != "reference" else 1)

    def batch8():  # noqa: ANN202
        seg.clear_cache()
        results = seg.segment_batch(frame, [f"{query} {k}" for k in range(8)])
        total = sum(r.timings_ms["total"] for r in results) - 7 * sum(
            results[0].timings_ms[k] for k in ENCODER_STAGES)
        return type("R", (), {"timings_ms": {"total": total}})()

    out["modes"]["fast_batch8"] = time_mode(batch8, runs, warmup)
    if "fast" in modes:  # a further query on a frame already encoded: the handle from encode()
        seg.clear_cache()
        features = seg.encode(frame)
        out["modes"]["fast_encoded"] = time_mode(lambda: seg.segment(features, query), runs, warmup)
    out["ratios"] = _ratios(out["modes"])
    out["peak_memory_mb"] = memory.peak_mb()
    out["peak_reserved_mb"] = memory.peak_reserved_mb()
    out["graph_memory"] = seg.graph_memory()
    return out


def settings(seg: LisaSegmenter) -> dict[str, Any]:
    """The engine's settings that change its speed: precision, quantization, the optimizations in use."""
    sdpa = any(type(m).__name__ == "SdpaAttention" for m in seg.model.sam.image_encoder.modules())
    return {"dtype": str(seg.dtype).replace("torch.", ""), "quantization": seg.quantization,
            "quant_backend": seg.quant_backend, "static_cache": seg.static_cache, "cuda_graphs": seg.cuda_graphs,
            "overlap": seg.overlap, "buckets": seg.buckets, "compile": seg.compile,
            "device_preprocess": seg.device_preprocess,
            "sam_attention": "sdpa" if sdpa else "original", "mask_tta": seg.mask_tta}


def compare(seg: LisaSegmenter, *, rounds: int = 3, **bench: Any) -> dict[str, Any]:
    """``run_bench`` with the optimizations as configured, then with the levers that apply here turned off
    one at a time, cumulatively (torch.compile when on, CUDA graphs, then the SAM stream overlap, then the
    static cache: eager), in one process on the same weights: each lever's effect is a ratio of medians.

    The settings take turns: ``rounds`` rounds each time every setting with a share of the runs, so a
    machine that slows down for a while (other jobs, clocks) slows all of them alike; each setting's
    medians are over all its runs. Returns ``{"runs": [{"levers_off": [...], "report": ...}, ...],
    "ratios": {step: {mode: after/before}}}``.
    """
    start = {"static_cache": seg.static_cache, "cuda_graphs": seg.cuda_graphs, "overlap": seg.overlap,
             "compile": seg.compile, "device_preprocess": seg.device_preprocess}
    settings_ = lever_settings(start, ("compile", "cuda_graphs", "overlap", "device_preprocess", "static_cache"))
    rounds = max(1, int(rounds))
    share = {**bench, "runs": max(1, -(-int(bench.get("runs", 10)) // rounds))}
    if bench.get("reference_runs"):
        share["reference_runs"] = max(1, -(-int(bench["reference_runs"]) // rounds))
    run_bench(seg, **{**bench, "runs": 1, "reference_runs": 1})  # untimed: the first timings of a process run cold
    runs = take_turns(seg, settings_, lambda: run_bench(seg, **share), rounds, _merge, restore=start)
    ratios: dict[str, dict[str, float]] = {}
    for before, after in zip(runs, runs[1:], strict=False):
        lever = after["levers_off"][-1]
        ratios[f"{lever} (slower without it)"] = {
            mode: round(after["report"]["modes"][mode]["median_ms"] / before["report"]["modes"][mode]["median_ms"], 3)
            for mode in before["report"]["modes"]}
    if len(runs) > 1:
        ratios["all (eager over optimised)"] = {
            mode: round(runs[-1]["report"]["modes"][mode]["median_ms"] / runs[0]["report"]["modes"][mode]["median_ms"],
                        3) for mode in runs[0]["report"]["modes"]}
    return {"runs": runs, "ratios": ratios}


def lever_settings(start: dict[str, bool], order: Sequence[str]) -> list[tuple[list[str], dict[str, bool]]]:
    """The settings a ``--compare`` run takes turns with: ``start``, then the levers of ``order`` that are on in it
    turned off one at a time, cumulatively; each with the list of levers turned off so far."""
    settings_: list[tuple[list[str], dict[str, bool]]] = [([], dict(start))]
    for lever in order:
        if start[lever]:
            settings_.append(([*settings_[-1][0], lever], {**settings_[-1][1], lever: False}))
    return settings_


def take_turns(seg: Any, settings_: list[tuple[list[str], dict[str, bool]]], run: Callable[[], dict[str, Any]],
               rounds: int, merge: Callable[[list[dict[str, Any]]], dict[str, Any]], *,
               restore: dict[str, bool]) -> list[dict[str, Any]]:
    """``rounds`` rounds in each of which every setting (``seg.set_optimizations(**switches)``) runs ``run()``
    once; then ``seg`` gets ``restore``. Returns per setting ``{"levers_off": [...], "report": merge(its reports)}``."""
    reports: list[list[dict[str, Any]]] = [[] for _ in settings_]
    try:
        for _ in range(rounds):
            for k, (_, switches) in enumerate(settings_):
                seg.set_optimizations(**switches)
                reports[k].append(run())
    finally:
        seg.set_optimizations(**restore)
    return [{"levers_off": off, "report": merge(parts)} for (off, _), parts in zip(settings_, reports, strict=True)]


def _merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several of the same setting: medians over all their runs, the highest peak memory."""
    reserved = [r["peak_reserved_mb"] for r in reports if r.get("peak_reserved_mb") is not None]
    out = {**reports[0], "modes": {}, "peak_memory_mb": max(r["peak_memory_mb"] for r in reports),
           "peak_reserved_mb": max(reserved) if reserved else None, "graph_memory": reports[-1].get("graph_memory")}
    for mode in reports[0]["modes"]:
        samples = [t for r in reports for t in r["modes"][mode]["samples"]]
        stages = _median_stages(samples)
        out["modes"][mode] = {"median_ms": stages["total"], "stages_ms": stages, "runs": len(samples),
                              "samples": samples}
    out["ratios"] = _ratios(out["modes"])
    return out


def _ratios(modes: dict[str, Any]) -> dict[str, float]:
    """The modes' ratios of medians: reference / chat, chat / fast, fast / fast on an encoded frame."""
    return {name: round(modes[a]["median_ms"] / modes[b]["median_ms"], 2) for name, a, b in (
        ("reference_over_chat", "reference", "chat"), ("chat_over_fast", "chat", "fast"),
        ("fast_over_fast_encoded", "fast", "fast_encoded")) if a in modes and b in modes}


class _MemoryProbe:
    """Peak memory while timing: CUDA's most allocated and most reserved bytes (reset at start), or the
    growth of this process's resident memory (read from /proc on Linux; the peak since start elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.device = device
        else:
            try:  # Linux: reset the resident set's high-water mark so the peak is this run's
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        self.start = rss_mb()

    def peak_mb(self) -> float:
        if self.cuda:
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return round(max(0.0, peak_rss_mb() - self.start), 1)

    def peak_reserved_mb(self) -> float | None:
        """CUDA: the most memory the caching allocator held (tensors, free blocks, graph pools); else None."""
        if self.cuda:
            return round(torch.cuda.max_memory_reserved(self.device) / 2**20, 1)
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(report: dict[str, Any]) -> str:
    lines = [f"device {report['device']}  shape {report.get('shape')}  dtype {report['dtype']}  "
             f"new tokens {report['new_tokens']}  frame {report['image_hw'][0]}x{report['image_hw'][1]}  "
             f"mask tta {report.get('mask_tta', 'off')}  peak memory {report.get('peak_memory_mb', float('nan'))} MB"
             f" (reserved {report.get('peak_reserved_mb')} MB)",
             "settings: " + ", ".join(f"{k} {v}" for k, v in report.get("settings", {}).items())]
    stages = sorted({s for m in report["modes"].values() for s in m["stages_ms"]} - {"total"})
    lines.append(f"{'mode':<12}{'median ms':>11}" + "".join(f"{s:>13}" for s in stages))
    for name, m in report["modes"].items():
        lines.append(f"{name:<12}{m['median_ms']:>11.2f}" +
                     "".join(f"{m['stages_ms'].get(s, float('nan')):>13.2f}" for s in stages))
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in report["ratios"].items()))
    return "\n".join(lines)
