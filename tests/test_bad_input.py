"""Every bad input gets an error that names the problem."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_frame

from lisa_agent.errors import InvalidArgumentError, InvalidImageError, InvalidQueryError, QuantizationError


@pytest.mark.parametrize("image,message", [
    (np.zeros((40, 40), np.uint8), "grayscale"),
    (np.zeros((40, 40, 4), np.uint8), "RGBA"),
    (np.zeros((40, 40, 3), np.float32), "dtype float32"),
    (np.zeros((0, 40, 3), np.uint8), "empty"),
    (np.zeros((9000, 16, 3), np.uint8), "at most 8192"),
    (np.zeros((4, 40, 3), np.uint8), "at least 8"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_images(tiny_segmenter, image, message):
    with pytest.raises(InvalidImageError, match=message):
        tiny_segmenter.segment(image, "the mug")


@pytest.mark.parametrize("query", ["", "   \n", None, 42])
def test_bad_queries(tiny_segmenter, query):
    with pytest.raises(InvalidQueryError):
        tiny_segmenter.segment(random_frame(32, 32), query)


def test_bad_options(tiny_segmenter):
    frame = random_frame(32, 32)
    with pytest.raises(InvalidArgumentError, match="mode must be one of fast, chat, reference; got 'slow'"):
        tiny_segmenter.segment(frame, "the mug", mode="slow")
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        tiny_segmenter.segment(frame, "the mug", mode="chat", max_new_tokens=0)
    with pytest.raises(InvalidArgumentError, match="forced answer"):
        tiny_segmenter.segment(frame, "the mug", answer="  ")
    with pytest.raises(InvalidQueryError):
        tiny_segmenter.segment_batch(frame, [])


def test_bad_precision_arguments(tiny_checkpoint):
    from lisa_agent import LisaSegmenter

    with pytest.raises(InvalidArgumentError, match="unknown dtype 'fp8'"):
        LisaSegmenter.from_pretrained(tiny_checkpoint, dtype="fp8")
    with pytest.raises(InvalidArgumentError, match="unknown quantization"):
        LisaSegmenter.from_pretrained(tiny_checkpoint, quantization="3bit")
    with pytest.raises(QuantizationError, match="4bit weights with torchao need a CUDA device"):
        LisaSegmenter.from_pretrained(tiny_checkpoint, quantization="4bit", device="cpu")


@pytest.mark.parametrize("dtype,name", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_16bit_on_cpu_still_segments(tiny_checkpoint, tiny_segmenter, dtype, name):
    import torch

    from lisa_agent import LisaSegmenter

    seg = LisaSegmenter.from_pretrained(tiny_checkpoint, dtype=dtype)
    frame = random_frame(48, 64)
    res = seg.segment(frame, "the mug", return_logits=True)
    ref = tiny_segmenter.segment(frame, "the mug", return_logits=True)
    assert res.masks.shape == (1, 48, 64) and seg.info()["dtype"] == name
    assert np.abs(res.logits - ref.logits).max() < 0.05 * max(1.0, np.abs(ref.logits).max())
    # rotary frequencies are recomputed in float32 after the cast; the fp16 SAM neck runs in float32
    assert seg.model.llm.model.rotary_emb.inv_freq.dtype == torch.float32
    assert seg.model.sam.image_encoder.neck[0].weight.dtype == (torch.float32 if dtype == "fp16" else torch.bfloat16)
