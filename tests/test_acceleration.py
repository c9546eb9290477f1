"""The optimised hot path gives the eager path's outputs: static KV cache, bucket padding, torchao int8,
and the bench reports what it ran with (CUDA graphs and the SAM stream overlap: tests/test_cuda.py).

On the CPU the static cache is the preallocated one (:func:`preallocated_cache`) unless bucket padding is
asked for, which selects ``transformers.StaticCache`` (the one CUDA graphs replay): both are compared with
the dynamic cache here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_same_objects, assert_same_result, random_frame, teach_answer

from lisa_agent import LisaSegmenter
from lisa_agent.engine.acceleration import BUCKET, bucket, pad_length, preallocated_cache
from lisa_agent.engine.generation import decoder_pass
from lisa_agent.errors import QuantizationError

QUERY = "the red mug"
ANSWER = "Sure, [SEG]. It is [SEG]."
FRAME = random_frame(60, 80, seed=3)



@pytest.fixture(scope="module")
def taught(tiny_checkpoint):
    """A tiny segmenter whose LLM answers ANSWER (two [SEG]) to QUERY on FRAME."""
    seg = LisaSegmenter.from_pretrained(tiny_checkpoint)
    teach_answer(seg, FRAME, QUERY, ANSWER)
    return seg


def _switch(seg: LisaSegmenter, *, static: bool, buckets: bool = False) -> None:
    seg.set_optimizations(static_cache=static, cuda_graphs=False, overlap=False, buckets=buckets)


def test_the_static_cache_is_on_by_default_and_reported(tiny_checkpoint):
    seg = LisaSegmenter.from_pretrained(tiny_checkpoint)
    info = seg.info()
    assert info["static_cache"] is True
    assert (info["cuda_graphs"], info["overlap"], info["buckets"]) == (False, False, False)  # CPU: no graphs
    off = LisaSegmenter.from_pretrained(tiny_checkpoint, static_cache="off")
    assert off.info()["static_cache"] is False


@pytest.mark.parametrize("buckets", [False, True], ids=["preallocated", "bucketed-static"])
def test_static_cache_chat_equals_dynamic_cache_chat(taught, buckets):
    seg = taught
    try:
        _switch(seg, static=False)
        dynamic = seg.segment(FRAME, QUERY, mode="chat", max_new_tokens=32, return_logits=True)
        _switch(seg, static=True, buckets=buckets)
        static = seg.segment(FRAME, QUERY, mode="chat", max_new_tokens=32, return_logits=True)
        again = seg.segment(FRAME, QUERY, mode="chat", max_new_tokens=32, return_logits=True)  # the cache reused
    finally:
        _switch(seg, static=True)
    assert dynamic.text.count("[SEG]") == 2  # the taught answer: a comparison that can fail
    assert_same_result(static, dynamic)
    assert_same_result(again, dynamic)


@pytest.mark.parametrize("buckets", [False, True], ids=["preallocated", "bucketed-static"])
def test_static_cache_answers_every_prompt_length_like_the_dynamic_one(tiny_segmenter, buckets):
    """Untaught random weights: long free answers, prompts of several lengths (and so several cache
    sizes, one crossing a bucket) and a conversation history."""
    seg = tiny_segmenter
    frame = random_frame(48, 64, seed=9)
    queries = ["mug", "grab something to cut with, " + "please " * 30, "what could hold my coffee?"]
    outs = {}
    try:
        for static in (False, True):
            _switch(seg, static=static, buckets=buckets)
            outs[static] = [seg.segment(frame, q, mode="chat", max_new_tokens=40, return_logits=True) for q in queries]
            talk = seg.start_conversation(frame)
            outs[static] += [seg.chat(talk, q, max_new_tokens=24, return_logits=True)
                             for q in ("the mug", "and the other one?")]
    finally:
        _switch(seg, static=True)
    assert len({len(r.output_ids) for r in outs[False]}) > 1  # answers of several lengths
    for a, b in zip(outs[True], outs[False], strict=True):
        assert_same_result(a, b)


@pytest.mark.parametrize(("graphs", "pad"), [(False, False), (False, True), (True, False)],
                         ids=["preallocated", "bucketed-static", "graph-ready-unpadded"])
def test_static_decoder_bars_tokens_and_caps_seg_like_the_dynamic_loop(taught, graphs, pad):
    """The decoding contract both loops share: ``banned`` never appears, at most ``max_segs`` [SEG] states.
    (``graphs`` on the CPU: the decode step runs eagerly, on the cache a captured step would use.)"""
    from lisa_agent.engine.acceleration import StaticDecoder
    from lisa_agent.engine.generation import greedy_cached

    seg = taught
    feats = seg.encode(FRAME)
    ids = torch.tensor([seg.tokenizer.encode_prompt(seg._prompt(QUERY))])
    embeds, _ = seg.model.embed_with_image(ids, feats.image_tokens)
    decoder = StaticDecoder(seg.model.llm, graphs=graphs, pad=pad)
    for max_segs, banned in ((2, None), (1, None), (0, seg.seg_token_id)):
        with torch.no_grad():
            want = greedy_cached(seg.model, ids, feats.image_tokens, 32, eos=seg.eos_token_id, seg=seg.seg_token_id,
                                 max_segs=max_segs, banned=banned)
            got = decoder.generate(embeds, 32, eos=seg.eos_token_id, seg=seg.seg_token_id, max_segs=max_segs,
                                   banned=banned)
        assert got[0] == want[0]
        assert got[0].count(seg.seg_token_id) == len(got[1]) == min(2, max_segs)
        torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


def _python_state(cache) -> list[dict]:  # noqa: ANN001
    """Per layer: what a replayed CUDA graph cannot update (it runs no Python): plain attributes, and which
    tensor object each tensor attribute is."""
    return [{k: (id(v) if isinstance(v, torch.Tensor) else v) for k, v in vars(layer).items()} for layer in cache.layers]


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "bucket-padded"])
def test_a_graphed_decoder_keeps_its_write_position_where_a_replay_moves_it(tiny_segmenter, pad):
    """A captured decode step replays its kernels and nothing else. Everything one step changes in the cache
    must live in tensors it updates in place; a Python counter (the preallocated cache's ``length``) would stay
    frozen at its capture-time value and every replay would write the same slot. Bucket padding off must not
    change that (it used to select the preallocated cache)."""
    from lisa_agent.engine.acceleration import StaticDecoder

    llm = tiny_segmenter.model.llm
    decoder = StaticDecoder(llm, graphs=True, pad=pad)
    cache = decoder._entry(64).cache
    hidden = llm.config.hidden_size
    with torch.no_grad():
        decoder_pass(llm.model, torch.randn(1, 5, hidden), cache, torch.arange(5)[None])
        before = _python_state(cache)
        for position in (5, 6):
            decoder._eager_step(cache, torch.tensor([[7]]), torch.tensor([[position]]))
            assert _python_state(cache) == before
    assert int(cache.get_seq_length()) == 7  # and the position did move, in the tensors


def test_static_caches_are_bounded_and_reported(tiny_segmenter):
    """One cache (with its decode graph on CUDA) per cache length, at most MAX_DECODE_GRAPHS kept: prompts of
    many lengths no longer grow memory without end."""
    from lisa_agent.engine.acceleration import MAX_DECODE_GRAPHS

    seg = tiny_segmenter
    frame = random_frame(48, 64, seed=9)
    try:
        _switch(seg, static=True)
        lengths = set()
        for k in range(MAX_DECODE_GRAPHS + 2):  # prompts in MAX_DECODE_GRAPHS + 2 different cache buckets
            result = seg.segment(frame, "the mug " + "please " * (15 + 20 * k), mode="chat", max_new_tokens=2)
            lengths.add(bucket(len(result.input_ids) - 1 + seg.encode(frame).image_tokens.shape[1] + 2))
            report = seg.graph_memory()
            assert report["static_caches"] == min(k + 1, MAX_DECODE_GRAPHS)
        assert len(lengths) == MAX_DECODE_GRAPHS + 2
        assert report["static_cache_mb"] > 0 and report["cuda_graphs"] == 0 and report["cuda_graphs_failed"] is None
    finally:
        _switch(seg, static=True)


def test_the_lru_evicts_the_least_recently_used():
    from lisa_agent.engine.lru import LRU

    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "b" is now the least recently used
    lru.put("c", 3)
    assert lru.keys() == ["a", "c"] and "b" not in lru and len(lru) == 2


def test_bucket_padding_does_not_change_fast_or_batched_outputs(taught):
    seg = taught
    queries = [QUERY, "grab something to cut with please", "what could hold my coffee " + "now " * 20]
    try:
        _switch(seg, static=True, buckets=False)
        plain = [seg.segment(FRAME, q, mode="fast", answer=ANSWER, return_logits=True) for q in queries]
        plain_batch = seg.segment_batch(FRAME, queries, return_logits=True)
        _switch(seg, static=True, buckets=True)
        padded = [seg.segment(FRAME, q, mode="fast", answer=ANSWER, return_logits=True) for q in queries]
        padded_batch = seg.segment_batch(FRAME, queries, return_logits=True)
    finally:
        _switch(seg, static=True)
    for a, b in zip([*padded, *padded_batch], [*plain, *plain_batch], strict=True):
        assert a.input_ids == b.input_ids  # the pads are not part of the prompt the caller sees
        assert_same_result(a, b, atol=1e-5)


def test_bucket_and_pad_length():
    assert [bucket(n) for n in (0, 1, BUCKET, BUCKET + 1, 3 * BUCKET)] == [BUCKET, BUCKET, BUCKET, 2 * BUCKET,
                                                                          3 * BUCKET]
    x = torch.ones(2, 5, 3)
    y = pad_length(x, 8)
    assert y.shape == (2, 8, 3) and torch.equal(y[:, :5], x) and not y[:, 5:].any()
    assert pad_length(x, 4) is x


def test_preallocated_cache_refuses_to_overflow(tiny_segmenter):
    llm = tiny_segmenter.model.llm
    cache = preallocated_cache(llm.config, 8)
    embeds = torch.zeros(1, 6, llm.config.hidden_size)
    with torch.no_grad():
        decoder_pass(llm.model, embeds, cache)
        assert cache.get_seq_length() == 6
        with pytest.raises(ValueError, match="holds 8 positions; 12 asked for"):
            decoder_pass(llm.model, embeds, cache)


# ---------------------------------------------------------------------------------------- quantization


@pytest.fixture(scope="module")
def tabletop():
    return LisaSegmenter.from_pretrained("tabletop-tiny")


@pytest.mark.slow
def test_torchao_int8_masks_match_full_precision_on_the_cpu(tabletop):
    """The public code's users report blank masks with quantized LISA: our int8 path (torchao, weight-only,
    the LLM's decoder layers) must find the same objects as fp32 on validation scenes."""
    int8 = LisaSegmenter.from_pretrained("tabletop-tiny", quantization="8bit")
    assert int8.info()["quant_backend"] == "torchao"
    assert "Int8" in type(int8.model.llm.model.layers[0].mlp.down_proj.weight).__name__  # really quantized
    assert_same_objects(tabletop, int8, first_seed=40)


@pytest.mark.slow
def test_device_preprocessing_finds_the_same_objects_as_pil(tabletop):
    """``preprocess="device"`` (torch resizing on the engine's device, here the CPU) against the published
    PIL preprocessing on validation scenes: the same answers, the same masks up to boundary pixels."""
    on_device = LisaSegmenter.from_pretrained("tabletop-tiny", preprocess="device")
    assert on_device.info()["device_preprocess"] is True and tabletop.info()["device_preprocess"] is False
    assert_same_objects(tabletop, on_device, first_seed=50)


def test_int4_uses_the_tile_packed_layout_with_a_group_size_that_divides_each_layer():
    """torchao's default int4 layout ("plain") runs on the separate mslk kernels, which Jetson Orin lacks; the
    tile-packed layout runs on PyTorch's own _weight_int4pack_mm (sm_80 and later, Orin's sm_87 included).
    A group size that does not divide a layer's width made torchao skip that layer silently."""
    from lisa_agent.engine.quantization import torchao_config

    for width, group in ((4096, 128), (11008, 128), (192, 64), (96, 32)):
        config = torchao_config("4bit", width)
        assert (config.int4_packing_format, config.group_size) == ("tile_packed_to_4d", group)
    assert torchao_config("4bit", 100) is None  # stays unquantized (and is reported)
    assert type(torchao_config("8bit", 100)).__name__ == "Int8WeightOnlyConfig"


def test_a_bitsandbytes_that_ends_its_process_leaves_the_engine_running(tmp_path, monkeypatch):
    """bitsandbytes' native code has called exit() on CUDA errors: the probe for quant_backend="auto" runs
    in a child process, so such an exit only tells us to use torchao. (A stand-in bitsandbytes that exits
    on import plays that part here.)"""
    from lisa_agent.engine import quantization

    fake = tmp_path / "site" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os\nos._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    quantization.bitsandbytes_runs.cache_clear()
    try:
        assert quantization.bitsandbytes_runs(0, "8bit") is False  # and this process is still here
    finally:
        quantization.bitsandbytes_runs.cache_clear()


def test_4bit_on_the_cpu_is_refused_with_a_reason(tiny_checkpoint):
    with pytest.raises(QuantizationError, match="4bit weights with torchao need a CUDA device"):
        LisaSegmenter.from_pretrained(tiny_checkpoint, quantization="4bit", device="cpu")
    with pytest.raises(QuantizationError, match="bitsandbytes needs a CUDA device"):
        LisaSegmenter.from_pretrained(tiny_checkpoint, quantization="8bit", device="cpu", quant_backend="bitsandbytes")


# ---------------------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compiled_encoders_give_the_eager_masks_and_are_kept_across_switches(taught):
    """``compile="on"``: SAM's and CLIP's encoders through torch.compile (inductor, compiled here on the CPU)
    give the eager path's tokens, [SEG] states and masks; the compiled code really ran (nothing fell back)."""
    seg = taught
    frame = random_frame(60, 80, seed=11)  # not in the feature cache: the encoders run
    try:
        seg.set_optimizations(static_cache=True, cuda_graphs=False, overlap=False, compile=False)
        eager = seg.segment(frame, QUERY, mode="chat", max_new_tokens=16, return_logits=True)
        seg.clear_cache()
        seg.set_optimizations(static_cache=True, cuda_graphs=False, overlap=False, compile=True)
        assert seg.info()["compile"] is True
        compiled = seg.segment(frame, QUERY, mode="chat", max_new_tokens=16, return_logits=True)
        kept = seg._compiled
        assert kept is not None and kept.failed == set()  # both encoders ran compiled
        seg.set_optimizations(static_cache=True, cuda_graphs=False, overlap=False, compile=False)
        seg.set_optimizations(static_cache=True, cuda_graphs=False, overlap=False, compile=True)
        assert seg._compiled is kept  # turned off and on again: not compiled a second time
    finally:
        seg.set_optimizations(static_cache=True, cuda_graphs=False, overlap=False, compile=False)
        seg.clear_cache()
    assert eager.text.count("[SEG]") == 2
    assert_same_result(compiled, eager)


def test_an_encoder_that_cannot_compile_runs_eagerly_with_a_warning(tiny_segmenter, caplog):
    from lisa_agent.engine.acceleration import CompiledEncoders

    def broken_backend(graph_module, example_inputs):  # noqa: ANN001, ANN202 - torch.compile's backend protocol
        raise RuntimeError("no compiler for this graph")

    model = tiny_segmenter.model
    encoders = CompiledEncoders(model, backend=broken_backend)
    clip_px = torch.rand(1, 3, tiny_segmenter.clip_size, tiny_segmenter.clip_size)
    sam_px = torch.rand(1, 3, tiny_segmenter.sam_size, tiny_segmenter.sam_size)
    with torch.inference_mode(), caplog.at_level("WARNING", logger="lisa_agent.engine.acceleration"):
        tokens, emb = encoders.clip(clip_px), encoders.sam(sam_px)
        torch.testing.assert_close(tokens, model.encode_clip(clip_px))
        torch.testing.assert_close(emb, model.encode_sam(sam_px))
        encoders.clip(clip_px)  # a second call goes straight to the eager encoder: warned once
    assert encoders.failed == {"clip", "sam"}
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 2 and all("runs eagerly" in w and "no compiler" in w for w in warnings)


def test_the_trackers_sam_path_runs_the_engines_optimised_encoder(tiny_checkpoint):
    """``masks_from_prompts`` (the ``sam`` tracker, every frame between reasoning steps) runs SAM's encoder as
    the engine does (compiled here; graphed on CUDA), not always the eager one; same masks."""
    from lisa_agent.engine.acceleration import CompiledEncoders

    seg = LisaSegmenter.from_pretrained(tiny_checkpoint)
    frame = random_frame(60, 80, seed=5)
    prompts = np.random.default_rng(0).normal(size=(2, seg.model.sam_spec.prompt_embed_dim)).astype(np.float32)
    eager_masks, eager_scores = seg.masks_from_prompts(frame, prompts)
    compiled_graphs: list[int] = []

    def counting_backend(graph_module, example_inputs):  # noqa: ANN001, ANN202 - torch.compile's backend protocol
        compiled_graphs.append(len(graph_module.graph.nodes))
        return graph_module.forward  # runs what dynamo traced, without a compiler

    seg._compiled_kept = CompiledEncoders(seg.model, backend=counting_backend)
    seg.set_optimizations(static_cache=True, cuda_graphs=False, overlap=False, compile=True)
    masks, scores = seg.masks_from_prompts(frame, prompts)
    assert compiled_graphs and seg._compiled is not None and seg._compiled.failed == set()
    assert np.array_equal(masks, eager_masks)
    np.testing.assert_allclose(scores, eager_scores, atol=1e-5)


def test_compile_is_off_by_default_and_validated(tiny_checkpoint):
    from lisa_agent.config import EngineConfig
    from lisa_agent.errors import InvalidArgumentError

    assert EngineConfig().compile == "off"
    assert LisaSegmenter.from_pretrained(tiny_checkpoint).info()["compile"] is False
    with pytest.raises(InvalidArgumentError, match="compile must be one of off, on; got 'max'"):
        EngineConfig(compile="max")


# ---------------------------------------------------------------------------------------- the bench


def test_bench_json_reports_settings_memory_and_stage_medians(capsys):
    from lisa_agent.cli import main

    assert main(["bench", "--shape", "tiny", "--runs", "2", "--warmup", "1", "--new-tokens", "4",
                 "--image-size", "60x80", "--mode", "fast", "--mode", "chat", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["static_cache"] is True and report["settings"]["cuda_graphs"] is False
    assert report["settings"]["quantization"] is None and report["settings"]["dtype"] == "float32"
    assert isinstance(report["peak_memory_mb"], float) and report["peak_memory_mb"] >= 0
    assert report["peak_reserved_mb"] is None  # CUDA only: what the caching allocator held, graph pools included
    assert report["graph_memory"]["static_caches"] >= 1 and report["graph_memory"]["cuda_graphs"] == 0
    for mode in ("fast", "chat"):
        stages = report["modes"][mode]["stages_ms"]
        assert {"sam_encoder", "clip", "llm", "decoder", "total"} <= set(stages)
        assert all(v >= 0 for v in stages.values())


def test_the_benchs_random_model_is_built_in_its_dtype_with_every_buffer_initialised():
    """The random LISA-7B of ``bench --shape 7b`` was staged in float32 (~27 GB) and left SAM's positional
    encoding matrix uninitialised (values near -1.5e38 on a GPU: garbage masks). Built here at a tiny size in
    bf16: no float32 tensor as large as a weight is ever made, every tensor is finite, the random matrix is
    N(0, 1) as SAM's constructor makes it, and a query gives finite mask logits."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from lisa_agent.benchmarks.engine import random_segmenter
    from lisa_agent.config import EngineConfig
    from lisa_agent.engine.tiny import TinyShape

    shape = TinyShape()
    llama = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32004, rms_norm_eps=1e-6, max_position_embeddings=512)
    clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56,
                patch_size=14)
    made: list[tuple[torch.dtype, int]] = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            made.extend((t.dtype, t.numel()) for t in tree_flatten(out)[0]
                        if isinstance(t, torch.Tensor) and t.device.type != "meta")
            return out

    with Allocations():
        seg = random_segmenter(llama, shape.sam, clip, EngineConfig(device="cpu", dtype="bf16"), name="random-tiny")
    largest_weight = max(p.numel() for p in seg.model.llm.parameters())
    staged = [n for dtype, n in made if dtype == torch.float32 and n >= largest_weight]
    assert not staged, f"float32 tensors of {staged[:4]} elements while building a bf16 model"
    assert seg.dtype == torch.bfloat16
    for name, t in [*seg.model.named_parameters(), *seg.model.named_buffers()]:
        assert torch.isfinite(t.float()).all(), name
    gaussian = seg.model.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.float()
    assert 0.5 < float(gaussian.std()) < 2.0
    result = seg.segment(random_frame(60, 80), "the mug", mode="fast", return_logits=True)
    assert len(result.masks) == 1 and np.isfinite(result.logits).all()


def test_bench_compare_times_each_lever_in_one_run(capsys):
    from lisa_agent.cli import main

    assert main(["bench", "--shape", "tiny", "--runs", "2", "--warmup", "1", "--new-tokens", "4",
                 "--image-size", "60x80", "--mode", "chat", "--compare", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # on the CPU only the static cache applies: as configured, then without it
    assert [r["levers_off"] for r in result["runs"]] == [[], ["static_cache"]]
    assert [r["report"]["settings"]["static_cache"] for r in result["runs"]] == [True, False]
    assert set(result["ratios"]) == {"static_cache (slower without it)", "all (eager over optimised)"}
    assert result["ratios"]["static_cache (slower without it)"]["chat"] > 0
