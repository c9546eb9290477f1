"""``ReasonerSegmenter``: a Qwen2.5-VL reasoner (VisionReasoner, Seg-Zero) writes boxes and points, SAM 2 draws
the masks; the same :class:`~lisa_agent.backend.SegmentBackend` protocol as the LISA engine.

One query (:meth:`ReasonerSegmenter.segment`):

1. the frame (HxWx3 uint8 RGB) is resized to 840 x 840 (PIL bilinear) and put before the instruction
   (:mod:`~lisa_agent.reasoner.templates`) in one user message; the checkpoint's chat template is applied;
2. greedy generation (``do_sample=False``, KV cache) up to the style's budget (2048 tokens for VisionReasoner,
   1024 for Seg-Zero-7B), stopping at EOS and (ours; off with ``stop_at_answer=False``) right after
   ``</answer>``;
3. the output is parsed (:func:`~lisa_agent.reasoner.parsing.parse_output`), boxes and points mapped back to
   the frame;
4. SAM 2 (transformers' ``Sam2Model``) encodes the frame once and is prompted per object with its box and
   positive points; of its three masks the one with the highest predicted IoU is kept.

What differs from the public code, each selectable: one mask per object (``union=True``: their union as one
mask, as the public code returns it); a tolerant parser (``strict=True``: the public extraction); coordinates
clipped into the frame (always); the stop after ``</answer>``. ``think=False`` (ours, for latency; the models were
not trained for it) opens the assistant's turn with an empty ``<think> </think>`` block, so the model goes
straight to its ``<answer>``.

Query options: ``answer`` (when given) replaces the model's output (no generation: replays and tests);
``max_new_tokens`` applies when it differs from :class:`~lisa_agent.options.QueryOptions`' default (32, a
budget for LISA's short answers), else the public budget; ``mode`` is recorded (the reasoner always generates);
``return_logits`` adds each mask's float32 SAM logits at the frame size.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..config import EngineConfig, mask_budget
from ..engine.device import StageTimer
from ..errors import InvalidArgumentError
from ..frames import Frame, as_frame, check_query
from ..options import QueryOptions
from ..result import MaskPrompt, ReasoningInfo, SegmentationResult
from .parsing import ParsedAnswer, ReasonerObject, parse_output
from .templates import RESIZE, STYLES, PromptStyle

log = logging.getLogger(__name__)

#: What opens the assistant's turn with ``think=False`` (ours): an empty reasoning block, in the template's form.
NO_THINK = "<think> </think>"
#: QueryOptions' default max_new_tokens: a reasoner uses its style's budget instead (see the module docstring).
DEFAULT_QUERY_TOKENS = QueryOptions().max_new_tokens


#: Where generation stops early (ours; ``stop_at_answer=False``: at EOS only, as published): transformers'
#: stop strings, matched on token ids without decoding text at every step.
ANSWER_END = "</answer>"


def nothing_found(query: str, parsed: ParsedAnswer) -> str:
    """The sentence a result carries when no object was read from the answer."""
    if parsed.status == "empty":
        return f"Nothing in this frame matches \"{query}\" (the model's answer lists no object)."
    return (f"Nothing was segmented for \"{query}\": the model's answer could not be read "
            f"({parsed.status.replace('_', ' ')}).")


class ReasonerSegmenter:
    """A reasoning segmenter: Qwen2.5-VL writes boxes and points, SAM 2 segments them. Thread-safe (one call at
    a time). Build with :func:`lisa_agent.reasoner.loading.load_reasoner` (or ``open_backend(model)``).

    Example::

        seg = open_backend("Ricky06662/VisionReasoner-7B", dtype="bf16", device="cuda")
        result = seg.segment(frame, "grab something to cut with")   # frame: HxWx3 uint8 RGB
        result.masks[0]             # HxW bool, the knife
        result.reasoning.think      # why
        result.prompts[0]           # (MaskPrompt(box=..., points=...),)
    """

    def __init__(self, model: Any, processor: Any, sam: Any, sam_processor: Any, *,
                 style: PromptStyle | str = "vision_reasoner", name: str = "", sam_name: str = "",
                 union: bool = False, strict: bool = False, stop_at_answer: bool = True, think: bool = True,
                 size: int = RESIZE,
                 max_masks: int = 16, max_mask_megapixels: float = 256.0, quantization: str | None = None,
                 quant_backend: str | None = None, config: EngineConfig | None = None,
                 static_cache: bool = False, cuda_graphs: bool = False):
        """
        Args:
            model: a ``Qwen2_5_VLForConditionalGeneration`` (eval mode, on its device).
            processor: its ``Qwen2_5_VLProcessor`` (chat template, tokenizer, image processor).
            sam, sam_processor: a transformers ``Sam2Model`` and its ``Sam2Processor``, on the model's device.
            style: the prompt style (:data:`~lisa_agent.reasoner.templates.STYLES`) or its name.
            name, sam_name: the checkpoints' names, for :meth:`info`.
            union: one mask for all objects (the public code's output) instead of one per object.
            strict: the public code's answer extraction instead of the tolerant parser.
            stop_at_answer: stop generating once ``</answer>`` is written (else at EOS only, as published).
            think: let the model reason (as published); False: its turn starts with :data:`NO_THINK`.
            size: the square side the frame is resized to (840 published).
            max_masks, max_mask_megapixels: per-answer mask limits (see ``EngineConfig``); extra objects dropped.
            quantization, quant_backend: what :meth:`info` reports.
            config: the options this backend was built from.
            static_cache, cuda_graphs: the generation levers (:meth:`set_optimizations`).
        """
        self.model = model
        self.processor = processor
        self.sam = sam
        self.sam_processor = sam_processor
        self.style = STYLES[style] if isinstance(style, str) else style
        self.name = name
        self.sam_name = sam_name
        self.union = bool(union)
        self.strict = bool(strict)
        self.stop_at_answer = bool(stop_at_answer)
        self.think = bool(think)
        self.size = int(size)
        self.max_masks = int(max_masks)
        self.max_mask_megapixels = float(max_mask_megapixels)
        self.quantization = quantization
        self.quant_backend = quant_backend if quantization else None
        self.config = config
        self._lock = threading.RLock()
        self.static_cache = False
        self.cuda_graphs = False
        #: why compiled decoding was turned off after it failed (None: it never failed)
        self.graphs_error: str | None = None
        self.set_optimizations(static_cache=static_cache, cuda_graphs=cuda_graphs)

    def set_optimizations(self, *, static_cache: bool | None = None, cuda_graphs: bool | None = None) -> None:
        """Switch the generation levers (None: unchanged). ``static_cache``: the KV cache is allocated once per
        generation at its full length (prompt + budget; transformers' ``StaticCache``) instead of growing each
        token. ``cuda_graphs`` (CUDA, with the static cache): transformers compiles the decoding step
        (``torch.compile``, mode ``reduce-overhead``: CUDA graphs; the first generation of each cache length
        compiles). Off, or on another device, generation never compiles."""
        with self._lock:
            if static_cache is not None:
                self.static_cache = bool(static_cache)
            if cuda_graphs is not None:
                self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"

    @property
    def device(self) -> torch.device:
        """The device of the reasoning model's weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The reasoning model's compute dtype."""
        return self.model.dtype

    def info(self) -> dict[str, Any]:
        """Model, precision and options, as the server's ``info`` op reports them."""
        return {
            "model": self.name, "backend": "reasoner", "style": self.style.name, "sam_model": self.sam_name,
            "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
            "quantization": self.quantization, "quant_backend": self.quant_backend, "image_size": self.size,
            "max_new_tokens": self.style.max_new_tokens, "union": self.union, "strict": self.strict,
            "stop_at_answer": self.stop_at_answer, "think": self.think, "max_masks": self.max_masks,
            "max_mask_megapixels": self.max_mask_megapixels, "modes": ["fast", "chat", "reference"],
            "static_cache": self.static_cache, "cuda_graphs": self.cuda_graphs, "graphs_error": self.graphs_error,
        }

    # ------------------------------------------------------------------ the query
    def segment(self, image: Frame | np.ndarray, query: str, options: QueryOptions | None = None, *,
                frame_id: str | None = None, mode: str | None = None, max_new_tokens: int | None = None,
                answer: str | None = None, return_logits: bool | None = None) -> SegmentationResult:
        """Answer ``query`` about ``image`` (a :class:`~lisa_agent.frames.Frame` or an HxWx3 uint8 RGB array):
        the model reasons and names boxes and points, SAM 2 segments each.

        Returns a :class:`~lisa_agent.result.SegmentationResult`: ``masks`` N x H x W bool (one per object,
        or one union mask), ``instances`` with SAM 2's predicted IoU as ``score``, ``text`` the answer without
        the think block (or a sentence saying nothing was found: then N = 0), ``reasoning`` the think text,
        the answer and its parse status, ``prompts`` per mask its box and points, ``timings_ms`` per stage
        (``preprocess``, ``generate``, ``parse``, ``sam_encoder``, ``decoder``, ``total``), ``logits`` N x H x W
        float32 with ``return_logits``.
        """
        opts = QueryOptions.of(options, mode=mode, max_new_tokens=max_new_tokens, answer=answer,
                               return_logits=return_logits)
        if not isinstance(image, (Frame, np.ndarray)):
            raise InvalidArgumentError(f"a reasoner takes a Frame or an HxWx3 uint8 array; got {type(image).__name__}")
        query = check_query(query)
        frame = as_frame(image, frame_id)
        budget = self.style.max_new_tokens if opts.max_new_tokens == DEFAULT_QUERY_TOKENS else opts.max_new_tokens
        with self._lock, torch.inference_mode():
            timings: dict[str, float] = {}
            output, prompt, input_ids, output_ids = self.reason(frame.rgb, query, budget, opts.answer, timings)
            timer = StageTimer(self.device)
            h, w = frame.size
            parsed = parse_output(output, h, w, style=self.style, size=self.size, strict=self.strict)
            keep = mask_budget(self.max_masks, self.max_mask_megapixels, 1, h, w)
            objects = list(parsed.objects)[:keep]
            timings["parse"] = timer.lap()
            masks, scores, logits = self.masks_for(frame.rgb, objects, timings)
        prompts = [tuple(MaskPrompt(o.box, o.points) for o in objects)] if self.union and objects else \
            [(MaskPrompt(o.box, o.points),) for o in objects]
        timings["total"] = sum(timings.values())
        notes = parsed.notes
        if len(parsed.objects) > keep:
            notes += (f"{len(parsed.objects) - keep} of {len(parsed.objects)} objects dropped: at most {keep} masks "
                      "per answer on this frame (max_masks, max_mask_megapixels)",)
        reasoning = ReasoningInfo(parsed.think, parsed.answer, parsed.status, notes, self.style.name)
        text = parsed.text if objects else nothing_found(query, parsed) if not parsed.objects else \
            f"Nothing was segmented for \"{query}\": {notes[-1]}."
        return SegmentationResult.from_frame(
            frame, masks, scores, text=text, query=query,
            mode=opts.mode, prompt=prompt, input_ids=input_ids, timings_ms=timings, output_ids=output_ids,
            logits=logits if opts.return_logits else None, reasoning=reasoning, prompts=prompts)

    def reason(self, rgb: np.ndarray, query: str, max_new_tokens: int, answer: str | None = None,
               timings: dict[str, float] | None = None) -> tuple[str, str, list[int], list[int]]:
        """The model's output for ``query`` about ``rgb`` (HxWx3 uint8): ``(text, prompt, prompt_ids,
        output_ids)``, special tokens skipped in ``text``. ``answer``, when given, is taken as the output (no
        generation). Adds ``preprocess`` and ``generate`` to ``timings`` (ms)."""
        from PIL import Image

        timings = {} if timings is None else timings
        timer = StageTimer(self.device)
        resized = Image.fromarray(np.ascontiguousarray(rgb)).resize((self.size, self.size), Image.Resampling.BILINEAR)
        messages = [{"role": "user", "content": [{"type": "image", "image": resized},
                                                 {"type": "text", "text": self.style.instruction(query)}]}]
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not self.think:
            prompt += NO_THINK
        inputs = self.processor(text=[prompt], images=[resized], padding=True, return_tensors="pt").to(self.device)
        prompt_ids = [int(t) for t in inputs["input_ids"][0]]
        timings["preprocess"] = timer.lap()
        if answer is not None:
            timings["generate"] = 0.0
            return answer, prompt, prompt_ids, []
        new = self.generate(inputs, max_new_tokens)
        text = self.processor.batch_decode([new], skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        timings["generate"] = timer.lap()
        return text, prompt, prompt_ids, [int(t) for t in new]

    def generate(self, inputs: Any, max_new_tokens: int) -> torch.Tensor:
        """The new token ids (1-D) of greedy generation from the processor's ``inputs`` (the public code's
        decoding: ``do_sample=False``, KV cache, the checkpoint's generation config otherwise; the levers of
        :meth:`set_optimizations` change how, not what, it computes)."""
        length = int(inputs["input_ids"].shape[1])
        extra: dict[str, Any] = ({"stop_strings": [ANSWER_END], "tokenizer": self.processor.tokenizer}
                                 if self.stop_at_answer else {})
        if self.static_cache:
            extra["cache_implementation"] = "static"
        compiled = self.cuda_graphs and self.static_cache
        try:
            out = self.model.generate(**inputs, use_cache=True, max_new_tokens=int(max_new_tokens), do_sample=False,
                                      disable_compile=not compiled, **extra)
        except Exception as exc:  # a compile / capture failure: answer eagerly, say why, never compile again
            if not compiled:
                raise
            self.cuda_graphs = False
            self.graphs_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("compiled decoding failed (%s); this reasoner now generates eagerly", self.graphs_error)
            out = self.model.generate(**inputs, use_cache=True, max_new_tokens=int(max_new_tokens), do_sample=False,
                                      disable_compile=True, **extra)
        return out[0, length:]

    # ------------------------------------------------------------------ SAM 2
    def masks_from_boxes(self, image: Frame | np.ndarray, prompts: Sequence[MaskPrompt]) -> tuple[np.ndarray, np.ndarray]:
        """SAM 2's masks on ``image`` for ``prompts`` (each a box and positive points in frame pixels), one per
        prompt whatever ``union`` says: what the ``sam`` tracker runs on every frame between reasoning steps
        (SAM 2's encoder on the frame, one prompted decode per box; no language model). Returns (N x H x W bool
        masks, N float32 scores: SAM 2's predicted IoU of each kept mask)."""
        frame = as_frame(image)
        h, w = frame.size
        if not prompts:
            return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
        with self._lock, torch.inference_mode():
            union, self.union = self.union, False
            try:
                masks, scores, _ = self.masks_for(frame.rgb, prompts)
            finally:
                self.union = union
        return masks, np.asarray(scores, np.float32)

    def masks_for(self, rgb: np.ndarray, objects: Sequence[ReasonerObject | MaskPrompt],
                  timings: dict[str, float] | None = None) -> tuple[np.ndarray, list[float], np.ndarray]:
        """SAM 2's masks for ``objects`` on ``rgb`` (HxWx3 uint8): ``(masks, scores, logits)`` with masks
        N x H x W bool, N scores (the kept mask's predicted IoU) and logits N x H x W float32; N is the number
        of objects, or 1 with ``union`` (the masks OR-ed, the best score, the logits' maximum). Each object's
        prompt is its box and its points (label 1); of SAM 2's three masks the best-scored one is kept. Adds
        ``sam_encoder`` and ``decoder`` to ``timings`` (ms; 0 without objects). ``objects`` need only a ``box`` and
        ``points`` (a :class:`~lisa_agent.result.MaskPrompt` will do)."""
        timings = {} if timings is None else timings
        h, w = rgb.shape[:2]
        if not objects:
            timings["sam_encoder"] = timings["decoder"] = 0.0
            return np.zeros((0, h, w), dtype=bool), [], np.zeros((0, h, w), dtype=np.float32)
        timer = StageTimer(self.device)
        sam_dtype = next(self.sam.parameters()).dtype
        encoded = self.sam_processor(images=rgb, return_tensors="pt")
        sizes = encoded["original_sizes"]
        embeddings = self.sam.get_image_embeddings(encoded["pixel_values"].to(self.device, sam_dtype))
        timings["sam_encoder"] = timer.lap()
        logits, scores = [], []
        for obj in objects:
            kwargs: dict[str, Any] = {"input_boxes": [[list(obj.box)]]}
            if obj.points:
                kwargs.update(input_points=[[[list(p) for p in obj.points]]], input_labels=[[[1] * len(obj.points)]])
            prompt = self.sam_processor(original_sizes=sizes, return_tensors="pt", **kwargs)
            out = self.sam(image_embeddings=embeddings, multimask_output=True,
                           **{k: v.to(self.device) if k == "input_labels" else v.to(self.device, sam_dtype)
                              for k, v in prompt.items() if k.startswith("input_")})
            iou = out.iou_scores[0, 0].float()
            best = int(torch.argmax(iou))
            full = self.sam_processor.post_process_masks(out.pred_masks[:, :, best:best + 1].float().cpu(), sizes,
                                                         binarize=False)[0]
            logits.append(full[0, 0].numpy().astype(np.float32))
            scores.append(float(iou[best]))
        stacked = np.stack(logits)
        if self.union:
            stacked = stacked.max(axis=0, keepdims=True)
            scores = [max(scores)]
        timings["decoder"] = timer.lap()
        return stacked > 0.0, scores, stacked


__all__ = ["ANSWER_END", "DEFAULT_QUERY_TOKENS", "NO_THINK", "ReasonerSegmenter", "nothing_found"]
