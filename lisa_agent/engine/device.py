"""Where and in what precision the engine runs.

:func:`resolve_precision` turns an :class:`~lisa_agent.config.EngineConfig`'s ``device`` and ``dtype`` (``auto``
included) into torch's; :class:`OnDevice` gives an engine the device of its model and makes it current
(:func:`device_context`); :func:`upload` moves a host tensor there; :class:`StageTimer` times the stages of a
call as a result reports them.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import torch

from ..config import EngineConfig
from ..errors import InvalidArgumentError, QuantizationError
from .quantization import resolve_quant_backend

if TYPE_CHECKING:
    from .modeling.lisa import LisaModel

#: torch dtype of each precision name of :data:`lisa_agent.config.DTYPES` (``auto`` is resolved first)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(config: EngineConfig) -> tuple[torch.dtype, torch.device]:
    """The torch dtype and device of ``config``: ``auto`` device is CUDA when available, else the CPU;
    ``auto`` dtype is bf16 on CUDA and fp32 elsewhere; quantized models compute in bf16 unless fp16
    is asked for (fp16 compute with 4-bit is reported to give blank masks)."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tdevice = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"unknown device {config.device!r}: {exc}") from exc
    if tdevice.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {config.device!r} asked for, but CUDA is not available here; use "
                                   "device='cpu' or 'auto'")
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bf16" if tdevice.type == "cuda" else "fp32"
    tdtype = TORCH_DTYPES[dtype]
    if config.quantization is not None:
        backend = resolve_quant_backend(config, tdevice)
        if backend == "bitsandbytes" and tdevice.type != "cuda":
            raise QuantizationError(f"{config.quantization} quantization with bitsandbytes needs a CUDA device; got "
                                    f"{tdevice} (quant_backend torchao quantizes 8bit on the CPU)")
        if backend == "torchao" and config.quantization == "4bit" and tdevice.type != "cuda":
            raise QuantizationError("4bit weights with torchao need a CUDA device (its int4 kernels); use 8bit on "
                                    f"the CPU; got {tdevice}")
        if tdtype == torch.float32 and tdevice.type == "cuda":
            tdtype = torch.bfloat16
    return tdtype, tdevice


def device_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``device`` made current when it is a CUDA device (``cuda:N``: the streams, events, timers and graph
    captures of an engine and of the libraries it calls default to the current device); nothing elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def upload(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``: through pinned memory, without blocking, on CUDA."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class StageTimer:
    """Wall time per stage; on CUDA it waits for the device's current stream only (work on other streams,
    such as SAM's encoder overlapping the language model, goes on)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sync = device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self) -> float:
        """Milliseconds since the timer started or since the previous lap."""
        if self.sync:
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        ms = (now - self.t) * 1000.0
        self.t = now
        return ms


class OnDevice:
    """Base of the engine's parts: the device is the model's (moving the model moves the engine), made current
    while the engine works on it."""

    model: LisaModel

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""
        return self.model.device

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        """The engine's CUDA device made current (see :func:`device_context`); nothing elsewhere."""
        return device_context(self.device)
