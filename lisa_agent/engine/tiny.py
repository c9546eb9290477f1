"""Tiny LISA-shaped checkpoints in the published layout, for tests, CI and integration work.

``make_tiny_checkpoint(out_dir)`` writes a random-weight model (LLaMA, CLIP and SAM all tiny, about
a megabyte) exactly as the released checkpoints are laid out: ``config.json`` with LISA's fields,
``added_tokens.json``, LISA key names, a 2-shard ``.bin`` with its index (or safetensors), and the
CLIP vision tower in its own folder (``vision_tower/``, named relatively in ``config.json``). The
tokenizer is trained offline with ``tokenizers`` (BPE with a Metaspace pre-tokenizer, so every chunk
gets sentencepiece's ``▁`` prefix) and has ``<im_patch>``, ``<im_start>``, ``<im_end>``, ``[SEG]`` added
as in LISA-7B.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import VISION_TOWER_DIR, save_vision_tower, write_checkpoint
from .modeling.sam import SamSpec

ADDED_TOKENS = ("<im_patch>", "<im_start>", "<im_end>", "[SEG]")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

BASE_CORPUS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. USER: ASSISTANT:",
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language. [INST] [/INST] <<SYS>>",
    "Sure, it is. Sure, the segmentation result is. It is. Sorry, there is nothing like that in this image.",
    "What is the object in this image? Please output segmentation mask. Please segment the object.",
    "grab something to cut with. what could hold my coffee? I want to drive a nail. something I can eat.",
    "the red mug, the blue bottle, the yellow banana, the green apple, a knife, scissors, a ball, a book, a key,",
    "a pen, a hammer, a spoon, a cup, a plate, a box, on the table, left, right, top, bottom, and explain why.",
    "It has a sharp blade. It can hold liquid. It is used to write. It is a fruit. 0 1 2 3 4 5 6 7 8 9 ? ! , . : ; ' \"",
)


def train_tokenizer(corpus: Iterable[str] = BASE_CORPUS, vocab_size: int = 400):  # noqa: ANN201
    """A BPE ``tokenizers.Tokenizer`` with LLaMA's special tokens at ids 0-2 and Metaspace pre-tokenization."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()[]<>/-_+=*&%$#@ \n")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return tok


def add_lisa_tokens(tok) -> dict[str, int]:  # noqa: ANN001
    """Add LISA's tokens to a ``tokenizers.Tokenizer`` (as LISA-7B: ``<im_patch>``, ``<im_start>``,
    ``<im_end>``, ``[SEG]``); returns their ids."""
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in ADDED_TOKENS])
    return {t: tok.token_to_id(t) for t in ADDED_TOKENS}


def save_tokenizer(tok, out: Path) -> dict[str, int]:  # noqa: ANN001
    """Add LISA's tokens (:func:`add_lisa_tokens`) and save the tokenizer files of the published layout.
    Returns the added-token ids."""
    added = add_lisa_tokens(tok)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
         "add_eos_token": False, "model_max_length": 512, "padding_side": "right"}, indent=2))
    return added


@dataclass(frozen=True)
class TinyShape:
    """Dimensions of a tiny LISA (defaults: a few hundred thousand parameters, milliseconds per query)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    clip_hidden: int = 32
    clip_layers: int = 3
    clip_heads: int = 2
    clip_image: int = 56
    clip_patch: int = 14
    sam: SamSpec = SamSpec(img_size=128, patch_size=16, embed_dim=32, depth=2, num_heads=2, window_size=4,
                           global_attn_indexes=(1,), prompt_embed_dim=32, decoder_depth=2, decoder_mlp_dim=64,
                           decoder_num_heads=8, iou_head_hidden_dim=32, mask_in_chans=4)


def write_vision_tower(out: Path, shape: TinyShape, seed: int = 0) -> None:
    """A random ``CLIPVisionModel`` with its preprocessor config (shortest side / crop = image size)."""
    from transformers import CLIPVisionModel

    torch.manual_seed(seed + 1)
    cfg = clip_vision_config(shape.clip_image, shape.clip_patch, shape.clip_hidden, shape.clip_layers, shape.clip_heads)
    save_vision_tower(CLIPVisionModel(cfg), out, shape.clip_image)


def clip_vision_config(image: int, patch: int, width: int, layers: int, heads: int):  # noqa: ANN201
    """A small ``CLIPVisionConfig``: ``image`` px input in ``patch`` px patches, ``width`` wide (MLP 2x),
    ``layers`` deep, ``heads`` heads."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image, patch_size=patch, projection_dim=width)


def lisa_config_dict(vocab_size: int, shape: TinyShape, bos: int, eos: int, vision_tower: str = "vision_tower") -> dict:
    """config.json content: LLaMA fields + LISA's fields, as in the released checkpoints."""
    return {
        "architectures": ["LISAForCausalLM"], "model_type": "llava",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.heads, "hidden_act": "silu",
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "initializer_range": 0.02,
        "vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 0,
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": False,
        "mm_vision_tower": vision_tower, "vision_tower": vision_tower, "mm_hidden_size": shape.clip_hidden,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False, "out_dim": shape.sam.prompt_embed_dim, "train_mask_decoder": True,
        "sam_image_size": shape.sam.img_size,
    }


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, *, shape: TinyShape | None = None,
                         safetensors: bool = False, corpus: Iterable[str] | None = None,
                         vocab_size: int = 400) -> Path:
    """Write a random-weight tiny LISA checkpoint in the published layout to ``out_dir``; returns it."""
    from .build import LisaConfig, build_model
    from .weights import published_state_dict

    shape = shape or TinyShape()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(BASE_CORPUS if corpus is None else corpus, vocab_size=vocab_size)
    added = save_tokenizer(tok, out)
    vocab = max(added.values()) + 1
    cfg_dict = lisa_config_dict(vocab, shape, bos=tok.token_to_id("<s>"), eos=tok.token_to_id("</s>"))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg_dict["bos_token_id"], "eos_token_id": cfg_dict["eos_token_id"], "pad_token_id": 0}))
    torch.manual_seed(seed)
    model = build_model(LisaConfig.from_dict(cfg_dict), shape.sam, meta=False)
    _randomize_zero_inits(model, seed)
    write_checkpoint(out, cfg_dict, published_state_dict(model), safetensors=safetensors)
    write_vision_tower(out / VISION_TOWER_DIR, shape, seed)
    return out


def _randomize_zero_inits(model: torch.nn.Module, seed: int) -> None:
    """SAM zero-initialises its relative position tables; give them small random values so that a
    test can tell when they are not loaded."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
