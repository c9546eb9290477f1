"""What the public VisionReasoner and Seg-Zero code feeds Qwen2.5-VL and how it reads the answer back, as facts.

Two instruction styles exist (github dvlab-research/VisionReasoner ``vision_reasoner/models/
vision_reasoner_model.py``, github dvlab-research/Seg-Zero ``inference_scripts/`` and
``evaluation_scripts/``):

- ``vision_reasoner``: VisionReasoner-7B (and Seg-Zero's ``infer_multi_object.py`` /
  ``evaluation_visionreasoner.py``): a JSON *list* of objects, each ``{"bbox_2d": [x1, y1, x2, y2],
  "point_2d": [x, y]}``; coordinates mapped back with ``int(v * factor + 0.5)``; the query lower-cased and
  stripped of ``."?!`` at both ends; ``max_new_tokens=2048`` (VisionReasoner; Seg-Zero's scripts use 1024).
- ``seg_zero``: Seg-Zero-7B (``inference_scripts/infer.py``, ``evaluation_scripts/evaluation.py``): *one*
  object ``{"bbox": [...], "points_1": [x, y], "points_2": [x, y]}`` (two positive points); coordinates mapped
  back with ``round(int(v) * factor)``; the query lower-cased and stripped of ``.``; ``max_new_tokens=1024``.

Both resize the frame to a fixed 840 x 840 square (PIL bilinear, aspect ratio not kept), put it before the
instruction in one user message, apply the checkpoint's chat template with the generation prompt, and decode
greedily (``do_sample=False``, KV cache) until EOS. 840 is a multiple of Qwen2.5-VL's 28-pixel merge unit,
so the image processor keeps it as it is (60 x 60 patches, 900 image tokens after the 2 x 2 merge).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: The square every frame is resized to before the reasoning model sees it (pixels, both styles).
RESIZE = 840

#: VisionReasoner's instruction (``DETECTION_TEMPLATE``), byte for byte; ``{Question}`` and ``{Answer}`` are
#: filled by :meth:`PromptStyle.instruction`.
VISION_REASONER_TEMPLATE = (
    "Please find \"{Question}\" with bboxs and points."
    "Compare the difference between object(s) and find the most closely matched object(s)."
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "Output the bbox(es) and point(s) inside the interested object(s) in JSON format."
    "i.e., <think> thinking process here </think>"
    "<answer>{Answer}</answer>"
)
#: The example answer VisionReasoner puts into its template.
VISION_REASONER_EXAMPLE = (
    "[{\"bbox_2d\": [10,100,200,210], \"point_2d\": [30,110]}, "
    "{\"bbox_2d\": [225,296,706,786], \"point_2d\": [302,410]}]"
)

#: Seg-Zero-7B's instruction (``QUESTION_TEMPLATE`` of ``infer.py`` / ``evaluation.py``), byte for byte.
SEG_ZERO_TEMPLATE = (
    "Please find '{Question}' with bbox and points."
    "Compare the difference between objects and find the most closely matched one."
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "Output the one bbox and points of two largest inscribed circles inside the interested object in JSON format."
    "i.e., <think> thinking process here </think>"
    "<answer>{Answer}</answer>"
)
#: The example answer Seg-Zero-7B puts into its template (single quotes, as published).
SEG_ZERO_EXAMPLE = "{'bbox': [10,100,200,210], 'points_1': [30,110], 'points_2': [35,180]}"


def round_half_up(value: float, factor: float) -> int:
    """VisionReasoner's mapping of one model coordinate to the frame: ``int(value * factor + 0.5)``."""
    return int(value * factor + 0.5)


def round_int_then_scale(value: float, factor: float) -> int:
    """Seg-Zero-7B's mapping: ``round(int(value) * factor)`` (the model's number truncated first, then
    Python's round-half-to-even)."""
    return round(int(value) * factor)


@dataclass(frozen=True)
class PromptStyle:
    """One published way to prompt a reasoner and read its answer.

    Attributes:
        name: ``vision_reasoner`` or ``seg_zero``.
        template: the instruction with ``{Question}`` and ``{Answer}`` fields.
        example: the example answer put into ``{Answer}``.
        strip: characters stripped from both ends of the lower-cased query.
        max_new_tokens: the public code's generation budget.
        to_frame: maps one coordinate of the resized square to the frame: ``(value, factor) -> int``.
        multi_object: the answer is a list of objects (else a single object with two points).
    """

    name: str
    template: str
    example: str
    strip: str
    max_new_tokens: int
    to_frame: Callable[[float, float], int]
    multi_object: bool

    def instruction(self, query: str) -> str:
        """The text of the user message for ``query``, exactly as the public code formats it."""
        return self.template.format(Question=query.lower().strip(self.strip), Answer=self.example)


STYLES: dict[str, PromptStyle] = {
    "vision_reasoner": PromptStyle("vision_reasoner", VISION_REASONER_TEMPLATE, VISION_REASONER_EXAMPLE,
                                   ".\"?!", 2048, round_half_up, True),
    "seg_zero": PromptStyle("seg_zero", SEG_ZERO_TEMPLATE, SEG_ZERO_EXAMPLE, ".", 1024, round_int_then_scale, False),
}
#: Style names, as ``EngineConfig.template`` accepts them for a reasoner checkpoint.
STYLE_NAMES = tuple(STYLES)


def style_for(name: str | None, model: str = "") -> PromptStyle:
    """The style ``name`` names; None: guessed from the model's id or folder (``seg-zero`` / ``seg_zero`` /
    ``segzero`` in it: Seg-Zero-7B's single-object style; anything else: VisionReasoner's list style)."""
    if name is not None:
        if name not in STYLES:
            raise KeyError(f"unknown reasoner template {name!r}; known: {', '.join(STYLES)}")
        return STYLES[name]
    key = model.lower().replace("-", "_")
    return STYLES["seg_zero"] if "seg_zero" in key or "segzero" in key else STYLES["vision_reasoner"]


def scale_factors(height: int, width: int, size: int = RESIZE) -> tuple[float, float]:
    """``(x_factor, y_factor)``: frame pixels per pixel of the ``size`` x ``size`` square the model saw
    (``width / size``, ``height / size``)."""
    return width / size, height / size


def to_model(x: float, y: float, height: int, width: int, size: int = RESIZE) -> tuple[float, float]:
    """A frame pixel ``(x, y)`` in the coordinates of the resized square (the inverse of the mapping back, up
    to its rounding)."""
    fx, fy = scale_factors(height, width, size)
    return x / fx, y / fy


__all__ = ["RESIZE", "SEG_ZERO_EXAMPLE", "SEG_ZERO_TEMPLATE", "STYLES", "STYLE_NAMES", "VISION_REASONER_EXAMPLE",
           "VISION_REASONER_TEMPLATE", "PromptStyle", "round_half_up", "round_int_then_scale", "scale_factors",
           "style_for", "to_model"]
