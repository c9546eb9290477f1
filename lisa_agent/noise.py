"""Lines other libraries log while a model loads that tell our users nothing, dropped by the programs we
ship (the CLI, the ROS node); a library user's own program keeps its logging as it set it up."""

from __future__ import annotations

import logging

#: (logger, text) of each line dropped: where torchao is installed transformers imports it, and torchao
#: registers enums that torch.compile now handles itself (torch logs a deprecation line for each).
NOISE = (("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),)


class _DropLine(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_library_noise() -> None:
    """Drop the :data:`NOISE` lines, only those (idempotent)."""
    for name, text in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLine) and f.text == text for f in logger.filters):
            logger.addFilter(_DropLine(text))
