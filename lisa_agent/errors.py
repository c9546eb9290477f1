"""One error vocabulary for every door and every backend.

Every error a caller (a person, a program, a robot, an LLM) can see is a :class:`LisaError` with a stable
``code`` (:class:`Code`); :func:`describe_error` turns *any* exception into the one description every door
shows (:class:`ErrorInfo`: code, message, advice, HTTP status, whose fault): the server's typed replies,
the console's API, the ROS node's ``~/result`` and action results, the LangChain tool's ``ToolException``,
the MCP server's tool errors. Input errors also derive from ``ValueError`` so generic handlers keep working.

Codes are grouped by whose move it is:

- the caller's: ``bad_request``, ``unsupported_version``, ``unknown_op``, ``invalid_image``, ``too_large``,
  ``invalid_query``, ``invalid_argument``, ``unknown_target``, ``unsafe_pickle``, ``invalid_dataset``,
  and the HTTP doors' refusals ``unauthorized``, ``forbidden_host``, ``cross_origin``,
  ``unsupported_media_type``, ``not_found``, ``method_not_allowed``;
- the service's state (retry later; never a fault of the model): ``queue_full``, ``deadline_exceeded``,
  ``superseded``, ``shutting_down``, ``no_frame``, ``unavailable`` (client side: no reply);
- the model's or the machine's: ``internal``, ``checkpoint_error``, ``model_not_found``,
  ``quantization_unavailable``, ``dependency_unsupported``, ``source_error``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("lisa_agent.errors")


class Code:
    """Every error code (``LisaError.code``, the protocol's ``error.code``, the console's and tools' codes)."""

    BAD_REQUEST = "bad_request"  # malformed message: frames missing or extra, header not a JSON object, bad field
    UNSUPPORTED_VERSION = "unsupported_version"  # the protocol version is not one this server speaks
    UNKNOWN_OP = "unknown_op"  # the operation is not one this server offers
    INVALID_IMAGE = "invalid_image"  # not a usable image: undecodable, wrong shape, dtype or encoding
    TOO_LARGE = "too_large"  # an image, body, text or mask budget over the limit
    INVALID_QUERY = "invalid_query"  # the instruction is empty, not text, or holds the image placeholder
    INVALID_ARGUMENT = "invalid_argument"  # an unknown option or an option out of range
    UNKNOWN_TARGET = "unknown_target"  # the chosen mask is not one of the last answer's
    UNSAFE_PICKLE = "unsafe_pickle"  # a data pickle asks to run code
    INVALID_DATASET = "invalid_dataset"  # a dataset folder or file is missing or malformed
    UNAUTHORIZED = "unauthorized"  # HTTP: the access token is missing or wrong
    FORBIDDEN_HOST = "forbidden_host"  # HTTP: a Host header that is not this machine's (DNS rebinding)
    CROSS_ORIGIN = "cross_origin"  # HTTP: sent by a web page of another site
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # HTTP: a POST body not sent as application/json
    NOT_FOUND = "not_found"  # HTTP: no such page or API route
    METHOD_NOT_ALLOWED = "method_not_allowed"  # HTTP: the route takes another method
    QUEUE_FULL = "queue_full"  # too many requests wait already; nothing was run, retry later
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request waited past its deadline; not run
    SUPERSEDED = "superseded"  # a newer frame or instruction of the same caller replaced it; not run
    SHUTTING_DOWN = "shutting_down"  # the service stopped before running the request
    NO_FRAME = "no_frame"  # no camera frame has arrived yet (or the newest is too old)
    UNAVAILABLE = "unavailable"  # client side: no reply from the server within the timeout
    INTERNAL = "internal"  # an unexpected failure of the model or the service (logged where it happened)
    CHECKPOINT_ERROR = "checkpoint_error"  # a malformed checkpoint
    MODEL_NOT_FOUND = "model_not_found"  # no folder, bundled model or reachable Hub repository by that name
    QUANTIZATION_UNAVAILABLE = "quantization_unavailable"  # 8/4-bit asked for where it cannot run
    DEPENDENCY_UNSUPPORTED = "dependency_unsupported"  # an installed library's version is not supported
    SOURCE_ERROR = "source_error"  # a frame source (camera, video, topic) cannot be opened or read


@dataclass(frozen=True)
class CodeInfo:
    """What a code means to a door: the HTTP status, a title, what to do next, and whose move it is."""

    status: int
    title: str
    advice: str
    caller_fault: bool = False  # the caller's mistake: never counts toward a service's health
    retry: bool = False  # the same request may succeed later


_RETRY = "Nothing was run; call again in a moment."
#: Per code: HTTP status, title, advice. The advice is written for whoever reads the error next: a person,
#: a program's log, or the LLM that called a tool.
CODES: dict[str, CodeInfo] = {
    Code.BAD_REQUEST: CodeInfo(400, "Bad request", "Fix the request as the message says (docs/protocol.md).", True),
    Code.UNSUPPORTED_VERSION: CodeInfo(400, "Unsupported protocol version",
                                       "Use a client of the server's lisa-agent version.", True),
    Code.UNKNOWN_OP: CodeInfo(400, "Unknown operation", "Use one of the operations the message lists.", True),
    Code.INVALID_IMAGE: CodeInfo(400, "Could not use the image",
                                 "Send an RGB image: a PNG or JPEG file, or an HxWx3 uint8 array.", True),
    Code.TOO_LARGE: CodeInfo(413, "Too large", "Send less: a smaller image, a shorter text or fewer masks.", True),
    Code.INVALID_QUERY: CodeInfo(400, "Invalid query",
                                 "Describe the object in words, e.g. 'something to cut with'.", True),
    Code.INVALID_ARGUMENT: CodeInfo(400, "Invalid argument", "Change the argument the message names.", True),
    Code.UNKNOWN_TARGET: CodeInfo(404, "Unknown target", "Choose one of the masks of the last answer.", True),
    Code.UNSAFE_PICKLE: CodeInfo(400, "Unsafe data file", "Use the dataset's original refs file.", True),
    Code.INVALID_DATASET: CodeInfo(400, "Invalid dataset", "Check the dataset folder the message names.", True),
    Code.UNAUTHORIZED: CodeInfo(401, "Unauthorized", "Open the URL with the access token the service printed.", True),
    Code.FORBIDDEN_HOST: CodeInfo(403, "Forbidden host", "Reach the service by its own address.", True),
    Code.CROSS_ORIGIN: CodeInfo(403, "Cross-origin request", "Call the service from its own page or a program.",
                                True),
    Code.UNSUPPORTED_MEDIA_TYPE: CodeInfo(415, "Unsupported media type", "Send the body as application/json.", True),
    Code.NOT_FOUND: CodeInfo(404, "Not found", "Use a route the service documents.", True),
    Code.METHOD_NOT_ALLOWED: CodeInfo(405, "Method not allowed", "Use the method the route documents.", True),
    Code.QUEUE_FULL: CodeInfo(503, "Busy", "The vision model is busy; wait a moment and call again.", retry=True),
    Code.DEADLINE_EXCEEDED: CodeInfo(504, "Deadline exceeded", "The vision model was too slow; call again.",
                                     retry=True),
    Code.SUPERSEDED: CodeInfo(409, "Superseded", "A newer frame or instruction replaced this one; call again if "
                                                 "the answer is still needed.", retry=True),
    Code.SHUTTING_DOWN: CodeInfo(503, "Shutting down", "The vision model is shutting down; tell the user it is "
                                                       "unavailable.", retry=True),
    Code.NO_FRAME: CodeInfo(503, "No camera frame", "No camera frame has arrived yet; check the camera, then call "
                                                    "again.", retry=True),
    Code.UNAVAILABLE: CodeInfo(503, "Unavailable", "The vision model server is down or unreachable; retrying now "
                                                   "will not help. Tell the user the vision model is unavailable."),
    Code.INTERNAL: CodeInfo(500, "Vision model failed", "Do not retry with the same input; tell the user the vision "
                                                        "model failed (the service logged why)."),
    Code.CHECKPOINT_ERROR: CodeInfo(500, "Bad checkpoint", "Check the checkpoint folder the message names."),
    Code.MODEL_NOT_FOUND: CodeInfo(404, "Model not found", "Pass a local folder, a bundled model or a Hub id that "
                                                           "exists."),
    Code.QUANTIZATION_UNAVAILABLE: CodeInfo(500, "Quantization unavailable",
                                            "Load the model without quantization, or on a CUDA device."),
    Code.DEPENDENCY_UNSUPPORTED: CodeInfo(500, "Unsupported dependency", "Install the version the message names."),
    Code.SOURCE_ERROR: CodeInfo(503, "Frame source failed", "Check the camera, video file or topic the message "
                                                            "names."),
}


class LisaError(Exception):
    """Base class of every error lisa-agent raises on purpose; ``code`` is one of :class:`Code`.

    Args:
        message: what went wrong, naming the value or the file.
        code: the instance's code where the class has several (a protocol refusal, a server's reply).
        advice: what to do next, where it differs from the code's usual advice (:data:`CODES`).
    """

    #: Short machine-readable code (:class:`Code`).
    code: str = Code.INTERNAL

    def __init__(self, message: str = "", *, code: str | None = None, advice: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.advice = advice
        #: True when a server raised it and a client re-raised it here
        self.remote = False


# ---------------------------------------------------------------------- the caller's mistakes
class InvalidImageError(LisaError, ValueError):
    """The image is not an HWC uint8 RGB array of a usable size, or cannot be decoded."""

    code = Code.INVALID_IMAGE


class UnsupportedEncodingError(InvalidImageError):
    """An image message's encoding is not one lisa-agent reads (ROS ``sensor_msgs/Image.encoding``)."""


class MalformedImageError(InvalidImageError):
    """An image message's size fields disagree with its data (short buffer, step too small, zero size)."""


class ImageTooLargeError(InvalidImageError):
    """The image is larger than the limit (a side over the maximum, or too many bytes)."""

    code = Code.TOO_LARGE


class LimitExceededError(LisaError, ValueError):
    """A request asks for more work than the engine allows (masks per answer, mask pixels, text length)."""

    code = Code.TOO_LARGE


class InvalidQueryError(LisaError, ValueError):
    """The query (instruction) is empty, not a string, or holds the prompt's image placeholder."""

    code = Code.INVALID_QUERY


class InvalidArgumentError(LisaError, ValueError):
    """An option has an unknown or out-of-range value (mode, dtype, device, ...)."""

    code = Code.INVALID_ARGUMENT


class UnknownTargetError(LisaError, ValueError):
    """The chosen target is not a mask of the last answer."""

    code = Code.UNKNOWN_TARGET


class UnsafePickleError(LisaError, ValueError):
    """A pickle file (RefCOCO's ``refs(unc).p``) asks to import or call something: refused, nothing run.

    Data pickles are read with a restricted unpickler that builds plain containers, strings and numbers
    only (:mod:`lisa_agent.data.plain_pickle`)."""

    code = Code.UNSAFE_PICKLE


class DatasetError(LisaError):
    """A dataset folder or file is missing or malformed."""

    code = Code.INVALID_DATASET


class ProtocolError(LisaError):
    """A request a service refuses before running it; ``code`` is one of :class:`Code`.

    ``request_id`` is the id read from the request when one could be read (so the reply can carry it).
    """

    def __init__(self, code: str, message: str, request_id: Any = None) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id


# ---------------------------------------------------------------------- the service's state
class ServerBusyError(LisaError):
    """``queue_full``: too many requests (or instructions) wait already; nothing was run, retry later."""

    code = Code.QUEUE_FULL


class DeadlineExceededError(LisaError):
    """``deadline_exceeded``: the request waited past its deadline and was not run."""

    code = Code.DEADLINE_EXCEEDED


class SupersededError(LisaError):
    """``superseded``: a newer frame (``latest_only``) or instruction of the same caller replaced this one."""

    code = Code.SUPERSEDED


class ShuttingDownError(LisaError):
    """``shutting_down``: the service stopped before running the request."""

    code = Code.SHUTTING_DOWN


class NoFrameError(LisaError):
    """``no_frame``: no camera frame has arrived yet, or the newest is older than allowed."""

    code = Code.NO_FRAME


class ServerUnavailableError(LisaError):
    """No reply from the server within ``timeout`` after every retry (server down, unreachable, or the
    connection was refused by CurveZMQ authentication)."""

    code = Code.UNAVAILABLE


class RemoteError(LisaError):
    """A server answered with an error whose code has no class of its own here; ``code`` is the server's."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)
        self.remote = True


# ---------------------------------------------------------------------- the model's or the machine's
class CheckpointError(LisaError):
    """A checkpoint is malformed: missing or unexpected keys, wrong shapes, bad config."""

    code = Code.CHECKPOINT_ERROR


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """Neither a local folder nor a reachable Hub repository carries the model."""

    code = Code.MODEL_NOT_FOUND


class QuantizationError(LisaError):
    """8-bit / 4-bit quantization was asked for where it cannot run (no CUDA, no bitsandbytes)."""

    code = Code.QUANTIZATION_UNAVAILABLE


class DependencyError(LisaError):
    """An installed library is a version lisa-agent does not support (transformers older than the pin)."""

    code = Code.DEPENDENCY_UNSUPPORTED


class SourceError(LisaError):
    """A frame source cannot be opened or read (no such camera, an unreadable video file, no rclpy)."""

    code = Code.SOURCE_ERROR


#: The class a client raises for a server's error code (codes raised locally map to the same class, so
#: callers handle local and remote errors alike); other codes become a :class:`RemoteError`.
ERROR_CLASSES: dict[str, type[LisaError]] = {
    cls.code: cls
    for cls in (InvalidImageError, LimitExceededError, InvalidQueryError, InvalidArgumentError, UnknownTargetError,
                UnsafePickleError, DatasetError, ServerBusyError, DeadlineExceededError, SupersededError,
                ShuttingDownError, NoFrameError, CheckpointError, ModelNotFoundError, QuantizationError,
                DependencyError, SourceError)
}


@dataclass(frozen=True)
class ErrorInfo:
    """One error as every door shows it.

    Attributes:
        code: the stable code (:class:`Code`).
        message: what went wrong (the exception's own words; for unexpected exceptions its type and text).
        advice: what to do next.
        status: the HTTP status of the code.
        caller_fault: the caller's mistake (never counts toward a service's health).
        retry: the same request may succeed later.
    """

    code: str
    message: str
    advice: str
    status: int
    caller_fault: bool
    retry: bool

    @property
    def title(self) -> str:
        return code_info(self.code).title

    def to_dict(self) -> dict[str, str]:
        """``{"code", "message", "advice"}``: the ``error`` object of JSON replies."""
        return {"code": self.code, "message": self.message, "advice": self.advice}

    def sentence(self) -> str:
        """``Title: message. Advice`` (what an LLM or a log line reads)."""
        message = self.message.rstrip(". ")
        return f"{self.title}: {message}. {self.advice}".strip()


def code_info(code: str) -> CodeInfo:
    """What ``code`` means (an unknown code, e.g. from a newer server, reads as a failure of the service)."""
    return CODES.get(code, CODES[Code.INTERNAL])


def describe_error(exc: BaseException) -> ErrorInfo:
    """The one description of any exception: a :class:`LisaError` by its code; anything else (a bug, a
    device fault) as ``internal`` with its type and text."""
    if isinstance(exc, LisaError):
        code = exc.code if isinstance(exc.code, str) else Code.INTERNAL
        info = code_info(code)
        message = str(exc) or info.title
        return ErrorInfo(code, message, exc.advice or info.advice, info.status, info.caller_fault, info.retry)
    info = CODES[Code.INTERNAL]
    return ErrorInfo(Code.INTERNAL, f"{type(exc).__name__}: {exc}", info.advice, info.status, False, False)


def error_from_dict(error: Any) -> LisaError:
    """The exception a client raises for a reply's ``error`` object (``{"code", "message", "advice"?}``)."""
    if not isinstance(error, dict):
        return RemoteError(Code.INTERNAL, f"the server sent a malformed error: {error!r:.200}")
    code = str(error.get("code", Code.INTERNAL))
    message = str(error.get("message", ""))
    cls = ERROR_CLASSES.get(code)
    exc: LisaError = RemoteError(code, message) if cls is None else cls(f"{message} (server)")
    advice = error.get("advice")
    if isinstance(advice, str) and advice and advice != code_info(code).advice:
        exc.advice = advice
    exc.remote = True
    return exc
