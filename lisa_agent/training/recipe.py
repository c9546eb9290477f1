"""The recipe of the bundled ``tabletop-tiny`` model: its shape, tokenizer corpus and frame sizes."""

from __future__ import annotations

from ..engine.modeling.sam import SamSpec
from ..engine.tiny import BASE_CORPUS, TinyShape

#: ~3M parameters: LLaMA 192 x 2 layers, CLIP 112 px (64 patches), SAM input 256 with a 128-wide encoder.
TABLETOP_SHAPE = TinyShape(
    hidden=192, layers=2, heads=4, intermediate=512,
    clip_hidden=128, clip_layers=3, clip_heads=4, clip_image=112, clip_patch=14,
    sam=SamSpec(img_size=256, patch_size=16, embed_dim=128, depth=3, num_heads=4, window_size=8,
                global_attn_indexes=(2,), prompt_embed_dim=64, decoder_depth=2, decoder_mlp_dim=256,
                decoder_num_heads=8, iou_head_hidden_dim=64, mask_in_chans=16),
)

#: Frame sizes rendered for training (small for speed; the model sees them resized anyway).
TRAIN_SIZES = ((192, 256), (256, 192), (224, 224))


def tabletop_corpus(n_scenes: int = 400) -> list[str]:
    """Text to train the tokenizer on: LISA's templates plus the tabletop world's queries and answers."""
    import numpy as np

    from ..data.queries import queries_for_scene
    from ..data.reasonseg import lisa_eval_prompt
    from ..data.tabletop import render_scene, split_seed

    lines = list(BASE_CORPUS)
    for i in range(n_scenes):
        scene = render_scene(split_seed("train", 9_000_000 + i), size=(64, 64))
        for q in queries_for_scene(scene, np.random.default_rng(i)):
            lines += [q.text, lisa_eval_prompt(q.text, q.is_sentence), q.answer]
    return lines
