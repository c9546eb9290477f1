"""Typed errors raised by lisa-agent.

Every error a caller can cause has its own class and a message that names the problem and, where
there is one, the fix. All derive from :class:`LisaError`; input errors also derive from
``ValueError`` so generic handlers keep working.
"""

from __future__ import annotations


class LisaError(Exception):
    """Base class of every error lisa-agent raises on purpose."""

    #: Short machine-readable code, used by the server's typed error replies.
    code = "internal"


class InvalidImageError(LisaError, ValueError):
    """The image is not an HWC uint8 RGB array of a usable size."""

    code = "invalid_image"


class ImageTooLargeError(InvalidImageError):
    """The image is larger than the limit (a side over the maximum, or too many bytes)."""

    code = "too_large"


class LimitExceededError(LisaError, ValueError):
    """A request asks for more work than the engine allows (masks per answer, mask pixels)."""

    code = "too_large"


class InvalidQueryError(LisaError, ValueError):
    """The query (instruction) is empty or not a string."""

    code = "invalid_query"


class InvalidArgumentError(LisaError, ValueError):
    """An option has an unknown or out-of-range value (mode, dtype, device, ...)."""

    code = "invalid_argument"


class CheckpointError(LisaError):
    """A checkpoint is malformed: missing or unexpected keys, wrong shapes, bad config."""

    code = "checkpoint_error"


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """Neither a local folder nor a reachable Hub repository carries the model."""

    code = "model_not_found"


class QuantizationError(LisaError):
    """8-bit / 4-bit quantization was asked for where it cannot run (no CUDA, no bitsandbytes)."""

    code = "quantization_unavailable"


class UnsafePickleError(LisaError, ValueError):
    """A pickle file (RefCOCO's ``refs(unc).p``) asks to import or call something: refused, nothing run.

    Data pickles are read with a restricted unpickler that builds plain containers, strings and numbers
    only (:mod:`lisa_agent.data.plain_pickle`)."""

    code = "unsafe_pickle"


class DependencyError(LisaError):
    """An installed library is a version lisa-agent does not support (transformers older than the pin)."""

    code = "dependency_unsupported"
