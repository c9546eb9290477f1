"""What the LISA tools exchange with the calling language model: descriptions, argument schemas, answer text.

The one wording source of every tool door: the LangChain tools (:mod:`lisa_agent.integrations.langchain`)
and the MCP server (:mod:`lisa_agent.integrations.mcp`) take their tool descriptions (``*_DESCRIPTION``)
and argument descriptions (``*_HELP``) from here. The schemas' field descriptions tell the model what to
pass; :func:`describe_result` is the short text it reads back (the masks themselves travel in the tool's
artifact, or an MCP tool's structured content). Kept apart from the tools so the wording can be read and
tested on its own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from ..result import SegmentationResult

__all__ = [
    "EXPLAIN_DESCRIPTION",
    "EXPLAIN_IMAGE_HELP",
    "EXPLAIN_QUERY_HELP",
    "ExplainObjectsInput",
    "FRAME_SEQ_HELP",
    "IMAGE_HELP",
    "LOOK_DESCRIPTION",
    "MODE_HELP",
    "QUERY_HELP",
    "SEGMENT_DESCRIPTION",
    "SegmentObjectsInput",
    "TRACK_DESCRIPTION",
    "TRACK_INSTRUCTION_HELP",
    "TRACK_STOP_HELP",
    "describe_result",
    "given_image",
    "validation_message",
]

# ---------------------------------------------------------------------- tool descriptions
SEGMENT_DESCRIPTION = (
    "Locate objects in the robot's camera image (or a given image) from a natural-language "
    "description, including implicit ones such as 'something to cut with' or 'what I can drink "
    "from'. Returns how many objects match and, for each, its bounding box [x1, y1, x2, y2] in "
    "pixels, its share of the image, its centroid, a 3D point in the camera frame when depth is "
    "available, and the vision model's answer. Call it before acting on or talking about an "
    "object's position."
)
EXPLAIN_DESCRIPTION = (
    "Ask the vision model a question about the robot's camera image (or a given image) that needs "
    "reasoning, e.g. 'What here could I use to cut the rope, and why?'. Returns the model's answer in "
    "words and the bounding boxes of the objects it points at. Slower than segment_objects; use "
    "segment_objects when you only need where an object is."
)
LOOK_DESCRIPTION = (
    "See the robot's newest camera frame: returns it as an image, with its frame number (frame_seq) and "
    "stamp. Pass that frame_seq to segment_objects to ask about exactly this frame."
)
TRACK_DESCRIPTION = (
    "Keep finding one object on every camera frame: start with an instruction (as for segment_objects); "
    "a segment_objects call with the same instruction then answers at once with the masks tracked to the "
    "newest frame and their age. Call it with stop=true to end tracking."
)

# ---------------------------------------------------------------------- argument descriptions
QUERY_HELP = (
    "What to find, in natural language. Name the object ('the red mug') or describe it by "
    "use or property ('something to cut with', 'the item that holds liquid'). One request "
    "per call; the answer lists every object that matches."
)
IMAGE_HELP = (
    "Optional image to look at: a data URI (data:image/png;base64,...), or a local file path or "
    "http(s) URL where this tool allows them. Leave it out to use the newest camera frame."
)
MODE_HELP = (
    "'fast' (default): one quick pass that returns the masks. 'chat': the vision model "
    "writes its own answer first (slower); use it when its wording matters."
)
EXPLAIN_QUERY_HELP = (
    "A question or instruction about the scene that needs reasoning, e.g. 'What here could "
    "I use to cut the rope, and why?'. The answer explains and points at the objects."
)
EXPLAIN_IMAGE_HELP = (
    "Optional image: a data URI, or a local file path or http(s) URL where this tool allows them. "
    "Leave it out to use the newest camera frame."
)
FRAME_SEQ_HELP = (
    "Optional number of a recent camera frame (the frame_seq that look or an earlier answer gave) to look "
    "at instead of the newest one. Leave it out to use the newest camera frame."
)
TRACK_INSTRUCTION_HELP = ("What to keep finding, as for segment_objects. Leave it out when stopping, or to hear "
                          "what is being tracked.")
TRACK_STOP_HELP = "true: stop tracking (the instruction is then not needed)."


class SegmentObjectsInput(BaseModel):
    """Arguments the calling model passes to ``segment_objects``."""

    query: str = Field(description=QUERY_HELP)
    image: str | None = Field(default=None, description=IMAGE_HELP)
    mode: Literal["fast", "chat"] | None = Field(default=None, description=MODE_HELP)


class ExplainObjectsInput(BaseModel):
    """Arguments the calling model passes to ``explain_objects``."""

    query: str = Field(description=EXPLAIN_QUERY_HELP)
    image: str | None = Field(default=None, description=EXPLAIN_IMAGE_HELP)


def describe_result(result: SegmentationResult, *, source: str, note: str = "", explain: bool = False,
                    max_listed: int = 10) -> str:
    """The short text an LLM reads: how many objects and, for each, bbox, share, centroid, 3D target.

    Objects are numbered as the masks (``Object k`` is ``artifact["result"]["masks"][k - 1]``). Masks
    with no pixels (LISA emitted ``[SEG]`` but nothing was segmented) do not count as found.
    ``explain`` leads with the model's answer (the ``explain_objects`` wording; "LISA answered", or "The
    reasoner answered" for a reasoner's result); at most ``max_listed``
    objects are described, the rest are only counted. The frame's stamp and the result's
    ``depth_note`` (why 3D points are missing) are included; ``note`` adds the tool's own.
    """
    h, w = result.image_size
    found = [k for k, inst in enumerate(result.instances) if inst.area > 0]
    answer = result.text.strip()
    who = "LISA" if result.reasoning is None else "The reasoner"  # a reasoner's result carries its reasoning
    where = f"{source} ({w}x{h} px" + (f", stamp {result.stamp.seconds:.3f})" if result.stamp else ")")
    if explain:
        lines = [f"{who} answered: {answer!r}."]
        lines.append(f"It points at {len(found)} object{'s' if len(found) != 1 else ''} in {where}"
                     + ("." if found else "; no mask to report."))
    elif found:
        lines = [f"Found {len(found)} object{'s' if len(found) != 1 else ''} for \"{_short(result.query)}\" in "
                 f"{where}. {who} answered: {answer!r}."]
    else:
        lines = [f"No object matched \"{_short(result.query)}\" in {where}."]
        if answer:
            lines.append(f"{who} answered: {answer!r}.")
    empty = len(result.instances) - len(found)
    if empty:
        lines.append(f"{empty} of {'LISA' if result.reasoning is None else 'the reasoner'}'s {len(result.instances)} "
                     "mask(s) came out empty.")
    for k in found[:max_listed]:
        inst = result.instances[k]
        cx, cy = inst.centroid
        parts = [
            f"Object {k + 1}: bbox [x1, y1, x2, y2] = [{', '.join(str(int(v)) for v in inst.bbox)}] px",
            f"{_share(inst.area, h * w)} of the image",
            f"centroid (x={cx:.1f}, y={cy:.1f}) px",
            f"mask score {inst.score:.2f}",
        ]
        target = result.targets[k] if result.targets is not None else None
        if target is not None and target.point is not None:
            parts.append("3D point (x={:.3f}, y={:.3f}, z={:.3f}) m in the camera frame".format(*target.point))
        elif target is not None:
            parts.append(f"depth {target.depth_m:.3f} m")
        lines.append(", ".join(parts) + ".")
    if len(found) > max_listed:
        lines.append(f"{len(found) - max_listed} more object(s) are in the artifact only.")
    track = result.track
    if track is not None and track.source == "tracked":
        lines.append(f"The masks were tracked ({track.tracker}) from LISA's answer {track.age_frames} frame(s) / "
                     f"{track.age_s:.2f} s ago; confidence {', '.join(f'{c:.2f}' for c in track.confidence)}.")
    notes = [n for n in (note, result.depth_note) if n]
    if notes:
        lines.append("3D points unavailable or partial: " + "; ".join(notes) + ".")
    return "\n".join(lines)


def given_image(image: str | None) -> str | None:
    """The model's ``image`` argument, or None when it means "the camera" (left out, empty, or the words
    ``none``, ``null`` or ``camera``, which models write for an absent argument)."""
    if image is None or not image.strip() or image.strip().lower() in ("none", "null", "camera"):
        return None
    return image


def validation_message(error: ValidationError) -> str:
    """What the model reads when its arguments do not fit the schema, with a call that would."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'input'}: {e.get('msg')}"
                         for e in error.errors())
    return (f"Invalid arguments ({problems}). Call the tool with "
            '{"query": "<what to find, e.g. something to cut with>"} and optionally "image" '
            "(file path, http(s) URL or data URI).")


def _share(area: int, total: int) -> str:
    pct = 100.0 * area / max(total, 1)
    return f"{pct:.1f}%" if pct >= 1.0 else f"{pct:.2f}%"


def _short(text: str, limit: int = 200) -> str:
    """The query as echoed back to the model: at most ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
