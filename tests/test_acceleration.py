"""The optimised hot path gives the eager path's outputs: static KV cache, bucket padding, torchao int8,
and (where CUDA exists) CUDA graphs and the SAM stream overlap; the bench reports what it ran with.

On the CPU the static cache is the preallocated one (:func:`preallocated_cache`) unless bucket padding is
asked for, which selects ``transformers.StaticCache`` (the one CUDA graphs replay): both are compared with
the dynamic cache here. Tests marked ``gpu`` skip with a stated reason where no CUDA device exists.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import iou, random_frame, teach_answer

from lisa_agent import LisaSegmenter
from lisa_agent.acceleration import BUCKET, bucket, pad_length, preallocated_cache
from lisa_agent.errors import QuantizationError
from lisa_agent.generation import decoder_pass

QUERY = "the red mug"
ANSWER = "Sure, [SEG]. It is [SEG]."
FRAME = random_frame(60, 80, seed=3)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.fixture(scope="module")
def taught(tiny_checkpoint):
    """A tiny segmenter whose LLM answers ANSWER (two [SEG]) to QUERY on FRAME."""
    seg = LisaSegmenter.from_pretrained(tiny_checkpoint)
    teach_answer(seg, FRAME, QUERY, ANSWER)
    return seg


def _switch(seg: LisaSegmenter, *, static: bool, buckets: bool = False) -> None:
    seg.set_optimizations(static_cache=static, cuda_graphs=False, overlap=False, buckets=buckets)


def _assert_same(a, b, *, atol: float = 1e-4) -> None:  # noqa: ANN001
    assert a.output_ids == b.output_ids
    assert a.text == b.text
    assert len(a.masks) == len(b.masks)
    np.testing.assert_allclose(a.seg_embeddings, b.seg_embeddings, atol=atol, rtol=atol)
    np.testing.assert_allclose(a.logits, b.logits, atol=10 * atol, rtol=10 * atol)
    for x, y in zip(a.masks, b.masks, strict=True):
        assert iou(x, y) >= 0.99


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
    _assert_same(static, dynamic)
    _assert_same(again, dynamic)


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
        _assert_same(a, b)


@pytest.mark.parametrize("pad", [False, True], ids=["preallocated", "bucketed-static"])
def test_static_decoder_bars_tokens_and_caps_seg_like_the_dynamic_loop(taught, pad):
    """The decoding contract both loops share: ``banned`` never appears, at most ``max_segs`` [SEG] states."""
    from lisa_agent.acceleration import StaticDecoder
    from lisa_agent.generation import greedy_cached

    seg = taught
    feats = seg.encode(FRAME)
    ids = torch.tensor([seg.tokenizer.encode_prompt(seg._prompt(QUERY))])
    embeds, _ = seg.model.embed_with_image(ids, feats.image_tokens)
    decoder = StaticDecoder(seg.model.llm, graphs=False, pad=pad)
    for max_segs, banned in ((2, None), (1, None), (0, seg.seg_token_id)):
        with torch.no_grad():
            want = greedy_cached(seg.model, ids, feats.image_tokens, 32, eos=seg.eos_token_id, seg=seg.seg_token_id,
                                 max_segs=max_segs, banned=banned)
            got = decoder.generate(embeds, 32, eos=seg.eos_token_id, seg=seg.seg_token_id, max_segs=max_segs,
                                   banned=banned)
        assert got[0] == want[0]
        assert got[0].count(seg.seg_token_id) == len(got[1]) == min(2, max_segs)
        torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


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
        _assert_same(a, b, atol=1e-5)


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


def _assert_same_objects(reference: LisaSegmenter, other: LisaSegmenter, first_seed: int) -> None:
    """``other`` answers 12 chat queries on 3 validation scenes as ``reference`` does: at least 11 answers the
    same, and the masks of matching answers with IoU mean >= 0.97, min >= 0.9 (at least 8 of them)."""
    from lisa_agent.data.queries import queries_for_scene
    from lisa_agent.data.tabletop import render_scene, split_seed

    ious, same_text, compared = [], 0, 0
    for k in range(3):
        scene = render_scene(split_seed("val", first_seed + k), size=(240, 320))
        for q in queries_for_scene(scene)[:4]:
            ours = reference.segment(scene.image, q.text, mode="chat", max_new_tokens=32)
            theirs = other.segment(scene.image, q.text, mode="chat", max_new_tokens=32)
            compared += 1
            same_text += ours.text == theirs.text
            if len(ours.masks) and len(theirs.masks) == len(ours.masks):
                ious.extend(iou(a, b) for a, b in zip(ours.masks, theirs.masks, strict=True))
    assert compared == 12 and same_text >= 11
    assert len(ious) >= 8 and min(ious) >= 0.9 and float(np.mean(ious)) >= 0.97


@pytest.mark.slow
def test_torchao_int8_masks_match_full_precision_on_the_cpu(tabletop):
    """The public code's users report blank masks with quantized LISA: our int8 path (torchao, weight-only,
    the LLM's decoder layers) must find the same objects as fp32 on validation scenes."""
    int8 = LisaSegmenter.from_pretrained("tabletop-tiny", quantization="8bit")
    assert int8.info()["quant_backend"] == "torchao"
    assert "Int8" in type(int8.model.llm.model.layers[0].mlp.down_proj.weight).__name__  # really quantized
    _assert_same_objects(tabletop, int8, first_seed=40)


@pytest.mark.slow
def test_device_preprocessing_finds_the_same_objects_as_pil(tabletop):
    """``preprocess="device"`` (torch resizing on the engine's device, here the CPU) against the published
    PIL preprocessing on validation scenes: the same answers, the same masks up to boundary pixels."""
    on_device = LisaSegmenter.from_pretrained("tabletop-tiny", preprocess="device")
    assert on_device.info()["device_preprocess"] is True and tabletop.info()["device_preprocess"] is False
    _assert_same_objects(tabletop, on_device, first_seed=50)


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
    _assert_same(compiled, eager)


def test_an_encoder_that_cannot_compile_runs_eagerly_with_a_warning(tiny_segmenter, caplog):
    from lisa_agent.acceleration import CompiledEncoders

    def broken_backend(graph_module, example_inputs):  # noqa: ANN001, ANN202 - torch.compile's backend protocol
        raise RuntimeError("no compiler for this graph")

    model = tiny_segmenter.model
    encoders = CompiledEncoders(model, backend=broken_backend)
    clip_px = torch.rand(1, 3, tiny_segmenter.clip_size, tiny_segmenter.clip_size)
    sam_px = torch.rand(1, 3, tiny_segmenter.sam_size, tiny_segmenter.sam_size)
    with torch.inference_mode(), caplog.at_level("WARNING", logger="lisa_agent.acceleration"):
        tokens, emb = encoders.clip(clip_px), encoders.sam(sam_px)
        torch.testing.assert_close(tokens, model.encode_clip(clip_px))
        torch.testing.assert_close(emb, model.encode_sam(sam_px))
        encoders.clip(clip_px)  # a second call goes straight to the eager encoder: warned once
    assert encoders.failed == {"clip", "sam"}
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 2 and all("runs eagerly" in w and "no compiler" in w for w in warnings)


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
    for mode in ("fast", "chat"):
        stages = report["modes"][mode]["stages_ms"]
        assert {"sam_encoder", "clip", "llm", "decoder", "total"} <= set(stages)
        assert all(v >= 0 for v in stages.values())


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


# ---------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_and_overlap_equal_eager_on_cuda(tiny_checkpoint):
    seg = LisaSegmenter.from_pretrained(tiny_checkpoint, device="cuda", dtype="fp32")
    teach_answer(seg, FRAME, QUERY, ANSWER)
    assert seg.info()["cuda_graphs"] and seg.info()["overlap"] and seg.info()["buckets"]
    fast = [seg.segment(FRAME, QUERY, mode=m, answer=ANSWER if m == "fast" else None, max_new_tokens=32,
                        return_logits=True) for m in ("fast", "chat", "fast", "chat")]  # captures, then replays
    batch = seg.segment_batch(FRAME, [QUERY, "grab something to cut with"], return_logits=True)
    captured = {key[0] for key, graph in seg._stages._graphs.items() if graph is not None}
    assert {"llm forced pass", "clip", "mask decoder"} <= captured, captured
    seg.set_optimizations(static_cache=False, cuda_graphs=False, overlap=False)  # preprocessing stays as it was
    seg.clear_cache()
    eager = [seg.segment(FRAME, QUERY, mode=m, answer=ANSWER if m == "fast" else None, max_new_tokens=32,
                         return_logits=True) for m in ("fast", "chat")]
    eager_batch = seg.segment_batch(FRAME, [QUERY, "grab something to cut with"], return_logits=True)
    assert eager[1].text.count("[SEG]") == 2
    for a, b in zip([*fast, *batch], [*eager, *eager, *eager_batch], strict=True):
        _assert_same(a, b, atol=1e-3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_masks_match_bf16_on_cuda(quantization):
    from lisa_agent.data.queries import queries_for_scene
    from lisa_agent.data.tabletop import render_scene, split_seed

    full = LisaSegmenter.from_pretrained("tabletop-tiny", device="cuda", dtype="bf16")
    quant = LisaSegmenter.from_pretrained("tabletop-tiny", device="cuda", dtype="bf16", quantization=quantization)
    ious = []
    for k in range(3):
        scene = render_scene(split_seed("val", 40 + k), size=(240, 320))
        for q in queries_for_scene(scene)[:4]:
            a = full.segment(scene.image, q.text, mode="chat", max_new_tokens=32)
            b = quant.segment(scene.image, q.text, mode="chat", max_new_tokens=32)
            if len(a.masks) and len(a.masks) == len(b.masks):
                ious.extend(iou(x, y) for x, y in zip(a.masks, b.masks, strict=True))
    assert len(ious) >= 6 and float(np.mean(ious)) >= 0.9, (quant.info()["quant_backend"], ious)
