"""What a caller asks, declared once: :class:`QueryOptions` (how one query is answered) and
:class:`TrackOptions` (how masks are carried between reasoning steps), and the machinery that every
declared option set shares with :class:`~lisa_agent.config.EngineConfig` (how a model is loaded).

Each set is plain data, validated at construction with errors that name the field. Each field carries an
:class:`Option`: its help text, its choices and its *text form* (what a command-line flag, a ROS
parameter, a launch argument or a form field carries). The doors are generated from these declarations:
:func:`add_arguments` adds one flag per field to a command, :func:`from_args` reads them back,
:func:`parameters` lists ROS parameters and launch arguments, :meth:`Declared.from_mapping` reads a JSON
object (the wire protocol's ``options``, the console's API, tool arguments). No door keeps defaults of
its own: where a door has a reason to start elsewhere it says so through ``defaults=`` and its help.

The defaults, chosen once (docs/vocabulary.md):

- ``QueryOptions()``: ``fast`` mode (one teacher-forced pass, LISA's own evaluation), at most 32 new tokens
  in ``chat``, the forced answer ``"Sure, [SEG]."``, no logits.
- ``TrackOptions()``: the ``flow`` tracker, LISA at least every 10 frames and every 2 s (stamps, else wall
  time), and again as soon as a mask's tracking confidence falls below 0.5.

Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

from .errors import InvalidArgumentError
from .frames import IMAGE_TOKEN

#: Answer modes: ``fast`` (teacher-forced answer, one pass), ``chat`` (greedy generation with a KV cache),
#: ``reference`` (the public code's way, for parity tests).
MODES = ("fast", "chat", "reference")
#: The modes robots, operators and agents are offered (``reference`` is for parity tests and benchmarks).
INTERACTIVE_MODES = ("fast", "chat")
#: Most tokens one ``chat`` answer may generate (a model server may allow fewer: its ``Limits``).
MAX_NEW_TOKENS = 4096
#: Longest forced answer (characters).
MAX_ANSWER_CHARS = 4000
#: Trackers: ``flow`` (optical flow), ``sam`` (the engine's SAM prompted again), ``none`` (the masks held).
TRACKERS = ("flow", "sam", "none")
#: Most frames between reasoning steps a stream may ask for.
MAX_REASON_EVERY = 100_000


@dataclass(frozen=True)
class Option:
    """How one field appears outside Python: help text, choices (text form) and the text codec."""

    help: str
    parse: Callable[[str], Any]  # text -> value; raises ValueError with a message naming the problem
    text: Callable[[Any], str] = str  # value -> text
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


def option(default: Any, spec: Option) -> Any:
    """A dataclass field with ``default`` and its :class:`Option`."""
    return field(default=default, metadata={"option": spec})


# ---------------------------------------------------------------------- text codecs
def parse_optional(text: str) -> str | None:
    """Text -> the text, or None when empty."""
    return text.strip() or None


def none_text(value: Any) -> str:
    """None -> ``""``, else the value as text."""
    return "" if value is None else str(value)


def parse_int(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise ValueError(f"expected a whole number; got {text!r}") from None


def parse_float(text: str) -> float:
    try:
        return float(str(text).strip())
    except (ValueError, OverflowError):
        raise ValueError(f"expected a number; got {text!r}") from None


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false; got {text!r}")


def parse_seconds_or_none(text: str) -> float | None:
    """``""``, ``none``, ``off`` or ``0`` -> None (no limit); else a number of seconds."""
    value = str(text).strip().lower()
    if value in ("", "none", "off", "false", "null"):
        return None
    return parse_float(value) or None


def is_int(value: Any) -> bool:
    """A whole number that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(choices)}; got {value!r:.80}")
    return value


D = TypeVar("D", bound="Declared")


class Declared:
    """What every declared option set (a frozen dataclass whose fields carry an :class:`Option`) can do."""

    #: what its fields are called in messages ("unknown engine options [...]")
    what: ClassVar[str] = "options"

    @classmethod
    def options(cls) -> list[tuple[str, Option, Any]]:
        """Every field as ``(name, Option, default)``, in declaration order."""
        out = []
        for f in fields(cls):  # type: ignore[arg-type]
            default = f.default if f.default is not MISSING else None
            out.append((f.name, f.metadata["option"], default))
        return out

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(name for name, _, _ in cls.options())

    @classmethod
    def _known(cls, values: Mapping[str, Any], what: str | None = None) -> dict[str, Option]:
        known = {name: spec for name, spec, _ in cls.options()}
        unknown = sorted(str(k) for k in values if k not in known)
        if unknown:
            raise InvalidArgumentError(f"unknown {what or cls.what} {unknown}; known: {sorted(known)}")
        return known

    @classmethod
    def from_texts(cls: type[D], values: Mapping[str, Any], **overrides: Any) -> D:
        """An instance from text forms (flags, ROS parameters, launch arguments, form fields); unnamed fields
        keep their defaults. Non-string values (a ROS integer or double parameter) are read as text."""
        known = cls._known(values)
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            try:
                kwargs[name] = known[name].parse(value if isinstance(value, str) else str(value))
            except ValueError as exc:
                raise InvalidArgumentError(f"{name}: {exc}") from None
        return cls(**{**kwargs, **overrides})

    def to_texts(self) -> dict[str, str]:
        """Every field in its text form (``from_texts(x.to_texts()) == x``)."""
        return {name: spec.text(getattr(self, name)) for name, spec, _ in self.options()}

    @classmethod
    def from_mapping(cls: type[D], values: Any, *, what: str | None = None) -> D:
        """An instance from a JSON object (values typed as JSON gives them; unknown keys refused)."""
        label = what or cls.what
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise InvalidArgumentError(f"{label} must be an object; got {type(values).__name__}")
        cls._known(values, f"{label} fields" if what else None)
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON values (``from_mapping(x.to_dict()) == x``)."""
        return {name: getattr(self, name) for name, _, _ in self.options()}

    def replace(self: D, **changes: Any) -> D:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)  # type: ignore[type-var]

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the defaults."""
        defaults = type(self)()
        return {name: getattr(self, name) for name, _, _ in self.options()
                if getattr(self, name) != getattr(defaults, name)}


# ---------------------------------------------------------------------- doors generated from declarations
def flag(name: str) -> str:
    """The command-line flag of field ``name`` (``mask_tta`` -> ``--mask-tta``)."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Declared], *, prefix: str, title: str,
                  exclude: Iterable[str] = (), defaults: Mapping[str, Any] | None = None) -> None:
    """Add one flag per field of ``cls`` (minus ``exclude``) to ``parser``, with its help, choices and default
    (``defaults`` overrides a default where a command has a reason to, and its help says so); the values land
    in ``args.<prefix>_<field>``; :func:`from_args` reads them back."""
    skip = set(exclude)
    group = parser.add_argument_group(title)
    for name, spec, default in cls.options():
        if name in skip:
            continue
        value = (defaults or {}).get(name, default)

        def parse(text: str, spec: Option = spec) -> Any:
            try:
                return spec.parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        shown = spec.text(value) or "empty"
        kwargs: dict[str, Any] = {"default": value, "help": f"{spec.help} (default: {shown})",
                                  "metavar": spec.metavar}
        if spec.choices is not None:
            kwargs.update(choices=spec.choices, metavar=None, default=spec.text(value))
        else:
            kwargs["type"] = parse
        group.add_argument(flag(name), dest=f"{prefix}_{name}", **kwargs)


def from_args(cls: type[D], args: argparse.Namespace, *, prefix: str, **overrides: Any) -> D:
    """The instance of the flags :func:`add_arguments` added (plus ``overrides``); fields the command left
    out keep their defaults."""
    values: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for name, spec, _ in cls.options():
        if not hasattr(args, f"{prefix}_{name}"):
            continue
        value = getattr(args, f"{prefix}_{name}")
        if spec.choices is not None:
            texts[name] = value
        else:
            values[name] = value
    return cls.from_texts(texts, **{**values, **overrides})


def parameters(cls: type[Declared], *, exclude: Iterable[str] = ()) -> list[tuple[str, Any, str]]:
    """``(name, default, description)`` of ``cls``'s ROS parameters and launch arguments: defaults in their
    text form, numbers kept as numbers (a ROS parameter's type follows its default)."""
    skip = set(exclude)
    out = []
    for name, spec, default in cls.options():
        if name in skip:
            continue
        keep = isinstance(default, (int, float)) and not isinstance(default, bool)
        value = default if keep or isinstance(default, bool) else spec.text(default)
        choices = f" [{', '.join(spec.choices)}]" if spec.choices else ""
        out.append((name, value, spec.help + choices))
    return out


# ---------------------------------------------------------------------- the two option sets
def _answer_text(value: Any) -> str:
    return "" if value is None else str(value)


@dataclass(frozen=True)
class QueryOptions(Declared):
    """How one query is answered, validated at construction.

    Attributes:
        mode: ``fast`` (the answer is teacher-forced: one pass, no generation; LISA's own evaluation),
            ``chat`` (greedy generation with a KV cache: the model's own words, "nothing matches" answers)
            or ``reference`` (the public code's way, for parity tests).
        max_new_tokens: most tokens a ``chat`` / ``reference`` answer may generate, in [1, :data:`MAX_NEW_TOKENS`].
        answer: the forced answer of ``fast`` mode (None: ``"Sure, [SEG]."``; ``"[SEG]."`` as LISA's eval);
            each ``[SEG]`` in it is one mask.
        return_logits: also return float32 mask logits (N x H x W) and the mask decoder's prompts (N x D).
    """

    what: ClassVar[str] = "query options"

    mode: str = option("fast", Option(
        "how the model answers: fast (a forced answer, one pass: robots at frame rate), chat (it writes its own "
        "answer: explanations, 'nothing matches') or reference (the public code's way: parity tests)",
        parse=str.strip, choices=MODES))
    max_new_tokens: int = option(32, Option(
        f"most tokens a chat answer may generate (1 to {MAX_NEW_TOKENS})", parse=parse_int, metavar="N"))
    answer: str | None = option(None, Option(
        "the forced answer of fast mode, each [SEG] one mask (empty: 'Sure, [SEG].')", parse=parse_optional,
        text=_answer_text, metavar="TEXT"))
    return_logits: bool = option(False, Option(
        "also return the mask logits and the mask decoder's prompts", parse=parse_bool,
        text=lambda v: "true" if v else "false", choices=("false", "true")))

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        if not is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidArgumentError(f"max_new_tokens must be a whole number in [1, {MAX_NEW_TOKENS}]; "
                                       f"got {self.max_new_tokens!r:.50}")
        if self.answer is not None:
            check_answer(self.answer)
        if not isinstance(self.return_logits, bool):
            raise InvalidArgumentError(f"return_logits must be true or false; got {self.return_logits!r:.50}")

    @classmethod
    def of(cls, options: QueryOptions | Mapping[str, Any] | None = None, *, mode: str | None = None,
           max_new_tokens: int | None = None, answer: str | None = None,
           return_logits: bool | None = None) -> QueryOptions:
        """``options`` (an instance, a mapping or None: the defaults) with the keywords that are not None
        applied: the one way every backend reads ``segment(..., options, mode=..., ...)``."""
        base = options if isinstance(options, QueryOptions) else cls.from_mapping(options, what="options")
        changes: dict[str, Any] = {k: v for k, v in (("mode", mode), ("max_new_tokens", max_new_tokens),
                                                     ("answer", answer), ("return_logits", return_logits))
                                   if v is not None}
        return replace(base, **changes) if changes else base


def check_answer(answer: object) -> str:
    """``answer`` if it is a usable forced answer (non-empty text without the image placeholder)."""
    if not isinstance(answer, str) or not answer.strip():
        raise InvalidArgumentError("answer (the forced answer) must be a non-empty string, e.g. 'Sure, [SEG].'")
    if len(answer) > MAX_ANSWER_CHARS:
        raise InvalidArgumentError(f"answer (the forced answer) is {len(answer)} characters; at most "
                                   f"{MAX_ANSWER_CHARS}")
    try:
        answer.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError("answer (the forced answer) must be valid Unicode text") from None
    if IMAGE_TOKEN in answer:
        raise InvalidArgumentError(f"answer (the forced answer) must not contain {IMAGE_TOKEN!r}: that is where the "
                                   "prompt puts the image")
    return answer


@dataclass(frozen=True)
class TrackOptions(Declared):
    """How a stream's masks are carried between reasoning steps (:class:`~lisa_agent.tracking.StreamSegmenter`),
    validated at construction.

    Attributes:
        tracker: ``flow`` (optical flow, a few ms a frame), ``sam`` (the engine's SAM prompted with the last
            ``[SEG]`` prompts; in-process engines only) or ``none`` (the last masks held).
        reason_every: LISA runs at least every this many frames (1: on every frame).
        reason_period_s: and at least every this many seconds (frame stamps when both frames have one, else
            wall time); None (text ``0`` or ``off``): no time limit.
        min_confidence: LISA runs again on the next frame when a mask's tracking confidence falls below this.
    """

    what: ClassVar[str] = "tracking options"

    tracker: str = option("flow", Option(
        "what carries the masks between reasoning steps: flow (optical flow), sam (the model's own SAM; "
        "in-process models only) or none (the last masks held)", parse=str.strip, choices=TRACKERS))
    reason_every: int = option(10, Option(
        "run the model at least every this many frames", parse=parse_int, metavar="N"))
    reason_period_s: float | None = option(2.0, Option(
        "and at least every this many seconds (0: no time limit)", parse=parse_seconds_or_none,
        text=lambda v: "0" if v is None else str(v), metavar="S"))
    min_confidence: float = option(0.5, Option(
        "run the model again when a mask's tracking confidence falls below this (0 to 1)", parse=parse_float,
        metavar="C"))

    def __post_init__(self) -> None:
        check_choice("tracker", self.tracker, TRACKERS)
        if not is_int(self.reason_every) or not 1 <= self.reason_every <= MAX_REASON_EVERY:
            raise InvalidArgumentError(f"reason_every must be a whole number in [1, {MAX_REASON_EVERY}]; "
                                       f"got {self.reason_every!r:.50}")
        period = self.reason_period_s
        if period is not None:
            if not is_number(period) or period < 0:
                raise InvalidArgumentError("reason_period_s must be a positive, finite number of seconds, or "
                                           f"0 / None for no time limit; got {period!r:.50}")
            object.__setattr__(self, "reason_period_s", float(period) or None)
        if not is_number(self.min_confidence) or not 0.0 <= self.min_confidence <= 1.0:
            raise InvalidArgumentError(f"min_confidence must be a number in [0, 1]; got {self.min_confidence!r:.50}")
        object.__setattr__(self, "min_confidence", float(self.min_confidence))


def add_query_arguments(parser: argparse.ArgumentParser, *, exclude: Iterable[str] = (),
                        defaults: Mapping[str, Any] | None = None) -> None:
    """The :class:`QueryOptions` flags of a command (``args.query_<field>``)."""
    add_arguments(parser, QueryOptions, prefix="query", title="query options (lisa_agent.options.QueryOptions)",
                  exclude=exclude, defaults=defaults)


def query_options_from_args(args: argparse.Namespace, **overrides: Any) -> QueryOptions:
    return from_args(QueryOptions, args, prefix="query", **overrides)


def add_track_arguments(parser: argparse.ArgumentParser, *, exclude: Iterable[str] = (),
                        defaults: Mapping[str, Any] | None = None) -> None:
    """The :class:`TrackOptions` flags of a command (``args.track_<field>``)."""
    add_arguments(parser, TrackOptions, prefix="track", title="tracking options (lisa_agent.options.TrackOptions)",
                  exclude=exclude, defaults=defaults)


def track_options_from_args(args: argparse.Namespace, **overrides: Any) -> TrackOptions:
    return from_args(TrackOptions, args, prefix="track", **overrides)
