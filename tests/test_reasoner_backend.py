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
from helpers import assert_result_schema, random_frame
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


def force(backend: ReasonerSegmenter, monkeypatch, text: str) -> list:
    """Replace the model's generation (only) by ``text``'s tokens followed by EOS; returns the calls' kwargs."""
    tok = backend.processor.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    calls = []

    def generate(**kwargs):
        calls.append(kwargs)
        prompt = kwargs["input_ids"]
        return torch.cat([prompt, torch.tensor([ids], dtype=prompt.dtype)], dim=1)

    monkeypatch.setattr(backend.model, "generate", generate)
    return calls


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
    calls = force(reasoner, monkeypatch, ANSWER)
    reasoner.segment(random_frame(H, W), "the knife")
    kwargs = calls[-1]
    assert kwargs["do_sample"] is False and kwargs["use_cache"] is True and kwargs["max_new_tokens"] == 2048
    assert kwargs["pixel_values"].shape == (3600, 1176) and kwargs["image_grid_thw"].tolist() == [[1, 60, 60]]
    reasoner.segment(random_frame(H, W), "the knife", max_new_tokens=100)
    assert calls[-1]["max_new_tokens"] == 100


def test_forced_answer_gives_one_mask_per_object_through_sam2(reasoner, monkeypatch):
    force(reasoner, monkeypatch, ANSWER)
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
    force(reasoner, monkeypatch, ANSWER)
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
    force(reasoner, monkeypatch, ANSWER)
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
    force(reasoner, monkeypatch, answer)
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

    calls = force(reasoner, monkeypatch, ANSWER)
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
    calls = force(public, monkeypatch, ANSWER)
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

    with pytest.raises(InvalidArgumentError, match="sam tracker"):
        StreamSegmenter(reasoner, TrackOptions(tracker="sam"))
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
    force(backend, monkeypatch, '<think>the bottle</think><answer>{"bbox": [100,200,400,600], "points_1": '
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
    calls = force(fast, monkeypatch, '<answer>[{"bbox_2d": [100,200,400,600], "point_2d": [250,400]}]</answer>')
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
