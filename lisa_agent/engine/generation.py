"""Greedy decoding loops of the engine: with a KV cache (``chat``) and as the public LISA code does it
(``reference``: no cache, CLIP and the whole sequence re-run for every token).

Both return the generated token ids and, for every generated ``[SEG]``, the LLM's final post-norm hidden
state at the position *before* it (the state whose prediction is ``[SEG]``): the mask decoder's prompts.
At most ``max_segs`` ``[SEG]`` are emitted: once reached, ``[SEG]`` is barred and the answer goes on
without more masks (the engine's per-answer mask budget).

Every pass through the LLaMA decoder stack goes through :func:`decoder_pass`, which hands the KV cache
over under the keyword the installed transformers takes (``past_key_values`` up to 5.23, ``cache`` from
5.24): a keyword a forward does not know is swallowed by its ``**kwargs`` and the model then decodes
without its cache, silently (transformers 5.17 answered "Sure, [SEG] mug mug mug ...").
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..errors import DependencyError
from .modeling.lisa import LisaModel


@functools.cache
def cache_keyword(forward: Callable[..., Any]) -> str:
    """The keyword under which the decoder ``forward`` (a transformers ``LlamaModel.forward``) takes its KV
    cache: ``cache`` (transformers >= 5.24) or ``past_key_values`` (before; deprecated from 5.24)."""
    params = inspect.signature(forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise DependencyError(f"{getattr(forward, '__qualname__', forward)} takes its KV cache under no keyword we "
                          f"know (cache, past_key_values): its parameters are {', '.join(params)}")


def decoder_pass(body: Any, inputs_embeds: torch.Tensor, cache: Any = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The LLaMA decoder stack ``body`` (``llm.model``) over ``inputs_embeds`` (B, T, H) -> final post-norm
    hidden states (B, T, H). With ``cache`` (a transformers ``Cache``), its keys and values are read and the
    new ones written into it in place; ``position_ids`` (1, T) default to the positions after the cache's."""
    kwargs: dict[str, Any] = {"inputs_embeds": inputs_embeds, "use_cache": cache is not None}
    if cache is not None:
        kwargs[cache_keyword(type(body).forward)] = cache
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return body(**kwargs).last_hidden_state


def _bar(scores: torch.Tensor, token: int | None) -> None:
    if token is not None:
        scores[..., token] = float("-inf")


def greedy_loop(llm: Any, last: torch.Tensor, step: Callable[[int, int], torch.Tensor], max_new_tokens: int, *,
                eos: int | None, seg: int, max_segs: int, banned: int | None = None) -> tuple[list[int], torch.Tensor]:
    """The greedy loop of every cached decoder (the dynamic cache here, the static one in
    :mod:`lisa_agent.engine.acceleration`): from ``last`` (1, H), the final hidden state after the prompt, pick
    each token (``banned`` barred; ``[SEG]`` barred once ``max_segs`` were emitted), stop at ``eos`` or
    ``max_new_tokens``, and feed each token with ``step(token, i)`` (the i-th generated token; returns the
    next (1, H) state). Returns (generated ids without EOS, (n_seg, H) hidden states of the ``[SEG]`` steps)."""
    generated: list[int] = []
    seg_states: list[torch.Tensor] = []
    for i in range(max_new_tokens):
        scores = llm.lm_head(last)
        _bar(scores, banned)
        if len(seg_states) >= max_segs:
            _bar(scores, seg)
        token = int(scores.argmax(dim=-1).item())
        if token == eos:
            break
        if token == seg:
            seg_states.append(last[0])
        generated.append(token)
        if len(generated) == max_new_tokens:
            break
        last = step(token, i)
    states = torch.stack(seg_states) if seg_states else last.new_zeros(0, last.shape[-1])
    return generated, states


def greedy_cached(model: LisaModel, ids: torch.Tensor, image_tokens: torch.Tensor, max_new_tokens: int, *,
                  eos: int | None, seg: int, max_segs: int, banned: int | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy generation with a KV cache after ``ids`` (1, T) with the image's ``image_tokens`` merged in.

    Returns (generated ids without EOS, (n_seg, H) hidden states of the ``[SEG]`` steps). ``banned``
    is barred at every step (the decline answer bars ``[SEG]``)."""
    from transformers import DynamicCache

    llm = model.llm
    embeds, _ = model.embed_with_image(ids, image_tokens)
    cache = DynamicCache(config=llm.config)  # ours, filled in place: no output field to read it back from
    last = decoder_pass(llm.model, embeds, cache)[:, -1]
    embed = llm.get_input_embeddings()

    def step(token: int, _: int) -> torch.Tensor:
        return decoder_pass(llm.model, embed(torch.tensor([[token]], device=ids.device)), cache)[:, -1]

    return greedy_loop(llm, last, step, max_new_tokens, eos=eos, seg=seg, max_segs=max_segs, banned=banned)


def greedy_reference(model: LisaModel, ids: torch.Tensor, clip_pixels: torch.Tensor, max_new_tokens: int, *,
                     eos: int | None, seg: int, max_segs: int) -> tuple[list[int], torch.Tensor]:
    """What the public LISA code does: no KV cache, CLIP and the full sequence re-run every step, then one
    more full pass for the ``[SEG]`` states. For parity tests and speed comparison only."""
    llm = model.llm
    generated: list[int] = []
    for _ in range(max_new_tokens):
        seq = torch.cat([ids, torch.tensor([generated], dtype=torch.long, device=ids.device)], dim=1)
        embeds, _ = model.embed_with_image(seq, model.encode_clip(clip_pixels))
        hidden = decoder_pass(llm.model, embeds)
        scores = llm.lm_head(hidden[:, -1])
        if generated.count(seg) >= max_segs:
            _bar(scores, seg)
        token = int(scores.argmax(dim=-1).item())
        if token == eos:
            break
        generated.append(token)
    # One full pass over prompt + answer; the state before each [SEG] is its embedding.
    seq = torch.cat([ids, torch.tensor([generated], dtype=torch.long, device=ids.device)], dim=1)
    embeds, merged = model.embed_with_image(seq, model.encode_clip(clip_pixels))
    hidden = decoder_pass(llm.model, embeds)[0]
    positions = [int(merged[0, j]) - 1 for j in range(ids.shape[1], seq.shape[1]) if int(seq[0, j]) == seg]
    return generated, hidden[positions] if positions else hidden.new_zeros(0, hidden.shape[-1])
