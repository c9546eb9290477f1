"""Prompts in, answers and masks out: the answering half of :class:`~lisa_agent.engine.segmenter.LisaSegmenter`.

:class:`AnsweringMixin` builds the prompt, runs the language model (teacher-forced for ``fast``, all queries of a
frame in one pass; greedy into the KV cache for ``chat``; LISA's own loop for ``reference``), reads the hidden
state of each ``[SEG]``, and decodes its mask with SAM's decoder on every mirrored view (the views' logits
averaged). It refuses what does not fit (the model's context, the masks' budget) before the model runs, and
declines through the presence gate: when every ``[SEG]`` of an answer scores below the gate, the masks are
dropped and the model words the refusal from the gate's decline prefix with ``[SEG]`` barred.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import mask_budget
from ..errors import InvalidArgumentError, InvalidQueryError, LimitExceededError
from ..result import SegmentationResult
from .acceleration import bucket
from .device import OnDevice, StageTimer
from .features import FrameFeatures, mirror
from .generation import decoder_pass, greedy_cached, greedy_reference
from .prompts import SEG_TOKEN, build_prompt

if TYPE_CHECKING:
    from .acceleration import GraphedStages, StaticDecoder
    from .prompts import Template
    from .tokenization import LisaTokenizer

#: generation limit for a declined ``fast`` query's refusal (chat modes use their own max_new_tokens)
DECLINE_MAX_TOKENS = 32


class AnsweringMixin(OnDevice):
    """The language side of the engine. Its class sets the attributes below: the tokenizer, template and special
    ids, the presence gate, the limits, the mirrored views, the lock, and the optimizations' decoder and stages."""

    tokenizer: LisaTokenizer
    template: Template
    use_im_start_end: bool
    seg_token_id: int
    eos_token_id: int | None
    presence_gate: dict[str, Any] | None
    max_masks: int
    max_mask_megapixels: float
    max_positions: int
    buckets: bool
    _views: tuple[tuple[bool, bool], ...]
    _lock: threading.RLock
    _decoder: StaticDecoder | None
    _stages: GraphedStages | None

    def _prompt(self, query: str, history: Sequence[tuple[str, str]] = (), answer: str = "") -> str:
        return build_prompt(self.template, query, history, self.use_im_start_end, answer)

    def _forced(self, feats: FrameFeatures, enc_ms: dict[str, float], cached: bool, queries: list[str],
                answers: list[str], return_logits: bool) -> list[SegmentationResult]:
        timer = StageTimer(self.device)
        prompts = [self._prompt(q) for q in queries]
        prompt_ids = [self.tokenizer.encode_prompt(p) for p in prompts]
        full_ids = [self.tokenizer.encode_prompt(self._prompt(q, answer=a)) for q, a in zip(queries, answers, strict=True)]
        budget = self._mask_budget(feats)
        for b, ids in enumerate(full_ids):  # refuse what does not fit before the model runs
            self._room(feats, queries[b], len(ids))
            n_seg = ids[len(prompt_ids[b]):].count(self.seg_token_id)
            if n_seg > budget:
                raise LimitExceededError(
                    f"the answer {answers[b][:80]!r} has {n_seg} [SEG]; at most {budget} masks per answer on a "
                    f"{feats.original_hw[0]}x{feats.original_hw[1]} frame with {len(self._views)} view(s) "
                    f"(max_masks={self.max_masks}, max_mask_megapixels={self.max_mask_megapixels:g})")
        longest = max(len(x) for x in full_ids)
        if self.buckets:  # a few fixed shapes: the padded length's bucket (image tokens included)
            n_image = feats.image_tokens.shape[1]
            longest = min(bucket(longest - 1 + n_image), self.max_positions) - n_image + 1
            longest = max(longest, max(len(x) for x in full_ids))
        # Right padding needs no attention mask: causal attention never looks at later (pad) positions.
        batch = torch.zeros(len(full_ids), longest, dtype=torch.long)
        for b, ids in enumerate(full_ids):
            batch[b, : len(ids)] = torch.tensor(ids)
        batch = batch.to(self.device)
        embeds, merged = self.model.embed_with_image(batch, feats.image_tokens)
        t_tok = timer.lap()
        if self._stages is not None:
            hidden = self._stages.llm_pass(embeds)
        else:
            hidden = decoder_pass(self.model.llm.model, embeds)
        t_llm = timer.lap()
        seg_rows, seg_cols, owners = [], [], []
        merged_pos = merged.tolist()  # one device->host copy, not one per [SEG]
        for b, ids in enumerate(full_ids):
            for j in range(len(prompt_ids[b]), len(ids)):  # [SEG] in the answer only, never in the query
                if ids[j] == self.seg_token_id:
                    seg_rows.append(b)
                    seg_cols.append(merged_pos[b][j] - 1)  # the position whose prediction is [SEG]
                    owners.append(b)
        seg_states = hidden[seg_rows, seg_cols] if seg_rows else hidden.new_zeros(0, hidden.shape[-1])
        logits, masks, scores, prompts_out, t_dec, t_post = self._masks(feats, seg_states, return_logits)
        results = []
        share = 1.0 / len(queries)
        for b, q in enumerate(queries):
            idx = [k for k, o in enumerate(owners) if o == b]
            timings = {**enc_ms, "tokenize": t_tok * share,
                       "llm": t_llm * share, "decoder": t_dec * share, "postprocess": t_post * share}
            output_ids, text = full_ids[b][len(prompt_ids[b]):], answers[b]
            if self._declines(scores[idx]):
                output_ids, text, timings["decline"] = self._decline(feats, q, (), DECLINE_MAX_TOKENS)
                idx = []
            results.append(self._result(feats, cached, q, "fast", prompts[b], prompt_ids[b], output_ids, text,
                                        None if logits is None else logits[idx], masks[idx], scores[idx],
                                        prompts_out[idx], timings))
        return results

    def _greedy(self, ids: torch.Tensor, feats: FrameFeatures, max_new_tokens: int, *, max_segs: int,
                banned: int | None = None) -> tuple[list[int], torch.Tensor]:
        """Greedy generation after ``ids`` (1, T): into the static cache when it is on, else the dynamic one."""
        if self._decoder is None:
            return greedy_cached(self.model, ids, feats.image_tokens, max_new_tokens, eos=self.eos_token_id,
                                 seg=self.seg_token_id, max_segs=max_segs, banned=banned)
        embeds, _ = self.model.embed_with_image(ids, feats.image_tokens)
        return self._decoder.generate(embeds, max_new_tokens, eos=self.eos_token_id, seg=self.seg_token_id,
                                      max_segs=max_segs, banned=banned)

    def _room(self, feats: FrameFeatures, query: str, n_ids: int, refuse: bool = True) -> int:
        """Positions left in the model's context after ``n_ids`` prompt ids with the image merged in;
        refuses (InvalidQueryError) a prompt that does not fit with room for one more token."""
        used = n_ids - 1 + feats.image_tokens.shape[1]  # the image placeholder becomes the image tokens
        room = self.max_positions - used
        if room < 1 and refuse:
            raise InvalidQueryError(
                f"the prompt is {used} tokens with the image's {feats.image_tokens.shape[1]}; this model reads at "
                f"most {self.max_positions} (its max_position_embeddings), answer included: shorten the query "
                f"(it is {len(query)} characters)")
        return room

    def _mask_budget(self, feats: FrameFeatures) -> int:
        """Masks one answer may have on this frame: ``max_masks``, and the ``max_mask_megapixels`` they cost
        (each is a full-frame float mask per mirrored view)."""
        return mask_budget(self.max_masks, self.max_mask_megapixels, len(self._views), *feats.original_hw)

    def _declines(self, scores: torch.Tensor) -> bool:
        """True when the presence gate is on and every one of an answer's (>= 1) [SEG] scores is below it."""
        return (self.presence_gate is not None and len(scores) > 0
                and bool((scores < self.presence_gate["threshold"]).all()))

    def _decline(self, feats: FrameFeatures, query: str, history: Sequence[tuple[str, str]],
                 max_new_tokens: int) -> tuple[list[int], str, float]:
        """The answer the model gives when it declines: greedy from the gate's decline prefix with
        ``[SEG]`` barred. Returns (answer ids, answer text, milliseconds)."""
        timer = StageTimer(self.device)
        prefix = self.presence_gate["decline_prefix"]  # type: ignore[index]
        open_ids = self.tokenizer.encode_prompt(self._prompt(query, history))
        closed = self._prompt(query, history, answer=prefix)
        ids = self.tokenizer.encode_prompt(closed[: closed.rindex(prefix) + len(prefix)])
        max_new_tokens = max(0, min(max_new_tokens, self._room(feats, query, len(ids), refuse=False)))
        generated, _ = self._greedy(torch.tensor([ids], device=self.device), feats, max_new_tokens, max_segs=0,
                                    banned=self.seg_token_id)
        if ids[: len(open_ids)] == open_ids:
            answer_ids = ids[len(open_ids):] + generated
            text = self.tokenizer.decode(answer_ids)
        else:  # the prefix merged with the prompt's last token: keep the prefix as text
            answer_ids = generated
            text = f"{prefix} {self.tokenizer.decode(generated)}"
        return answer_ids, clean_answer(text), timer.lap()

    def _masks(self, feats: FrameFeatures, seg_states: torch.Tensor, keep_logits: bool):  # noqa: ANN202
        """Decoder + postprocess. Returns (logits (n, H, W) float32 on the CPU or None, masks (n, H, W)
        bool, scores (n,), decoder prompts (n, D), decoder ms, postprocess ms); thresholded on the device
        so only booleans cross to the host unless logits are asked for."""
        if feats.sam_ready is not None:  # SAM's encoder ran on its own stream, overlapping the LLM
            torch.cuda.current_stream(self.device).wait_event(feats.sam_ready)
        timer = StageTimer(self.device)
        if len(seg_states) == 0:
            h, w = feats.original_hw
            empty = torch.zeros(0, h, w)
            return (empty if keep_logits else None, empty.bool(), torch.zeros(0),
                    torch.zeros(0, self.model.sam_spec.prompt_embed_dim), 0.0, 0.0)
        logits, iou, t_dec, t_post = None, None, 0.0, 0.0
        decode = self._stages.decode_masks if self._stages is not None else self.model.decode_masks
        for k, flip in enumerate(self._views):
            low_res, iou_k, prompts = decode(seg_states, feats.sam_embedding[k:k + 1])
            t_dec += timer.lap()
            view = mirror(self.model.postprocess_masks(low_res, feats.resized_hw, feats.original_hw), flip)
            logits = view if logits is None else logits + view
            iou = iou_k.float() if iou is None else iou + iou_k.float()
            t_post += timer.lap()
        assert logits is not None and iou is not None  # every view set has at least one view
        if len(self._views) > 1:  # mean of the views' logits (prompts are the same for every view)
            logits, iou = logits / len(self._views), iou / len(self._views)
        masks = (logits > 0).cpu()
        logits = logits.cpu() if keep_logits else None
        t_post += timer.lap()
        scores = iou[:, 0].float()
        if self.presence_gate is not None:
            scores = scores.sigmoid()  # the score head was trained as a presence logit
        return logits, masks, scores.cpu(), prompts.float().cpu(), t_dec, t_post

    def _result(self, feats: FrameFeatures, cached: bool, query: str, mode: str, prompt: str,
                prompt_ids: list[int], output_ids: list[int], text: str, logits: torch.Tensor | None,
                masks: torch.Tensor, scores: torch.Tensor, prompts: torch.Tensor,
                timings: dict[str, float]) -> SegmentationResult:
        timings["total"] = sum(v for k, v in timings.items() if k != "total")
        return SegmentationResult.from_frame(
            feats.frame, masks.numpy(), scores.tolist(), text=text, query=query, mode=mode, prompt=prompt,
            input_ids=list(prompt_ids), timings_ms=timings, cached=cached,
            logits=None if logits is None else logits.numpy().astype(np.float32),
            seg_embeddings=prompts.numpy().astype(np.float32),
            output_ids=[int(t) for t in output_ids])

    @torch.inference_mode()
    def _generate(self, feats: FrameFeatures, enc_ms: dict[str, float], cached: bool, query: str,
                  history: Sequence[tuple[str, str]], mode: str, max_new_tokens: int,
                  return_logits: bool) -> SegmentationResult:
        with self._lock, self._on_device():
            timer = StageTimer(self.device)
            prompt = self._prompt(query, history)
            prompt_ids = self.tokenizer.encode_prompt(prompt)
            room = self._room(feats, query, len(prompt_ids))
            max_new_tokens = min(max_new_tokens, room)  # the answer ends where the model's context does
            ids = torch.tensor([prompt_ids], device=self.device)
            t_tok = timer.lap()
            budget = self._mask_budget(feats)
            if mode == "chat":
                generated, seg_states = self._greedy(ids, feats, max_new_tokens, max_segs=budget)
            else:
                generated, seg_states = greedy_reference(self.model, ids, feats.clip_pixels, max_new_tokens,
                                                         eos=self.eos_token_id, seg=self.seg_token_id, max_segs=budget)
            t_llm = timer.lap()
            logits, masks, scores, prompts_out, t_dec, t_post = self._masks(feats, seg_states, return_logits)
            text = clean_answer(self.tokenizer.decode(generated))
            timings = {**enc_ms, "tokenize": t_tok, "llm": t_llm, "decoder": t_dec, "postprocess": t_post}
            if self._declines(scores):
                generated, text, timings["decline"] = self._decline(feats, query, history, max_new_tokens)
                keep = torch.zeros(len(scores), dtype=torch.bool)
                logits = None if logits is None else logits[keep]
                masks, scores, prompts_out = masks[keep], scores[keep], prompts_out[keep]
            return self._result(feats, cached, query, mode, prompt, prompt_ids, generated, text, logits, masks,
                                scores, prompts_out, timings)


def clean_answer(text: str) -> str:
    """Decoded answer text on one line, single-spaced, trimmed."""
    return text.replace("\n", "").replace("  ", " ").strip()


def check_presence_gate(gate: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate a presence gate ``{"threshold": float in (0, 1), "decline_prefix": str}`` (None: no gate)."""
    if gate is None:
        return None
    if not isinstance(gate, dict):
        raise InvalidArgumentError(f"presence_gate must be a dict, got {type(gate).__name__}")
    threshold = gate.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) < 1.0:
        raise InvalidArgumentError(f"presence threshold must be a number in (0, 1); got {threshold!r}")
    prefix = gate.get("decline_prefix", "Sorry,")
    if not isinstance(prefix, str) or not prefix.strip() or SEG_TOKEN in prefix:
        raise InvalidArgumentError(f"decline_prefix must be non-empty text without [SEG]; got {prefix!r}")
    return {"threshold": float(threshold), "decline_prefix": prefix.strip()}
