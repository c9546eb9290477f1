"""The loader reads the published layout and names every problem."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import random_frame

from lisa_agent import LisaSegmenter
from lisa_agent.engine.tiny import make_tiny_checkpoint
from lisa_agent.engine.weights import read_state_dict
from lisa_agent.errors import CheckpointError, ModelNotFoundError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_published_layout_files(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "added_tokens.json", "pytorch_model.bin.index.json",
            "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "vision_tower"} <= names
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["architectures"] == ["LISAForCausalLM"] and cfg["mm_use_im_start_end"] is True
    index = json.loads((tiny_checkpoint / "pytorch_model.bin.index.json").read_text())
    keys = set(index["weight_map"])
    assert "model.mm_projector.weight" in keys and "lm_head.weight" in keys
    assert "model.text_hidden_fcs.0.0.weight" in keys and "model.text_hidden_fcs.0.2.bias" in keys
    assert "model.visual_model.image_encoder.patch_embed.proj.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert not any(k.startswith("model.vision_tower") for k in keys)  # CLIP is not in LISA checkpoints
    assert len(set(index["weight_map"].values())) == 2


def test_every_weight_is_loaded_from_the_shards(tiny_checkpoint, tiny_segmenter):
    state = read_state_dict(tiny_checkpoint)
    ours = dict(tiny_segmenter.model.named_parameters())
    assert torch.equal(ours["sam.image_encoder.blocks.0.attn.rel_pos_h"],
                       state["model.visual_model.image_encoder.blocks.0.attn.rel_pos_h"])
    assert torch.equal(ours["text_hidden_fcs.0.2.weight"], state["model.text_hidden_fcs.0.2.weight"])
    assert torch.equal(ours["llm.lm_head.weight"], state["lm_head.weight"])


def _rewrite_shard(folder, edit):
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    shard = folder / "pytorch_model-00001-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    edit(sd, index)
    torch.save(sd, shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if v != "pytorch_model-00001-of-00002.bin"} | {k: shard.name for k in sd}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_missing_key_is_named(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ck")
    victim = {}

    def drop(sd, index):
        victim["key"] = next(k for k in sd if k.startswith("model.layers."))
        del sd[victim["key"]]

    _rewrite_shard(folder, drop)
    with pytest.raises(CheckpointError, match=r"missing keys.*" + victim["key"].replace(".", r"\.")):
        LisaSegmenter.from_pretrained(folder)


def test_misnamed_key_is_named(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ck")
    names = {}

    def rename(sd, index):
        key = next(k for k in sd if k.startswith("model."))
        names["old"], names["new"] = key, key.replace("model.", "model.encoder_typo.", 1)
        sd[names["new"]] = sd.pop(key)

    _rewrite_shard(folder, rename)
    with pytest.raises(CheckpointError) as err:
        LisaSegmenter.from_pretrained(folder)
    assert names["old"] in str(err.value) and names["new"] in str(err.value)


def test_index_listing_an_absent_shard_fails(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ck")
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        LisaSegmenter.from_pretrained(folder)


def test_safetensors_checkpoint_loads_the_same_model(tiny_checkpoint, tiny_segmenter, tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "st", seed=0, safetensors=True)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    seg = LisaSegmenter.from_pretrained(folder)
    frame = random_frame(40, 52)
    a = seg.segment(frame, "the red mug", return_logits=True)
    b = tiny_segmenter.segment(frame, "the red mug", return_logits=True)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-6)


def test_unknown_model_id_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="no-such-owner/no-such-lisa"):
        LisaSegmenter.from_pretrained("no-such-owner/no-such-lisa")
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor a Hub id"):
        LisaSegmenter.from_pretrained("not a model")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        LisaSegmenter.from_pretrained(tmp_path)


def test_vision_tower_override_and_missing_tower(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ck")
    tower = shutil.move(str(folder / "vision_tower"), str(tmp_path / "clip-elsewhere"))
    with pytest.raises(ModelNotFoundError, match="vision tower"):
        LisaSegmenter.from_pretrained(folder)
    seg = LisaSegmenter.from_pretrained(folder, vision_tower=tower)
    assert seg.clip_size == 56


def test_clip_tower_from_a_full_clip_checkpoint(tmp_path):
    """openai/clip-vit-large-patch14 is a full CLIPModel; the vision tower loads out of it."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from lisa_agent.engine.loading import load_vision_tower

    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=56, patch_size=14)
    tcfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=100)
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict()))
    full.save_pretrained(str(tmp_path / "clip-full"))
    tower = load_vision_tower(str(tmp_path / "clip-full"), None, torch.float32)
    w_full = full.vision_model.embeddings.patch_embedding.weight
    w_tower = dict(tower.named_parameters())
    match = [n for n, p in w_tower.items() if p.shape == w_full.shape and torch.equal(p, w_full)]
    assert match, "vision weights were not taken from the full CLIP checkpoint"


def test_sam_shape_inferred_from_weights(tiny_segmenter):
    spec = tiny_segmenter.model.sam_spec
    assert (spec.img_size, spec.embed_dim, spec.depth, spec.num_heads, spec.window_size) == (128, 32, 2, 2, 4)
    assert spec.global_attn_indexes == (1,) and spec.prompt_embed_dim == 32


def test_vit_h_spec_is_the_default_shape():
    from lisa_agent.engine.build import LisaConfig, build_model
    from lisa_agent.engine.modeling.lisa import to_published_key
    from lisa_agent.engine.modeling.sam import SAM_PRESETS, infer_sam_spec

    cfg = LisaConfig.from_dict({"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                                "intermediate_size": 128, "vocab_size": 100,
                                "vision_tower": "openai/clip-vit-large-patch14"})
    assert cfg.out_dim == 256 and cfg.mm_hidden_size == 1024 and cfg.conv_template == "llava_v1"
    model = build_model(cfg, SAM_PRESETS["vit_h"], meta=True)
    sd = model.state_dict()
    assert tuple(sd["sam.image_encoder.pos_embed"].shape) == (1, 64, 64, 1280)
    spec = infer_sam_spec(sd, prefix="sam.")
    assert spec == SAM_PRESETS["vit_h"]
    published = {to_published_key(k) for k in sd}
    assert "model.visual_model.mask_decoder.iou_token.weight" in published


def test_clip_tower_keys_in_a_checkpoint_are_skipped(tiny_checkpoint, tiny_segmenter, tmp_path):
    """Some LLaVA-style saves carry model.vision_tower.*; LISA loads CLIP from its own id and so do we."""
    folder = _copy(tiny_checkpoint, tmp_path / "ck")

    def add_tower(sd, index):
        sd["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(4)

    _rewrite_shard(folder, add_tower)
    seg = LisaSegmenter.from_pretrained(folder)
    frame = random_frame(30, 30)
    np.testing.assert_array_equal(seg.segment(frame, "x").masks, tiny_segmenter.segment(frame, "x").masks)


def test_released_checkpoints_default_to_llava_v1():
    from lisa_agent.engine.build import LisaConfig

    for name in ("xinlai/LISA-7B-v1", "xinlai/LISA-13B-llama2-v1"):
        cfg = LisaConfig.from_dict({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                    "vocab_size": 10, "vision_tower": "x/y", "_name_or_path": name})
        assert cfg.conv_template == "llava_v1"
