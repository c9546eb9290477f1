"""Tiny random-weight reasoner checkpoints in the published layouts, for tests and CI (no Hub access needed).

:func:`make_tiny_reasoner` writes a Qwen2.5-VL checkpoint as ``Ricky06662/VisionReasoner-7B`` is laid out
(``config.json`` with ``model_type: qwen2_5_vl``, safetensors, ``generation_config.json``, a byte-level BPE
``tokenizer.json`` with Qwen's special tokens, the image processor's and the processor's configs and Qwen2.5-VL's
chat template) at a few tens of thousands of parameters; :func:`make_tiny_sam2` writes a transformers SAM 2
checkpoint (``model_type: sam2``, Hiera backbone) with a 128-pixel input. Random weights write nonsense: tests
force the answer text and check everything around it.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Qwen2's special tokens that the processor and the chat template use (ids 0-6 in the tiny tokenizer).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")

#: Qwen2.5-VL's chat template (its checkpoints' ``chat_template``), as published.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}<|im_start|>assistant\n{% endif %}"
)

CORPUS = (
    "Please find \"the knife\" with bboxs and points. Compare the difference between object(s) and find the most "
    "closely matched object(s). Output the thinking process in <think> </think> and final answer in <answer> "
    "</answer> tags. Output the bbox(es) and point(s) inside the interested object(s) in JSON format.",
    "<think> The knife has a sharp blade, it can cut. </think><answer>[{\"bbox_2d\": [10,100,200,210], "
    "\"point_2d\": [30,110]}, {\"bbox_2d\": [225,296,706,786], \"point_2d\": [302,410]}]</answer>",
    "You are a helpful assistant. system user assistant grab something to cut with the red mug 0123456789",
)


def tiny_tokenizer(vocab_size: int = 600):  # noqa: ANN201
    """A ``Qwen2TokenizerFast`` (byte-level BPE trained offline on :data:`CORPUS`) with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, padding_side="left")


#: The published Qwen2.5-VL image processor's pixel budget (``max_pixels``): an 840 x 840 square is kept whole.
PUBLISHED_MAX_PIXELS = 12845056


def qwen_config(tokenizer, text: dict, vision: dict):  # noqa: ANN001, ANN201
    """A ``Qwen2_5_VLConfig`` with ``text`` / ``vision`` fields and the token ids of ``tokenizer``'s special tokens
    (image, video, vision start / end, EOS ``<|im_end|>``, pad and BOS ``<|endoftext|>``)."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config={"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"], **text},
        vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def qwen_model(config):  # noqa: ANN001, ANN201
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` of ``config`` (eval mode) whose generation config ends
    at the config's EOS and pads with its pad token."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model


def qwen_processor(tokenizer, max_pixels: int = PUBLISHED_MAX_PIXELS):  # noqa: ANN001, ANN201
    """A ``Qwen2_5_VLProcessor``: Qwen2-VL's image processor (``min_pixels`` 3136, ``max_pixels``), ``tokenizer``
    and Qwen2.5-VL's chat template."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=max_pixels),
                               tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                               chat_template=QWEN2_5_VL_CHAT_TEMPLATE)


def write_reasoner(out_dir: str | Path, model, processor, style: str | None = None) -> Path:  # noqa: ANN001
    """Save ``model`` and ``processor`` to ``out_dir`` in the published layout; ``style`` (``vision_reasoner`` /
    ``seg_zero``), when given, is declared in ``config.json`` as ``lisa_agent.reasoner_template``. Returns it."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if style is not None:
        path = out / "config.json"
        data = json.loads(path.read_text())
        data["lisa_agent"] = {"reasoner_template": style}
        path.write_text(json.dumps(data, indent=2))
    return out


def make_tiny_reasoner(out_dir: str | Path, seed: int = 0, *, style: str | None = None) -> Path:
    """Write a random-weight tiny Qwen2.5-VL checkpoint (published layout) to ``out_dir``; returns it.
    ``style`` (``vision_reasoner`` / ``seg_zero``) is declared in ``config.json`` as
    ``lisa_agent.reasoner_template`` when given."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = qwen_config(
        tokenizer,
        text={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
              "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}},
        vision={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                "fullatt_block_indexes": [0]})
    return write_reasoner(out_dir, qwen_model(config), qwen_processor(tokenizer), style)


def tabletop_corpus() -> list[str]:
    """Texts the tabletop reasoner's tokenizer is trained on: Qwen's system prompt and roles, the VisionReasoner
    instruction around every noun phrase and sentence the tabletop world asks with, and answers in the trained
    form (``<think> ... </think><answer>[{"bbox_2d": [...], "point_2d": [...]}]</answer>``)."""
    from ..data.knowledge import AFFORDANCES, CATEGORIES, COLOURS
    from ..data.queries import _EXPLICIT_SENTENCES, _NP_SENTENCES
    from .templates import STYLES

    style = STYLES["vision_reasoner"]
    phrases = [f"the {c}" for c in CATEGORIES] + [f"the {k} {c}" for c in CATEGORIES for k in COLOURS]
    for aff in AFFORDANCES.values():
        phrases += list(aff.phrases) + [f"{p} that is {k}" for p in aff.phrases for k in COLOURS]
    queries = list(phrases)
    queries += [t.format(np=p) for t in _EXPLICIT_SENTENCES + _NP_SENTENCES for p in phrases[:40]]
    queries += [s for aff in AFFORDANCES.values() for s in aff.sentences]
    texts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", "assistant\n"]
    texts += [style.instruction(q) for q in queries]
    texts += [f"<think> The target is the {k} {c}. </think>" for c in CATEGORIES for k in COLOURS]
    texts += ['<answer>[{"bbox_2d": [10,100,200,210], "point_2d": [30,110]}]</answer>', "0123456789"]
    return texts


def tabletop_tokenizer(vocab_size: int = 1024):  # noqa: ANN201
    """A ``Qwen2TokenizerFast`` for the tabletop reasoner: byte-level BPE trained on :func:`tabletop_corpus`, with
    Qwen's special tokens (ids 0-6) and numbers split into single digits before BPE (as Qwen2's tokenizer does),
    so every coordinate digit is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tabletop_corpus() * 2, trainer=trainer)
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, padding_side="left")


#: The tabletop reasoner's shape (:func:`make_tabletop_reasoner`): a 4-layer, 256-wide language model with 8 heads
#: of 32 and a 2-block, 96-wide vision encoder with full attention. ``processor.max_pixels`` is the image processor's
#: pixel budget: 420 x 420 makes it halve the 840 x 840 square (30 x 30 patches, 15 x 15 = 225 image tokens of
#: 56 x 56 square pixels each) instead of keeping it (900 tokens, the published processor's budget); None keeps the
#: published budget.
#:
#: Rotary: base 1e5, so a head's 16 frequencies run from 1 to 2e-5 radians per position. transformers' M-RoPE gives
#: consecutive chunks of them (``mrope_section``) to the temporal, row and column positions in turn; the sections
#: [0, 1, 1] x 4 + [8] give the 8 fastest frequencies alternately to rows and columns (1, 0.24, 0.056, 0.013 and
#: 0.49, 0.12, 0.027, 0.0065: offsets of 0-30 tokens turn them by useful angles, so image tokens can find their
#: row and column) and the 8 slowest to the temporal position, nearly position-free over a few hundred tokens, so
#: a head can match content (the query's words, the target's image tokens) wherever it lies.
TABLETOP_SHAPE: dict[str, dict] = {
    "processor": {"max_pixels": 420 * 420},
    "text": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 8, "rope_theta": 1e5, "mrope_section": [0, 1, 1] * 4 + [8]},
    "vision": {"depth": 2, "hidden_size": 96, "intermediate_size": 192, "num_heads": 2,
               "fullatt_block_indexes": [0, 1]},
}


def make_tabletop_reasoner(out_dir: str | Path, seed: int = 0, shape: dict[str, dict] | None = None) -> Path:
    """Write an untrained Qwen2.5-VL checkpoint of the tabletop shape (:data:`TABLETOP_SHAPE`, or ``shape``) with
    :func:`tabletop_tokenizer`, in the published layout and declaring the ``vision_reasoner`` template, to
    ``out_dir``; returns it. ``lisa_agent.reasoner.train`` trains it."""
    shape = shape or TABLETOP_SHAPE
    text, vision = dict(shape["text"]), dict(shape["vision"])
    tokenizer = tabletop_tokenizer()
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "mrope_section": text.pop("mrope_section"), "rope_theta": text.pop("rope_theta")}
    config = qwen_config(tokenizer, text={"vocab_size": len(tokenizer), "max_position_embeddings": 4096,
                                          "rope_parameters": rope, **text},
                         vision={"out_hidden_size": text["hidden_size"], **vision})
    max_pixels = (shape.get("processor") or {}).get("max_pixels") or PUBLISHED_MAX_PIXELS
    return write_reasoner(out_dir, qwen_model(config), qwen_processor(tokenizer, max_pixels), "vision_reasoner")


def make_tiny_sam2(out_dir: str | Path, seed: int = 0, image_size: int = 128) -> Path:
    """Write a random-weight tiny transformers SAM 2 checkpoint (Hiera backbone, ``image_size`` px input, 32-wide
    prompt encoder and mask decoder) with its processor config to ``out_dir``; returns it."""
    from transformers import Sam2Config, Sam2ImageProcessor, Sam2Model, Sam2Processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    grid = image_size // 4
    config = Sam2Config(
        vision_config={
            "backbone_config": {"model_type": "sam2_hiera_det_model", "hidden_size": 8, "num_attention_heads": 1,
                                "image_size": [image_size, image_size], "blocks_per_stage": [1, 1, 2, 1],
                                "embed_dim_per_stage": [8, 16, 32, 64], "num_attention_heads_per_stage": [1, 1, 1, 1],
                                "window_size_per_stage": [4, 4, 4, 4], "global_attention_blocks": [3],
                                "window_positional_embedding_background_size": [2, 2]},
            "backbone_channel_list": [64, 32, 16, 8],
            "backbone_feature_sizes": [[grid, grid], [grid // 2, grid // 2], [grid // 4, grid // 4]],
            "fpn_hidden_size": 32},
        prompt_encoder_config={"hidden_size": 32, "image_size": image_size, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32})
    Sam2Model(config).eval().save_pretrained(out)
    Sam2Processor(image_processor=Sam2ImageProcessor(size={"height": image_size, "width": image_size})).save_pretrained(out)
    return out


__all__ = ["PUBLISHED_MAX_PIXELS", "QWEN2_5_VL_CHAT_TEMPLATE", "SPECIAL_TOKENS", "TABLETOP_SHAPE",
           "make_tabletop_reasoner", "make_tiny_reasoner", "make_tiny_sam2", "qwen_config", "qwen_model",
           "qwen_processor", "tabletop_corpus", "tabletop_tokenizer", "tiny_tokenizer", "write_reasoner"]
