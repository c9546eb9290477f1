"""The CUDA paths give the eager path's outputs, on a tiny random checkpoint taught one answer and on the
bundled tabletop-tiny: CUDA graphs, the SAM stream overlap, the static KV cache, 8-bit and 4-bit weights;
and what goes wrong there is put right (a failed capture, a second GPU, memory that grows with every shape).

Every test here is marked ``gpu`` and skips with a stated reason where no CUDA device exists; the device
check (scripts/gpu_check.py) runs them on a GPU machine and counts a skip for want of CUDA as a failure.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_objects, assert_same_result, iou, random_frame, teach_answer

from lisa_agent import LisaSegmenter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")]

QUERY = "the red mug"
ANSWER = "Sure, [SEG]. It is [SEG]."
FRAME = random_frame(60, 80, seed=3)
OTHER_QUERIES = [QUERY, "grab something to cut with", "what could hold my coffee " + "now " * 20]
EAGER = dict(static_cache="off", cuda_graphs="off", overlap="off")
CHECKPOINTS = ["tiny", "tabletop"]
needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is not installed here (the torchao variant runs instead)")


@pytest.fixture(scope="module")
def taught_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny random checkpoint after its LLM was taught, on the GPU, to answer ANSWER (two [SEG]) to QUERY
    on FRAME; saved in the published layout, so that any precision or quantization can load it."""
    from lisa_agent.engine.checkpoints import read_config, write_checkpoint
    from lisa_agent.engine.weights import published_state_dict

    seg = LisaSegmenter.from_pretrained(tiny_checkpoint, device="cuda", dtype="fp32", **EAGER)
    teach_answer(seg, FRAME, QUERY, ANSWER)  # the engine's own device: CUDA tensors for a CUDA model
    out = tmp_path_factory.mktemp("taught") / "lisa-tiny-taught"
    shutil.copytree(tiny_checkpoint, out)
    state = {k: v.detach().cpu() for k, v in published_state_dict(seg.model).items()}
    write_checkpoint(out, read_config(tiny_checkpoint), state)
    return out


def _model(name: str, taught: Path) -> str:
    return str(taught) if name == "tiny" else "tabletop-tiny"


def _tiny_outputs(seg: LisaSegmenter) -> list:
    """fast (captures, then replays), chat twice, and a batch of three fast queries on FRAME."""
    out = [seg.segment(FRAME, QUERY, mode=m, answer=ANSWER if m == "fast" else None, max_new_tokens=32,
                       return_logits=True) for m in ("fast", "chat", "fast", "chat")]
    return out + seg.segment_batch(FRAME, OTHER_QUERIES, return_logits=True)


def _compare(name: str, optimised: LisaSegmenter, eager: LisaSegmenter, first_seed: int) -> None:
    if name == "tiny":
        ours, theirs = _tiny_outputs(optimised), _tiny_outputs(eager)
        assert theirs[1].text.count("[SEG]") == 2  # the taught answer: a comparison that can fail
        for a, b in zip(ours, theirs, strict=True):
            assert_same_result(a, b, atol=1e-3)
    else:
        assert_same_objects(eager, optimised, first_seed)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_cuda_graphs_and_overlap_equal_eager(name, taught_checkpoint):
    model = _model(name, taught_checkpoint)
    optimised = LisaSegmenter.from_pretrained(model, device="cuda", dtype="fp32")
    eager = LisaSegmenter.from_pretrained(model, device="cuda", dtype="fp32", **EAGER)
    assert optimised.info()["cuda_graphs"] and optimised.info()["overlap"] and optimised.info()["buckets"]
    _compare(name, optimised, eager, first_seed=40)
    captured = {key[0] for key in optimised._stages.keys()}
    assert {"llm forced pass", "clip", "mask decoder", "sam image encoder"} <= captured, captured
    assert optimised.graph_memory()["cuda_graphs_failed"] is None
    assert optimised._decoder is not None and optimised._decoder.memory()["decode_graphs"] >= 1


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_sam_stream_overlap_equals_serial_encoding(name, taught_checkpoint):
    model = _model(name, taught_checkpoint)
    overlapped = LisaSegmenter.from_pretrained(model, device="cuda", dtype="fp32", cuda_graphs="off")
    serial = LisaSegmenter.from_pretrained(model, device="cuda", dtype="fp32", cuda_graphs="off", overlap="off")
    assert overlapped.info()["overlap"] and not serial.info()["overlap"]
    _compare(name, overlapped, serial, first_seed=43)


@pytest.mark.parametrize("buckets", [True, False], ids=["bucket-padded", "unpadded"])
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_graphed_static_cache_equals_the_dynamic_cache(name, buckets, taught_checkpoint):
    """Graphed decode steps on a static cache, bucket padding on and off (off used to freeze the write
    position into the graph: every replay wrote the same slot), against the dynamic cache without graphs."""
    model = _model(name, taught_checkpoint)
    static = LisaSegmenter.from_pretrained(model, device="cuda", dtype="fp32")
    static.set_optimizations(static_cache=True, cuda_graphs=True, overlap=True, buckets=buckets)
    dynamic = LisaSegmenter.from_pretrained(model, device="cuda", dtype="fp32", **EAGER)
    _compare(name, static, dynamic, first_seed=46)
    assert static._decoder is not None and static._decoder.memory()["decode_graphs"] >= 1


def _quantized_pair(name: str, taught: Path, quantization: str, backend: str) -> tuple[LisaSegmenter, LisaSegmenter]:
    model = _model(name, taught)
    full = LisaSegmenter.from_pretrained(model, device="cuda", dtype="bf16")
    quant = LisaSegmenter.from_pretrained(model, device="cuda", dtype="bf16", quantization=quantization,
                                          quant_backend=backend)
    assert quant.info()["quant_backend"] == backend
    return full, quant


def _compare_quantized(name: str, full: LisaSegmenter, quant: LisaSegmenter) -> None:
    if name == "tiny":  # the taught answer survives, with the same objects
        for mode in ("fast", "chat"):
            a = full.segment(FRAME, QUERY, mode=mode, answer=ANSWER if mode == "fast" else None)
            b = quant.segment(FRAME, QUERY, mode=mode, answer=ANSWER if mode == "fast" else None)
            assert a.text == b.text and len(a.masks) == len(b.masks) == 2
            assert min(iou(x, y) for x, y in zip(a.masks, b.masks, strict=True)) >= 0.9
    else:
        assert_same_objects(full, quant, first_seed=40)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_torchao_quantized_masks_match_bf16(name, quantization, taught_checkpoint):
    """The Orin path (torchao; int4 in the tile-packed layout of PyTorch's own _weight_int4pack_mm kernel):
    every decoder linear really quantized, and the same answers and objects as bf16."""
    full, quant = _quantized_pair(name, taught_checkpoint, quantization, "torchao")
    want = "Int8" if quantization == "8bit" else "Int4TilePackedTo4d"
    weights = [type(m.weight).__name__ for layer in quant.model.llm.model.layers for m in layer.modules()
               if isinstance(m, torch.nn.Linear)]
    assert weights and all(want in w for w in weights), weights
    _compare_quantized(name, full, quant)


@needs_bitsandbytes
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_bitsandbytes_quantized_masks_match_bf16(name, quantization, taught_checkpoint):
    full, quant = _quantized_pair(name, taught_checkpoint, quantization, "bitsandbytes")
    _compare_quantized(name, full, quant)
    if quantization == "8bit":  # its matmul reads outliers on the host: the LLM is never captured
        assert not any(key[0] == "llm forced pass" for key in quant._stages.keys())
        assert quant._decoder is not None and quant._decoder.memory()["decode_graphs"] == 0
        assert quant.graph_memory()["cuda_graphs_failed"] is None


def test_the_bitsandbytes_probe_answers_without_ending_this_process():
    from lisa_agent.engine import quantization

    quantization.bitsandbytes_runs.cache_clear()
    runs = quantization.bitsandbytes_runs(torch.cuda.current_device(), "8bit")  # in a child process
    assert isinstance(runs, bool)
    if importlib.util.find_spec("bitsandbytes") is None:
        assert runs is False


# ------------------------------------------------------------------------------------- failures and devices


def test_a_failed_capture_puts_the_stream_and_the_allocator_back(tiny_checkpoint):
    """A stage that synchronises with the host (as bitsandbytes' 8-bit matmul does) cannot be captured. After
    the failure the thread is back on its stream, no capture is under way, allocations and work go on, and
    this engine captures nothing more."""
    from lisa_agent.engine.acceleration import GraphCapturer

    capturer = GraphCapturer(torch.device("cuda"))
    stream = torch.cuda.current_stream()
    x = torch.ones(64, device="cuda")
    assert capturer.capture("syncing stage", lambda t: t * float(t.sum()), x) is None
    assert capturer.failed is not None and capturer.failed.startswith("syncing stage: ")
    assert torch.cuda.current_stream() == stream and not torch.cuda.is_current_stream_capturing()
    y = torch.full((1 << 20,), 2.0, device="cuda") * x.sum()  # new allocations, real work
    torch.cuda.synchronize()
    assert float(y[0]) == 128.0
    assert capturer.capture("fine stage", lambda t: t * 2, x) is None  # off for this engine from now on
    other = GraphCapturer(torch.device("cuda"))  # another engine is not affected
    graphed = other.capture("fine stage", lambda t: t * 2, x)
    assert graphed is not None and torch.equal(graphed(x + 1), (x + 1) * 2)


def test_an_engine_whose_capture_failed_answers_eagerly_and_says_why(taught_checkpoint):
    seg = LisaSegmenter.from_pretrained(str(taught_checkpoint), device="cuda", dtype="fp32")
    eager = LisaSegmenter.from_pretrained(str(taught_checkpoint), device="cuda", dtype="fp32", **EAGER)
    first = _tiny_outputs(seg)  # graphs captured and replayed
    assert seg.graph_memory()["cuda_graphs"] > 0
    assert seg._capturer is not None
    x = torch.ones(8, device="cuda")
    assert seg._capturer.capture("syncing stage", lambda t: t * float(t.sum()), x) is None
    after = _tiny_outputs(seg)
    for a, b, c in zip(first, after, _tiny_outputs(eager), strict=True):
        assert_same_result(a, c, atol=1e-3)
        assert_same_result(b, c, atol=1e-3)
    info = seg.info()
    assert info["cuda_graphs"] is False and info["cuda_graphs_failed"].startswith("syncing stage")
    assert seg.graph_memory()["cuda_graphs"] == 0  # nothing replayed any more


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (this machine has fewer)")
def test_an_engine_on_the_second_gpu_runs_there_while_the_first_is_current(taught_checkpoint):
    first = LisaSegmenter.from_pretrained(str(taught_checkpoint), device="cuda:0", dtype="fp32")
    second = LisaSegmenter.from_pretrained(str(taught_checkpoint), device="cuda:1", dtype="fp32")
    with torch.cuda.device(0):
        ours, theirs = _tiny_outputs(second), _tiny_outputs(first)
    for a, b in zip(ours, theirs, strict=True):
        assert_same_result(a, b, atol=1e-3)
    assert second.graph_memory()["cuda_graphs"] > 0 and second.graph_memory()["cuda_graphs_failed"] is None
    assert all(t.device == torch.device("cuda:1") for g in second._stages._graphs.values() for t in g.inputs)


def test_graphs_and_static_caches_stay_bounded_over_many_shapes(taught_checkpoint):
    from lisa_agent.engine.acceleration import MAX_DECODE_GRAPHS, MAX_STAGE_GRAPHS

    seg = LisaSegmenter.from_pretrained(str(taught_checkpoint), device="cuda", dtype="fp32")
    for k in range(6):  # prompts in 6 length buckets, batches of 1 to 6: more shapes than kept
        seg.segment(FRAME, "the mug " + "please " * (15 + 20 * k), mode="chat", max_new_tokens=2)
        seg.segment_batch(FRAME, [f"{QUERY} {j} " + "now " * (10 * k) for j in range(k + 1)])
    report = seg.graph_memory()
    assert report["static_caches"] <= MAX_DECODE_GRAPHS
    assert report["cuda_graphs"] <= MAX_DECODE_GRAPHS + MAX_STAGE_GRAPHS
    assert report["cuda_graphs_captured"] > report["cuda_graphs"]  # some were evicted
    assert report["cuda_graphs_failed"] is None
    after = seg.segment(FRAME, QUERY, mode="fast", answer=ANSWER)  # still right after evictions
    eager = LisaSegmenter.from_pretrained(str(taught_checkpoint), device="cuda", dtype="fp32", **EAGER)
    want = eager.segment(FRAME, QUERY, mode="fast", answer=ANSWER)
    assert all(iou(a, b) >= 0.99 for a, b in zip(after.masks, want.masks, strict=True))


def test_the_trackers_sam_path_replays_the_sam_graph(taught_checkpoint):
    seg = LisaSegmenter.from_pretrained(str(taught_checkpoint), device="cuda", dtype="fp32")
    eager = LisaSegmenter.from_pretrained(str(taught_checkpoint), device="cuda", dtype="fp32", **EAGER)
    prompts = eager.segment(FRAME, QUERY, mode="fast", answer=ANSWER, return_logits=True).seg_embeddings
    masks, scores = seg.masks_from_prompts(FRAME, prompts)  # the first thing this engine runs
    assert any(key[0] == "sam image encoder" and key[1][0] == 1 for key in seg._stages.keys())
    want, want_scores = eager.masks_from_prompts(FRAME, prompts)
    assert all(iou(a, b) >= 0.99 for a, b in zip(masks, want, strict=True))
    np.testing.assert_allclose(scores, want_scores, atol=1e-3)
    seg.encode(random_frame(60, 80, seed=8))  # the same SAM graph replays on the SAM stream, not waited for ...
    again, _ = seg.masks_from_prompts(FRAME, prompts)  # ... while the tracker replays it on the main stream
    assert all(iou(a, b) >= 0.99 for a, b in zip(again, want, strict=True))


# ------------------------------------------------------------------------------------- the bench


def test_the_bench_reports_reserved_memory_and_what_the_graphs_hold(capsys):
    import json

    from lisa_agent.cli import main

    assert main(["bench", "--shape", "tiny", "--device", "cuda", "--runs", "2", "--warmup", "1", "--new-tokens", "4",
                 "--image-size", "60x80", "--mode", "fast", "--mode", "chat", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peak_reserved_mb"] >= report["peak_memory_mb"] > 0
    assert report["graph_memory"]["cuda_graphs"] > 0 and report["graph_memory"]["cuda_graphs_failed"] is None


def test_the_benchs_random_model_is_built_on_the_gpu_in_bf16_without_float32_staging():
    from lisa_agent.benchmarks.engine import random_segmenter
    from lisa_agent.config import EngineConfig
    from lisa_agent.engine.tiny import TinyShape

    llama = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=32004, rms_norm_eps=1e-6, max_position_embeddings=1024)
    clip = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=56,
                patch_size=14)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    seg = random_segmenter(llama, TinyShape().sam, clip, EngineConfig(device="cuda", dtype="bf16"))
    model_bytes = sum(t.numel() * t.element_size() for t in [*seg.model.parameters(), *seg.model.buffers()])
    assert torch.cuda.max_memory_allocated() - start <= 1.75 * model_bytes  # float32 staging: 3x at the cast
    for name, t in [*seg.model.named_parameters(), *seg.model.named_buffers()]:
        assert torch.isfinite(t.float()).all(), name
    result = seg.segment(FRAME, QUERY, mode="fast", return_logits=True)
    assert len(result.masks) == 1 and np.isfinite(result.logits).all()


def test_the_reasoners_compiled_decoding_equals_eager(tmp_path):
    """A tiny random reasoner on CUDA (fp32): the static cache with transformers' compiled decoding step (CUDA
    graphs) writes the eager path's tokens, and the compile did not fail over to eager."""
    from lisa_agent import open_backend
    from lisa_agent.reasoner.tiny import make_tiny_reasoner, make_tiny_sam2

    folder, sam = make_tiny_reasoner(tmp_path / "reasoner"), make_tiny_sam2(tmp_path / "sam2")
    backend = open_backend(str(folder), sam_model=str(sam), device="cuda", dtype="fp32")
    assert backend.static_cache and backend.cuda_graphs
    backend.model.generation_config.eos_token_id = None
    frame = random_frame(150, 260, seed=5)
    compiled = [backend.segment(frame, "the knife", max_new_tokens=16).output_ids for _ in range(2)]
    assert backend.graphs_error is None and backend.cuda_graphs
    backend.set_optimizations(static_cache=False, cuda_graphs=False)
    eager = backend.segment(frame, "the knife", max_new_tokens=16).output_ids
    assert compiled[0] == compiled[1] == eager and len(eager) == 16
