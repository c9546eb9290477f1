"""The reasoner backend end to end with tiny RANDOM-WEIGHT checkpoints in the published layouts (a Qwen2.5-VL and a
transformers SAM 2, built from small configs, saved to a tmp folder and loaded through ``open_backend`` as a real
checkpoint would be). A random model writes nonsense, so where the answer matters only its generation is replaced
by a forced answer (the tokens a trained model would write); everything else is the real path: the chat template,
the processor, decoding, parsing, SAM 2's encoder, prompt encoder and decoder, the result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_result_schema, force_generation, random_frame
from PIL import Image

from lisa_agent.backend import SegmentBackend, load_model, open_backend
from lisa_agent.config import EngineConfig
from lisa_agent.errors import InvalidArgumentError
from lisa_agent.reasoner.loading import checkpoint_model_type, is_reasoner
from lisa_agent.reasoner.segmenter import ANSWER_END, ReasonerSegmenter
from lisa_agent.result import SegmentationResult

H, W = 150, 260  # a non-square frame: factors 260/840 and 150/840
ANSWER = ('<think>A knife has a blade; the mug cannot cut.</think>\n<answer>[{"bbox_2d": [100,200,400,600], '
          '"point_2d": [250,400]}, {"bbox_2d": [500,100,800,300], "point_2d": [650,200]}]</answer>')
#: the boxes and points above in frame pixels: int(v * 260 / 840 + 0.5), int(v * 150 / 840 + 0.5)
BOXES = [(31, 36, 124, 107), (155, 18, 248, 54)]
POINTS = [(77, 71), (201, 36)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from lisa_agent.reasoner.tiny import make_tiny_reasoner, make_tiny_sam2

    root = tmp_path_factory.mktemp("reasoner")
    return make_tiny_reasoner(root / "VisionReasoner-tiny"), make_tiny_sam2(root / "sam2-tiny")


@pytest.fixture(scope="module")
def reasoner(checkpoints):
    folder, sam = checkpoints
    return open_backend(str(folder), sam_model=str(sam), device="cpu", dtype="fp32")


def test_open_backend_picks_the_reasoner_from_config_json(checkpoints, reasoner, tmp_path):
    folder, _ = checkpoints
    assert checkpoint_model_type(folder) == "qwen2_5_vl" and is_reasoner(folder)
    assert isinstance(reasoner, ReasonerSegmenter) and isinstance(reasoner, SegmentBackend)
    info = reasoner.info()
    assert info["backend"] == "reasoner" and info["style"] == "vision_reasoner" and info["dtype"] == "float32"
    assert info["max_new_tokens"] == 2048 and info["image_size"] == 840
    # LISA stays the default: the bundled model and a llava config.json are not reasoners
    assert not is_reasoner("tabletop-tiny")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert not is_reasoner(tmp_path)
    assert not is_reasoner("no-such-owner/no-such-model")  # offline: unknown, LISA's loader reports it


def test_reasoner_refuses_lisa_only_options(checkpoints):
    folder, sam = checkpoints
    with pytest.raises(InvalidArgumentError, match="LISA option"):
        load_model(EngineConfig(model=str(folder), sam_model=str(sam), device="cpu", mask_tta="hflip"))
    with pytest.raises(InvalidArgumentError, match="LISA template"):
        load_model(EngineConfig(model=str(folder), sam_model=str(sam), device="cpu", template="llava_v1"))


def test_real_generation_gives_a_result_of_the_right_shapes(reasoner):
    frame = random_frame(H, W, seed=1)
    result = reasoner.segment(frame, "Grab something to cut with.", max_new_tokens=4, frame_id="f1")
    assert isinstance(result, SegmentationResult)
    assert 1 <= len(result.output_ids) <= 4 and result.image_size == (H, W) and result.frame_id == "f1"
    # random weights write nonsense: no object, a sentence saying so, never a crash
    assert result.masks.shape == (0, H, W) and result.masks.dtype == bool and result.empty
    assert result.text.startswith("Nothing was segmented for \"Grab something to cut with.\"")
    assert result.reasoning is not None and result.reasoning.status in ("no_answer", "malformed")
    # the prompt: Qwen2.5-VL's chat template around the public instruction; 840 x 840 -> 30 x 30 merged tokens
    assert result.prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                    "<|vision_start|><|image_pad|><|vision_end|>Please find \"grab something to cut "
                                    "with\" with bboxs and points.")
    assert result.prompt.endswith("</answer><|im_end|>\n<|im_start|>assistant\n")
    pad = reasoner.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert result.input_ids.count(pad) == 900
    assert {"preprocess", "generate", "parse", "sam_encoder", "decoder", "total"} <= set(result.timings_ms)


def test_the_public_decoding_settings_reach_generate(reasoner, monkeypatch):
    calls = force_generation(reasoner, monkeypatch, ANSWER)
    reasoner.segment(random_frame(H, W), "the knife")
    kwargs = calls[-1]
    assert kwargs["do_sample"] is False and kwargs["use_cache"] is True and kwargs["max_new_tokens"] == 2048
    assert kwargs["pixel_values"].shape == (3600, 1176) and kwargs["image_grid_thw"].tolist() == [[1, 60, 60]]
    reasoner.segment(random_frame(H, W), "the knife", max_new_tokens=100)
    assert calls[-1]["max_new_tokens"] == 100


def test_forced_answer_gives_one_mask_per_object_through_sam2(reasoner, monkeypatch):
    force_generation(reasoner, monkeypatch, ANSWER)
    frame = random_frame(H, W, seed=2)
    result = reasoner.segment(frame, "the knife", return_logits=True)
    assert result.masks.shape == (2, H, W) and result.masks.dtype == bool
    assert result.logits is not None and result.logits.shape == (2, H, W) and result.logits.dtype == np.float32
    assert np.array_equal(result.masks, result.logits > 0)
    assert [p[0].box for p in result.prompts] == BOXES and [p[0].points for p in result.prompts] == [(pt,) for pt
                                                                                                       in POINTS]
    assert result.text.startswith("<answer>[{") and "<think>" not in result.text
    assert result.reasoning.think == "A knife has a blade; the mug cannot cut." and result.reasoning.status == "ok"
    assert all(isinstance(i.score, float) for i in result.instances)
    d = assert_result_schema(result.to_dict())
    assert d["masks"][0]["prompts"] == [{"box": list(BOXES[0]), "points": [list(POINTS[0])]}]
    assert d["reasoning"]["style"] == "vision_reasoner"
    back = SegmentationResult.from_dict(d)
    assert back.prompts == result.prompts and back.reasoning == result.reasoning
    assert np.array_equal(back.masks, result.masks)


def test_sam2_is_prompted_with_each_box_and_point_and_keeps_its_best_mask(reasoner, monkeypatch):
    """The prompts SAM 2's prompt encoder receives, and the masks, equal transformers' own SAM 2 pipeline
    (processor on the frame, full forward, best of three by predicted IoU, post-processed to the frame)."""
    force_generation(reasoner, monkeypatch, ANSWER)
    seen = []
    encoder = reasoner.sam.prompt_encoder
    original = encoder.forward

    def spy(*args, **kwargs):
        seen.append({k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder, "forward", spy)
    frame = random_frame(H, W, seed=3)
    result = reasoner.segment(frame, "the knife")
    size = reasoner.sam_processor.image_processor.size["height"]
    assert len(seen) == 2
    for k, call in enumerate(seen):
        x1, y1, x2, y2 = BOXES[k]
        want = torch.tensor([x1 * size / W, y1 * size / H, x2 * size / W, y2 * size / H])
        assert torch.allclose(call["input_boxes"].reshape(4), want, atol=1e-4)
        want_pt = torch.tensor([POINTS[k][0] * size / W, POINTS[k][1] * size / H])
        assert torch.allclose(call["input_points"].reshape(2), want_pt, atol=1e-4)
        assert call["input_labels"].reshape(-1).tolist() == [1]
    monkeypatch.setattr(encoder, "forward", original)
    sam, proc = reasoner.sam, reasoner.sam_processor
    with torch.inference_mode():
        for k in range(2):
            inputs = proc(images=frame, input_boxes=[[list(BOXES[k])]], input_points=[[[list(POINTS[k])]]],
                          input_labels=[[[1]]], return_tensors="pt")
            out = sam(**inputs, multimask_output=True)
            best = int(out.iou_scores[0, 0].argmax())
            mask = proc.post_process_masks(out.pred_masks, inputs["original_sizes"])[0][0, best].numpy()
            assert np.array_equal(result.masks[k], mask)
            assert result.instances[k].score == pytest.approx(float(out.iou_scores[0, 0, best]), abs=1e-5)


def test_union_is_the_public_single_mask(checkpoints, reasoner, monkeypatch):
    force_generation(reasoner, monkeypatch, ANSWER)
    frame = random_frame(H, W, seed=4)
    per_object = reasoner.segment(frame, "the knife")
    union = ReasonerSegmenter(reasoner.model, reasoner.processor, reasoner.sam, reasoner.sam_processor, union=True)
    merged = union.segment(frame, "the knife")
    assert merged.masks.shape == (1, H, W)
    assert np.array_equal(merged.masks[0], per_object.masks.any(axis=0))
    assert [p.box for p in merged.prompts[0]] == BOXES
    assert merged.instances[0].score == pytest.approx(max(i.score for i in per_object.instances))


@pytest.mark.parametrize("answer, status, sentence", [
    ("<think>No hammer here.</think><answer>[]</answer>", "empty", "Nothing in this frame matches"),
    ("<think>hmm</think><answer>the hammer</answer>", "malformed", "could not be read (malformed)"),
])
def test_nothing_found_is_a_clear_no_target(reasoner, monkeypatch, answer, status, sentence):
    force_generation(reasoner, monkeypatch, answer)
    result = reasoner.segment(random_frame(H, W), "the hammer")
    assert result.empty and result.masks.shape == (0, H, W) and sentence in result.text
    assert result.reasoning.status == status and result.timings_ms["sam_encoder"] == 0.0
    assert_result_schema(result.to_dict())


def test_answer_option_replays_an_output_without_generating(reasoner, monkeypatch):
    def fail(**kwargs):
        raise AssertionError("generate must not run")

    monkeypatch.setattr(reasoner.model, "generate", fail)
    result = reasoner.segment(random_frame(H, W), "the knife", answer=ANSWER)
    assert len(result) == 2 and result.output_ids == [] and result.timings_ms["generate"] == 0.0


def test_max_masks_caps_the_objects(checkpoints, monkeypatch):
    folder, sam = checkpoints
    capped = open_backend(str(folder), sam_model=str(sam), device="cpu", max_masks=1)
    result = capped.segment(random_frame(H, W), "the knife", answer=ANSWER)
    assert len(result) == 1 and result.prompts[0][0].box == BOXES[0]
    assert "1 of 2 objects dropped: at most 1 masks" in result.reasoning.notes[-1]


def test_stop_after_answer(reasoner, checkpoints, monkeypatch):
    """Ours: generate gets the stop string with the tokenizer, and that stops right after the answer's end on
    this tokenizer's ids; public: no stop string (EOS only)."""
    from transformers import StopStringCriteria

    calls = force_generation(reasoner, monkeypatch, ANSWER)
    reasoner.segment(random_frame(H, W), "the knife")
    assert calls[-1]["stop_strings"] == [ANSWER_END] and calls[-1]["tokenizer"] is reasoner.processor.tokenizer
    tok = reasoner.processor.tokenizer
    stop = StopStringCriteria(tok, [ANSWER_END])
    open_ids = tok("<|im_start|>assistant\n<think>x</think><answer>[]", add_special_tokens=False)["input_ids"]
    closed = open_ids + tok("</answer>", add_special_tokens=False)["input_ids"]
    assert stop(torch.tensor([open_ids]), None).tolist() == [False]
    assert stop(torch.tensor([closed]), None).tolist() == [True]
    folder, sam = checkpoints
    public = open_backend(str(folder), sam_model=str(sam), device="cpu", reasoner_behaviour="public")
    calls = force_generation(public, monkeypatch, ANSWER)
    public.segment(random_frame(H, W), "the knife")
    assert "stop_strings" not in calls[-1]


def test_bf16_precision(checkpoints, monkeypatch):
    folder, sam = checkpoints
    backend = open_backend(str(folder), sam_model=str(sam), device="cpu", dtype="bf16")
    assert backend.model.dtype == torch.bfloat16 and next(backend.sam.parameters()).dtype == torch.bfloat16
    result = backend.segment(random_frame(H, W), "the knife", answer=ANSWER, return_logits=True)
    assert result.masks.shape == (2, H, W) and result.logits.dtype == np.float32


def test_8bit_with_torchao_on_the_cpu(checkpoints):
    pytest.importorskip("torchao")
    folder, sam = checkpoints
    backend = open_backend(str(folder), sam_model=str(sam), device="cpu", quantization="8bit", quant_backend="torchao")
    assert backend.info()["quantization"] == "8bit" and backend.info()["quant_backend"] == "torchao"
    layer = backend.model.model.language_model.layers[0].mlp.up_proj
    assert "Int8" in type(layer.weight).__name__  # torchao's weight-only int8 tensor
    assert type(backend.model.lm_head.weight).__name__ == "Parameter"  # lm_head and the vision encoder stay
    result = backend.segment(random_frame(H, W), "the knife", max_new_tokens=2)
    assert result.image_size == (H, W)


def test_cli_segment_runs_the_reasoner(checkpoints, tmp_path, capsys):
    from lisa_agent.cli import main

    folder, sam = checkpoints
    Image.fromarray(random_frame(H, W, seed=5)).save(tmp_path / "frame.png")
    assert main(["segment", "--model", str(folder), "--sam-model", str(sam), "--device", "cpu", "--image",
                 str(tmp_path / "frame.png"), "--query", "the knife", "--max-new-tokens", "3", "--json"]) == 0
    out = assert_result_schema(json.loads(capsys.readouterr().out))
    assert out["image_size"] == [H, W] and out["frame_id"] == "frame.png" and "reasoning" in out


def test_a_stream_tracks_the_reasoners_masks_with_flow(reasoner):
    from lisa_agent.options import QueryOptions, TrackOptions
    from lisa_agent.tracking import StreamSegmenter

    stream = StreamSegmenter(reasoner, TrackOptions(tracker="flow", reason_every=3, reason_period_s=None),
                             query=QueryOptions(answer=ANSWER))
    stream.set_instruction("the knife")
    results = [stream.process(random_frame(H, W, seed=6)) for _ in range(3)]
    assert [r.track.source for r in results] == ["reasoned", "tracked", "tracked"]
    assert all(r.masks.shape == (2, H, W) for r in results)
    assert results[1].reasoning == results[0].reasoning and results[1].prompts is None
    stream.close()


def test_eval_command_runs_a_reasoner_on_a_reasonseg_split(checkpoints, tmp_path, monkeypatch, capsys):
    """``lisa-agent eval --model <reasoner>`` on the ReasonSeg folder layout: the reasoner answers the query as
    written (generated, raw prompt), the report is the same as for LISA."""
    from lisa_agent.cli import main
    from lisa_agent.data.queries import queries_for_scene
    from lisa_agent.data.reasonseg import iter_samples, write_sample
    from lisa_agent.data.tabletop import render_scene, split_seed

    for i in range(2):
        scene = render_scene(split_seed("val", i), size=(64, 80))
        write_sample(tmp_path / "val", f"s{i}", scene, queries_for_scene(scene), image_format="png", split="val")
    texts = {q.text for s in iter_samples(tmp_path / "val") for q in s.queries}
    asked = []
    original = ReasonerSegmenter.reason

    def reason(self, rgb, query, max_new_tokens, answer=None, timings=None):
        asked.append(query)
        return original(self, rgb, query, max_new_tokens, ANSWER, timings)  # generation only is replaced

    monkeypatch.setattr(ReasonerSegmenter, "reason", reason)
    folder, sam = checkpoints
    assert main(["eval", "--model", str(folder), "--sam-model", str(sam), "--device", "cpu", "--data", str(tmp_path),
                 "--split", "val", "--limit", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 3 and report["answer"] == "generated" and report["prompt"] == "raw"
    assert report["model"]["backend"] == "reasoner" and "reasoner writes its own answer" in report["note"]
    assert 0.0 <= report["gIoU"] <= 1.0 and len(asked) == 3 and set(asked) <= texts


def test_public_behaviour_from_the_engine_options(checkpoints, reasoner):
    """``reasoner_behaviour=public`` (``--reasoner-behaviour public``): the public union mask and parser."""
    folder, sam = checkpoints
    public = open_backend(str(folder), sam_model=str(sam), device="cpu", reasoner_behaviour="public")
    info = public.info()
    assert info["union"] and info["strict"] and not info["stop_at_answer"]
    frame = random_frame(H, W, seed=7)
    merged = public.segment(frame, "the knife", answer=ANSWER)
    ours = reasoner.segment(frame, "the knife", answer=ANSWER)
    assert merged.masks.shape == (1, H, W) and np.array_equal(merged.masks[0], ours.masks.any(axis=0))
    truncated = ANSWER[:120]  # the public extraction reads nothing from an unclosed answer; ours keeps the first
    assert public.segment(frame, "the knife", answer=truncated).empty
    assert len(reasoner.segment(frame, "the knife", answer=truncated)) == 1
    with pytest.raises(InvalidArgumentError, match="reasoner_behaviour"):
        EngineConfig(reasoner_behaviour="faithful")


def test_seg_zero_style_prompts_sam2_with_its_two_points(checkpoints, monkeypatch):
    folder, sam = checkpoints
    backend = open_backend(str(folder), sam_model=str(sam), device="cpu", template="seg_zero")
    assert backend.info()["style"] == "seg_zero" and backend.info()["max_new_tokens"] == 1024
    force_generation(backend, monkeypatch, '<think>the bottle</think><answer>{"bbox": [100,200,400,600], "points_1": '
                                '[200,300], "points_2": [300,500]}</answer>')
    seen = []
    original = backend.sam.prompt_encoder.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_labels"].reshape(-1).tolist())
        return original(*args, **kwargs)

    monkeypatch.setattr(backend.sam.prompt_encoder, "forward", spy)
    result = backend.segment(random_frame(H, W), "The unusual object.")
    assert "Please find 'the unusual object' with bbox and points." in result.prompt
    # Seg-Zero's mapping: round(int(v) * factor)
    assert result.prompts == [(result.prompts[0][0],)] and result.prompts[0][0].box == (31, 36, 124, 107)
    assert result.prompts[0][0].points == ((62, 54), (93, 89)) and seen == [[1, 1]]


def test_the_model_server_serves_a_reasoner(reasoner):
    """The ZeroMQ server and its client, unchanged: the reasoner's masks, reasoning and prompts cross the wire."""
    from lisa_agent.serving.client import LisaClient
    from lisa_agent.serving.server import LisaServer

    frame = random_frame(H, W, seed=8)
    local = reasoner.segment(frame, "the knife", answer=ANSWER)
    with LisaServer(reasoner, "tcp://127.0.0.1:*") as server:
        client = LisaClient(server.endpoint, timeout=60.0)
        try:
            remote = client.segment(frame, "the knife", answer=ANSWER, frame_id="cam")
            info = client.info()
        finally:
            client.close()
    assert np.array_equal(remote.masks, local.masks) and remote.frame_id == "cam"
    assert remote.prompts == local.prompts and remote.reasoning == local.reasoning
    assert info["backend"] == "reasoner" and info["style"] == "vision_reasoner"


def test_think_off_starts_the_answer_after_an_empty_think_block(checkpoints, monkeypatch):
    """``reasoner_think=off`` (ours, for latency): the assistant's turn opens with ``<think> </think>``."""
    folder, sam = checkpoints
    fast = open_backend(str(folder), sam_model=str(sam), device="cpu", reasoner_think="off")
    assert fast.info()["think"] is False
    calls = force_generation(fast, monkeypatch, '<answer>[{"bbox_2d": [100,200,400,600], "point_2d": [250,400]}]</answer>')
    result = fast.segment(random_frame(H, W), "the knife")
    assert result.prompt.endswith("<|im_start|>assistant\n<think> </think>")
    ids = calls[-1]["input_ids"][0].tolist()
    assert fast.processor.tokenizer.decode(ids).endswith("assistant\n<think> </think>")
    assert len(result) == 1 and result.reasoning.think == "" and result.reasoning.status == "ok"


def test_eval_video_runs_a_reasoner_with_the_flow_tracker(checkpoints, tmp_path, capsys):
    from lisa_agent.cli import main

    folder, sam = checkpoints
    assert main(["make-data", "--video", "--out", str(tmp_path), "--n", "1", "--frames", "6", "--size", "96x128",
                 "--split", "test"]) == 0
    capsys.readouterr()
    assert main(["eval-video", "--model", str(folder), "--sam-model", str(sam), "--device", "cpu", "--data",
                 str(tmp_path), "--tracker", "flow", "--reason-every", "3", "--max-new-tokens", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == 6 and 2 <= report["lisa_calls"] <= 6 and 0.0 <= report["mean_iou"] <= 1.0


def spy(backend: ReasonerSegmenter, monkeypatch, fail_compiled: bool = False) -> list:
    """Record the kwargs of the model's real ``generate`` (which still runs); with ``fail_compiled`` a compiled
    decoding (``disable_compile`` False) raises as a failed compile would (compiling needs CUDA: not here)."""
    real = backend.model.generate
    calls = []

    def generate(**kwargs):
        calls.append(kwargs)
        if fail_compiled and not kwargs.get("disable_compile", True):
            raise RuntimeError("compile failed: Dynamo could not trace this")
        return real(**kwargs)

    monkeypatch.setattr(backend.model, "generate", generate)
    return calls


def test_the_static_cache_generates_what_the_growing_cache_does(reasoner, monkeypatch):
    """The static-cache lever reaches transformers' generate and changes how, not what, the model writes (random
    weights: greedy decoding of 24 tokens, no EOS, compared token for token)."""
    calls = spy(reasoner, monkeypatch)
    eos = reasoner.model.generation_config.eos_token_id
    reasoner.model.generation_config.eos_token_id = None
    frame = random_frame(H, W)
    try:
        reasoner.set_optimizations(static_cache=False)
        growing = reasoner.segment(frame, "the knife", max_new_tokens=24)
        reasoner.set_optimizations(static_cache=True)
        static = reasoner.segment(frame, "the knife", max_new_tokens=24)
    finally:
        reasoner.set_optimizations(static_cache=False)
        reasoner.model.generation_config.eos_token_id = eos
    assert "cache_implementation" not in calls[0] and calls[1]["cache_implementation"] == "static"
    assert calls[0]["disable_compile"] is True and calls[1]["disable_compile"] is True  # no CUDA: never compiled
    assert len(static.output_ids) == 24 and static.output_ids == growing.output_ids
    assert reasoner.info()["static_cache"] is False and reasoner.cuda_graphs is False  # graphs only on CUDA


def test_a_failed_compiled_decoding_answers_eagerly_and_says_why(checkpoints, monkeypatch):
    """On CUDA the static cache lets transformers compile the decoding step (CUDA graphs); when that fails the
    query is still answered, eagerly, and the backend says why and stops trying. (The failure is simulated:
    compiling needs CUDA.)"""
    folder, sam = checkpoints
    backend = open_backend(str(folder), sam_model=str(sam), device="cpu")
    backend.static_cache = backend.cuda_graphs = True  # as loading sets them on CUDA
    calls = spy(backend, monkeypatch, fail_compiled=True)
    result = backend.segment(random_frame(H, W), "the knife", max_new_tokens=4)
    assert [c["disable_compile"] for c in calls] == [False, True]
    assert 1 <= len(result.output_ids) <= 4
    assert backend.cuda_graphs is False and "compile failed" in backend.info()["graphs_error"]
    backend.segment(random_frame(H, W), "the knife", max_new_tokens=4)
    assert calls[-1]["disable_compile"] is True and len(calls) == 3


def test_the_engine_options_choose_the_levers(checkpoints):
    """``static_cache`` / ``cuda_graphs`` auto: the static cache and compiled decoding on CUDA only (on the CPU the
    static cache measured no faster: docs/reasoner.md); off stays off."""
    folder, sam = checkpoints
    backend = open_backend(str(folder), sam_model=str(sam), device="cpu")
    assert (backend.static_cache, backend.cuda_graphs) == (False, False)
    backend.set_optimizations(static_cache=True, cuda_graphs=True)
    assert (backend.static_cache, backend.cuda_graphs) == (True, False)


# ---------------------------------------------------------------------------------------------- the bench
def test_bench_times_a_reasoners_prefill_generation_and_sam(capsys):
    """``bench --shape reasoner-tiny``: the three modes generate what they say (1 token, exactly --new-tokens
    whatever the random weights write, none with the forced one-object answer, which gives one mask), and the
    derived figures are in the report (their values are timings: not asserted)."""
    from lisa_agent.cli import main

    assert main(["bench", "--shape", "reasoner-tiny", "--runs", "1", "--warmup", "0", "--new-tokens", "5",
                 "--device", "cpu", "--image-size", "90x120", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    modes = report["modes"]
    assert report["shape"] == "reasoner-tiny" and report["image_hw"] == [90, 120]
    assert (modes["prefill"]["tokens"], modes["generate"]["tokens"], modes["sam"]["tokens"]) == (1, 5, 0)
    assert (modes["prefill"]["masks"], modes["generate"]["masks"], modes["sam"]["masks"]) == (0, 0, 1)
    assert modes["sam"]["stages_ms"]["generate"] == 0.0 and modes["sam"]["stages_ms"]["sam_encoder"] > 0
    assert {"decode_ms_per_token", "query_ms_estimate"} <= set(report)
    assert report["settings"]["static_cache"] is False and report["settings"]["style"] == "vision_reasoner"


def test_bench_compare_turns_the_static_cache_on_then_off_and_restores_the_reasoner(checkpoints):
    from lisa_agent.benchmarks.reasoner import compare_reasoner

    folder, sam = checkpoints
    backend = open_backend(str(folder), sam_model=str(sam), device="cpu")
    result = compare_reasoner(backend, rounds=1, runs=1, warmup=0, new_tokens=3, image_hw=(60, 80))
    assert [r["levers_off"] for r in result["runs"]] == [[], ["static_cache"]]
    assert [r["report"]["settings"]["static_cache"] for r in result["runs"]] == [True, False]
    # decode_ms_per_token's ratio too, unless noise made its baseline <= 0 (3 tokens, one run: timings not asserted)
    assert {"prefill", "generate", "sam"} <= set(result["ratios"]["static_cache (slower without it)"])
    assert backend.static_cache is False and backend.model.generation_config.eos_token_id is not None


def test_the_7b_reasoner_shape_is_qwen2_5_vl_7b_and_builds_small_on_the_cpu():
    """The bench's 7B table has Qwen2.5-VL-7B's 8,292,166,656 parameters (counted on the meta device); the same
    builder with small overrides gives a reasoner that runs the bench's modes."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Sam2Config

    from lisa_agent.benchmarks.reasoner import QWEN2_5_VL_7B, build_random_reasoner, run_reasoner_bench
    from lisa_agent.reasoner.tiny import make_tiny_sam2

    with torch.device("meta"):
        big = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN2_5_VL_7B))
    assert sum(p.numel() for p in big.parameters()) == 8_292_166_656
    import tempfile

    sam = Sam2Config.from_pretrained(make_tiny_sam2(tempfile.mkdtemp())).to_dict()
    small = build_random_reasoner(
        EngineConfig(model="random", device="cpu"),
        text={"vocab_size": 700, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1,
              "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}},
        vision={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                "fullatt_block_indexes": [0]},
        sam={k: sam[k] for k in ("vision_config", "prompt_encoder_config", "mask_decoder_config")},
        sam_image_size=128)
    assert small.model.config.vision_config.window_size == 112 and small.style.name == "vision_reasoner"
    report = run_reasoner_bench(small, runs=1, warmup=0, new_tokens=2, image_hw=(60, 80))
    assert report["modes"]["generate"]["tokens"] == 2 and report["modes"]["sam"]["masks"] == 1
    with pytest.raises(InvalidArgumentError, match="8-bit or 4-bit"):
        build_random_reasoner(EngineConfig(model="random", device="cpu", quantization="8bit"))


def test_bench_refuses_lisas_modes_and_the_7b_reasoner_on_the_cpu(capsys):
    from lisa_agent.cli import main

    assert main(["bench", "--shape", "reasoner-tiny", "--mode", "fast", "--device", "cpu"]) != 0
    assert "a reasoner's bench always times prefill, generate and sam" in capsys.readouterr().err
    assert main(["bench", "--shape", "reasoner-7b", "--device", "cpu"]) != 0
    assert "--shape reasoner-7b is meant for a GPU" in capsys.readouterr().err



# ---------------------------------------------------------------------------------------------- the sam tracker
def moved_scene(dx: int, dy: int):
    """A tabletop frame, the same frame moved by (dx, dy) px (edges replicated), and its first object's mask on
    both."""
    import cv2

    from lisa_agent.data.tabletop import render_scene

    scene = render_scene(11, (120, 160))
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(scene.image, shift, (160, 120), borderMode=cv2.BORDER_REPLICATE)
    mask = scene.objects[0].mask
    moved_mask = cv2.warpAffine(mask.astype(np.uint8), shift, (160, 120), flags=cv2.INTER_NEAREST) > 0
    return scene.image, moved, mask, moved_mask


def test_prompt_from_mask_is_the_grown_box_and_the_most_interior_point():
    from lisa_agent.tracking import prompt_from_mask

    mask = np.zeros((50, 80), bool)
    mask[10:30, 20:60] = True  # 40 x 20: grown by 4 and 2 px
    prompt = prompt_from_mask(mask, margin=0.1)
    assert prompt.box == (16, 8, 63, 31)
    x, y = prompt.points[0]
    assert 38 <= x <= 41 and 18 <= y <= 21  # the middle of the block
    assert prompt_from_mask(np.zeros((5, 5), bool)) is None
    assert prompt_from_mask(np.ones((5, 5), bool), margin=1.0).box == (0, 0, 4, 4)  # clipped into the frame


@pytest.mark.parametrize("accept", [True, False], ids=["sam2-mask", "flow-mask"])
def test_the_sam_tracker_prompts_sam2_where_flow_carried_the_mask(reasoner, accept, monkeypatch):
    """``tracker=sam`` with a reasoner: on a frame where the scene moved by (6, 4) px, SAM 2 is prompted with the
    box and point of the mask flow carried there (that is, of the moved object); its mask is kept when its score
    passes ``min_score`` (else flow's), and flow follows the kept mask. (The tiny SAM 2 has random weights, so
    which mask SAM 2 draws is not the point here: that it is asked about the right place, and what is kept.)"""
    from lisa_agent.frames import Frame
    from lisa_agent.result import SegmentationResult
    from lisa_agent.tracking import Sam2Tracker, make_tracker, prompt_from_mask

    first, moved, mask, moved_mask = moved_scene(6, 4)
    assert isinstance(make_tracker("sam", reasoner), Sam2Tracker)
    tracker = Sam2Tracker(reasoner, min_score=-1.0 if accept else 2.0)
    asked = []
    real = reasoner.masks_from_boxes
    monkeypatch.setattr(reasoner, "masks_from_boxes", lambda frame, prompts: asked.append(prompts) or real(frame, prompts))
    tracker.start(Frame(first), SegmentationResult.from_frame(Frame(first), mask[None], [1.0], text="", query="q",
                                                              mode="fast"))
    masks, conf = tracker.update(Frame(moved))
    expected = prompt_from_mask(moved_mask, tracker.margin)
    (prompt,) = asked[-1]
    assert all(abs(a - b) <= 1 for a, b in zip(prompt.box, expected.box, strict=True))
    assert moved_mask[prompt.points[0][1], prompt.points[0][0]]
    sam_masks, sam_scores = real(Frame(moved), [prompt])
    assert conf[0] == pytest.approx(float(np.clip(sam_scores[0], 0, 1)), abs=1e-6)
    if accept and sam_masks[0].any():
        assert (masks[0] == sam_masks[0]).all()
    else:
        inter, union = (masks[0] & moved_mask).sum(), (masks[0] | moved_mask).sum()
        assert inter / union > 0.9
    assert (tracker.flow._seeds[0] == masks[0]).all()  # flow follows what was kept


def test_a_stream_with_the_sam_tracker_runs_on_a_reasoner(reasoner):
    from lisa_agent.options import QueryOptions, TrackOptions
    from lisa_agent.tracking import StreamSegmenter

    first, moved, _, _ = moved_scene(3, 2)
    stream = StreamSegmenter(reasoner, TrackOptions(tracker="sam", reason_every=5, reason_period_s=None,
                                                          min_confidence=0.0),
                             query=QueryOptions(answer=ANSWER))
    stream.set_instruction("the knife")
    results = [stream.process(f) for f in (first, moved, moved)]
    assert [r.track.source for r in results] == ["reasoned", "tracked", "tracked"]
    assert all(r.masks.shape == (2, 120, 160) for r in results)
    stream.close()


def test_lisa_only_commands_refuse_a_reasoner_by_name(checkpoints, tmp_path, capsys):
    """finetune and calibrate-gate say that the checkpoint is a reasoner (not that a config field is missing)."""
    from lisa_agent.cli import main
    from lisa_agent.data.tabletop import render_scene

    folder, _ = checkpoints
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(render_scene(3, (64, 64)).image).save(data / "a.jpg")
    (data / "a.json").write_text(json.dumps({"text": ["the mug"], "is_sentence": False, "shapes": []}))
    assert main(["calibrate-gate", "--model", str(folder), "--data", str(data), "--device", "cpu"]) != 0
    assert "is a reasoner (Qwen2.5-VL + SAM 2): calibrate-gate calibrates LISA's presence head" in capsys.readouterr().err
    assert main(["finetune", "--model", str(folder), "--data", "synthetic", "--out", str(tmp_path / "o"),
                 "--steps", "1"]) != 0
    assert "is a reasoner (Qwen2.5-VL + SAM 2): finetune trains LISA" in capsys.readouterr().err
