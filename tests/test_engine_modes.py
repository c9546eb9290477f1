"""The three inference modes agree where they must, and [SEG] states come from the right position."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import iou, random_frame, teach_answer

from lisa_agent import LisaSegmenter

QUERY = "the red mug"
ANSWER = "Sure, [SEG]. It is [SEG]."


@pytest.fixture(scope="module")
def taught(tiny_checkpoint):
    """A fresh tiny segmenter whose LLM answers ANSWER (two [SEG]) to QUERY on FRAME."""
    seg = LisaSegmenter.from_pretrained(tiny_checkpoint)
    frame = random_frame(60, 80, seed=3)
    teach_answer(seg, frame, QUERY, ANSWER)
    return seg, frame


def _answer_ids(seg, answer: str) -> list[int]:
    full = seg.tokenizer.encode_prompt(seg._prompt(QUERY, answer=answer))
    prompt = seg.tokenizer.encode_prompt(seg._prompt(QUERY))
    return full[len(prompt):]


def test_chat_generates_the_taught_answer(taught):
    seg, frame = taught
    res = seg.segment(frame, QUERY, mode="chat", max_new_tokens=32)
    expected = _answer_ids(seg, ANSWER)[:-1]  # without </s>: generation stops there
    assert res.output_ids == expected
    assert res.text.count("[SEG]") == 2
    assert len(res.masks) == 2 and res.masks.shape[1:] == (60, 80)


def test_chat_with_kv_cache_equals_reference(taught):
    seg, frame = taught
    chat = seg.segment(frame, QUERY, mode="chat", max_new_tokens=32, return_logits=True)
    ref = seg.segment(frame, QUERY, mode="reference", max_new_tokens=32, return_logits=True)
    assert chat.output_ids == ref.output_ids
    assert chat.text == ref.text
    np.testing.assert_allclose(chat.seg_embeddings, ref.seg_embeddings, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(chat.logits, ref.logits, atol=1e-3, rtol=1e-3)
    for a, b in zip(chat.masks, ref.masks, strict=True):
        assert iou(a, b) >= 0.99


def test_fast_equals_chat_when_answers_match(taught):
    seg, frame = taught
    chat = seg.segment(frame, QUERY, mode="chat", max_new_tokens=32, return_logits=True)
    fast = seg.segment(frame, QUERY, mode="fast", answer=ANSWER, return_logits=True)
    assert fast.output_ids[:-1] == chat.output_ids  # forced answer ends with </s>
    np.testing.assert_allclose(fast.seg_embeddings, chat.seg_embeddings, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(fast.logits, chat.logits, atol=1e-3, rtol=1e-3)
    assert [i.score for i in fast.instances] == pytest.approx([i.score for i in chat.instances], abs=1e-4)


def _independent_states(seg, frame, answer):
    """Hidden states of the whole merged sequence by a separate route: the published model's
    forward with output_hidden_states, image tokens spliced in by plain concatenation."""
    from lisa_agent.engine.preprocess import clip_preprocess
    from lisa_agent.engine.prompts import IMAGE_TOKEN_INDEX

    model = seg.model
    ids = seg.tokenizer.encode_prompt(seg._prompt(QUERY, answer=answer))
    cut = ids.index(IMAGE_TOKEN_INDEX)
    emb = model.llm.get_input_embeddings()
    with torch.no_grad():
        img = model.mm_projector(model.vision.tower(clip_preprocess(frame, seg.clip_size), output_hidden_states=True)
                                 .hidden_states[-2][:, 1:])
        seq = torch.cat([emb(torch.tensor([ids[:cut]])), img, emb(torch.tensor([ids[cut + 1:]]))], dim=1)
        out = model.llm(inputs_embeds=seq, output_hidden_states=True)
    return ids, cut, img.shape[1], out.hidden_states[-1][0]


def test_seg_embedding_is_the_state_before_seg(taught):
    seg, frame = taught
    fast = seg.segment(frame, QUERY, mode="fast", answer=ANSWER, return_logits=True)
    ids, cut, n_img, states = _independent_states(seg, frame, ANSWER)
    seg_at = [j for j, t in enumerate(ids) if t == seg.seg_token_id]
    merged = [j - 1 + n_img for j in seg_at]  # positions of [SEG] in the merged sequence (after the image)
    fcs = seg.model.text_hidden_fcs[0]
    with torch.no_grad():
        before = fcs(states[[m - 1 for m in merged]]).numpy()
        at = fcs(states[merged]).numpy()
    np.testing.assert_allclose(fast.seg_embeddings, before, atol=1e-4, rtol=1e-4)
    # The off-by-one alternative gives clearly different embeddings and mask logits.
    assert np.abs(fast.seg_embeddings - at).max() > 1e-2
    with torch.no_grad():
        low, _, _ = seg.model.decode_masks(states[merged], seg.encode(frame).sam_embedding)
        wrong = seg.model.postprocess_masks(low, seg.encode(frame).resized_hw, (60, 80)).numpy()
    # (random tiny weights give small logits: compare with their own scale)
    assert np.abs(fast.logits - wrong).max() > 0.05 * np.abs(fast.logits).max()


def test_image_features_are_layer_minus_two_patches(tiny_segmenter):
    from lisa_agent.engine.preprocess import clip_preprocess

    frame = random_frame(50, 70, seed=1)
    px = clip_preprocess(frame, tiny_segmenter.clip_size)
    vision = tiny_segmenter.model.vision
    with torch.no_grad():
        ours = vision(px)
        ref = vision.tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(ours, ref)


def test_batch_equals_single_queries_and_encoders_run_once(tiny_segmenter, monkeypatch):
    seg = tiny_segmenter
    frame = random_frame(64, 48, seed=5)
    queries = ["the red mug", "grab something to cut with please", "what could hold my coffee?"]
    singles = [seg.segment(frame, q, return_logits=True) for q in queries]
    calls = {"sam": 0}
    original = seg.model.encode_sam

    def counting(px):
        calls["sam"] += 1
        return original(px)

    monkeypatch.setattr(seg.model, "encode_sam", counting)
    seg.clear_cache()
    batch = seg.segment_batch(frame, queries, return_logits=True)
    again = seg.segment(frame, queries[0], return_logits=True)
    assert calls["sam"] == 1  # one encoder run serves the batch and the later query
    for s, b in zip(singles, batch, strict=True):
        np.testing.assert_allclose(s.seg_embeddings, b.seg_embeddings, atol=1e-5)
        np.testing.assert_allclose(s.logits, b.logits, atol=1e-4)
        assert s.input_ids == b.input_ids
    np.testing.assert_allclose(again.logits, singles[0].logits, atol=1e-5)


def test_seg_typed_in_the_query_is_not_a_mask(tiny_segmenter):
    frame = random_frame(40, 40)
    res = tiny_segmenter.segment(frame, "find [SEG] and [SEG]", answer="Sure, [SEG].")
    assert len(res.masks) == 1


def test_no_seg_in_answer_gives_no_mask(tiny_segmenter):
    frame = random_frame(40, 60)
    res = tiny_segmenter.segment(frame, "a unicorn", answer="Sorry, there is no unicorn.")
    assert res.empty and res.masks.shape == (0, 40, 60)
    assert res.to_dict()["masks"] == []


def test_conversation_keeps_history(taught):
    seg, frame = taught
    conv = seg.start_conversation(frame)
    first = seg.chat(conv, QUERY, max_new_tokens=16)
    second = seg.chat(conv, "and now?", max_new_tokens=4)
    assert conv.history[0] == (QUERY, first.text)
    assert conv.history[1][0] == "and now?"
    assert f"{QUERY} ASSISTANT: {first.text}</s>USER: and now? ASSISTANT:" in second.prompt
    assert second.prompt.count("<image>") == 1


def test_sdpa_sam_attention_gives_the_same_masks(tiny_checkpoint, tiny_segmenter):
    seg = LisaSegmenter.from_pretrained(tiny_checkpoint, sam_attention="sdpa")
    assert type(seg.model.sam.image_encoder.blocks[0].attn).__name__ == "SamSdpaAttention"
    frame = random_frame(70, 50, seed=9)
    a = seg.segment(frame, "the red mug", return_logits=True)
    b = tiny_segmenter.segment(frame, "the red mug", return_logits=True)
    feats_a = seg.encode(frame).sam_embedding
    feats_b = tiny_segmenter.encode(frame).sam_embedding
    torch.testing.assert_close(feats_a, feats_b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
