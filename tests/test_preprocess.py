"""Preprocessing matches LISA's (CLIP processor, SAM letterbox) and masks come back aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import iou, random_frame

from lisa_agent.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, sam_preprocess, sam_resized_size


@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (300, 300), (123, 457)])
def test_clip_preprocess_equals_the_clip_image_processor(hw):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    frame = random_frame(*hw, seed=hw[0])
    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    theirs = torch.as_tensor(np.asarray(proc(images=frame, return_tensors="np")["pixel_values"]))
    ours = clip_preprocess(frame, 224)
    assert ours.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)


def test_sam_letterbox_sizes_normalization_and_padding():
    assert sam_resized_size(480, 640, 1024) == (768, 1024)
    assert sam_resized_size(640, 480, 1024) == (1024, 768)
    assert sam_resized_size(333, 500, 1024) == (682, 1024)  # int(333 * 2.048 + 0.5)
    frame = np.full((480, 640, 3), (123, 116, 103), dtype=np.uint8)
    frame[:, :, 0] = 200
    out = sam_preprocess(frame, 1024)
    assert out.resized_hw == (768, 1024) and out.original_hw == (480, 640)
    px = out.pixels[0]
    assert px.shape == (3, 1024, 1024)
    assert torch.all(px[:, 768:, :] == 0)  # zero padding at the bottom
    assert px[0, 10, 10].item() == pytest.approx((200 - 123.675) / 58.395, abs=1e-4)
    assert px[1, 10, 10].item() == pytest.approx((116 - 116.28) / 57.12, abs=1e-4)


@pytest.mark.parametrize("hw,box", [((480, 640), (120, 160, 360, 480)), ((640, 480), (160, 120, 480, 360)),
                                    ((480, 640), (0, 0, 240, 320))])
def test_postprocess_maps_the_letterbox_back_to_the_frame(tiny_segmenter, hw, box):
    """Positive logits over a known region of the SAM input land on the same region of the frame."""
    model = tiny_segmenter.model
    size = model.sam_spec.img_size
    low = 4 * model.sam_spec.embedding_size
    h, w = hw
    nh, nw = sam_resized_size(h, w, size)
    y0, x0, y1, x1 = box
    s = low / size * (nh / h)  # frame pixels -> low-res cells (same scale on both axes)
    logits = torch.full((1, 1, low, low), -10.0)
    logits[..., round(y0 * s): round(y1 * s), round(x0 * s): round(x1 * s)] = 10.0
    out = model.postprocess_masks(logits, (nh, nw), (h, w))
    assert out.shape == (1, h, w) and out.dtype == torch.float32
    expected = np.zeros((h, w), bool)
    expected[y0:y1, x0:x1] = True
    assert iou(out[0].numpy() > 0, expected) > 0.95


@pytest.mark.parametrize("hw", [(480, 640), (640, 480)])
def test_masks_have_the_frame_size(tiny_segmenter, hw):
    res = tiny_segmenter.segment(random_frame(*hw), "the red mug", return_logits=True)
    assert res.masks.shape == (1, *hw) and res.masks.dtype == bool
    assert res.logits.shape == (1, *hw) and res.logits.dtype == np.float32
    np.testing.assert_array_equal(res.masks, res.logits > 0)
    assert res.seg_embeddings.shape == (1, tiny_segmenter.model.sam_spec.prompt_embed_dim)
    assert res.image_size == hw
