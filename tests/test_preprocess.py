"""Preprocessing matches LISA's (CLIP processor, SAM letterbox) and masks come back aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import iou, random_frame

from lisa_agent.engine.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    clip_preprocess,
    sam_preprocess,
    sam_resized_size,
)


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


# ------------------------------------------------------------------------ on the device (preprocess="device")


def _scene(hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    from lisa_agent.data.tabletop import render_scene

    image = render_scene(2, size=(480, 640)).image
    return image if hw == (480, 640) else np.asarray(Image.fromarray(image).resize((hw[1], hw[0])))


@pytest.mark.parametrize("hw", [(480, 640), (1080, 1920), (640, 480), (123, 457)])
def test_device_preprocessing_is_within_one_grey_level_of_pil(hw):
    from lisa_agent.engine.preprocess import clip_preprocess_tensor, sam_preprocess_tensor

    frame = _scene(hw) if hw[0] >= 480 else random_frame(*hw, seed=5)
    on_device = torch.from_numpy(frame.copy()).permute(2, 0, 1)[None]
    for size in (1024, 512):
        ours, theirs = sam_preprocess_tensor(on_device, size), sam_preprocess(frame, size)
        assert (ours.resized_hw, ours.original_hw) == (theirs.resized_hw, theirs.original_hw)
        assert ours.pixels.shape == theirs.pixels.shape == (1, 3, size, size)
        nh, nw = ours.resized_hw
        assert torch.all(ours.pixels[..., nh:, :] == 0) and torch.all(ours.pixels[..., :, nw:] == 0)
        levels = (ours.pixels - theirs.pixels).abs() * 57.12  # grey levels (the smallest SAM std is 57.12)
        assert float(levels.max()) <= 1.0 + 1e-3
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    levels = (clip_preprocess_tensor(on_device, 224) - clip_preprocess(frame, 224)).abs() * std * 255
    off = float((levels > 1.0 + 1e-3).float().mean())
    if hw[0] >= 480:  # rendered scenes: like camera frames, smooth
        assert off <= 1e-3 and float(levels.max()) <= 5
    else:  # noise enlarged: bicubic overshoots, which PIL clips after each of its two passes and torch once
        assert off <= 0.02


def test_preprocess_option_auto_is_exact_on_the_cpu_and_device_is_reported(tiny_checkpoint):
    from lisa_agent import LisaSegmenter
    from lisa_agent.config import EngineConfig
    from lisa_agent.errors import InvalidArgumentError

    assert EngineConfig().preprocess == "auto"
    assert LisaSegmenter.from_pretrained(tiny_checkpoint).info()["device_preprocess"] is False
    exact = LisaSegmenter.from_pretrained(tiny_checkpoint, preprocess="exact")
    on_device = LisaSegmenter.from_pretrained(tiny_checkpoint, preprocess="device")
    assert on_device.info()["device_preprocess"] is True
    on_device.set_optimizations(static_cache=False, cuda_graphs=False, overlap=False)  # not named: kept
    assert on_device.info()["device_preprocess"] is True and on_device.info()["static_cache"] is False
    frame = random_frame(96, 128, seed=4)
    first = exact.segment(frame, "the mug", answer="Sure, [SEG] and [SEG].")
    second = on_device.segment(frame, "the mug", answer="Sure, [SEG] and [SEG].")
    np.testing.assert_allclose(second.seg_embeddings, first.seg_embeddings, atol=1e-3)  # CLIP's tokens agree
    assert float(np.mean(second.masks == first.masks)) >= 0.99
    # the sam tracker's path (SAM only) too
    masks, _ = on_device.masks_from_prompts(frame, first.seg_embeddings)
    assert masks.shape == (2, 96, 128) and float(np.mean(masks == first.masks)) >= 0.99
    with pytest.raises(InvalidArgumentError, match="preprocess must be one of auto, exact, device; got 'gpu'"):
        EngineConfig(preprocess="gpu")
