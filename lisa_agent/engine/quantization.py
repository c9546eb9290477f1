"""8-bit and 4-bit weights for the language model: which library quantizes (bitsandbytes or torchao) and how.

:func:`resolve_quant_backend` picks the library (for ``auto``, bitsandbytes where :func:`bitsandbytes_runs` says
it runs, torchao elsewhere); :func:`quantize_llm` (bitsandbytes) and :func:`quantize_llm_torchao` replace the
LLaMA decoder layers' linear layers in place. SAM, the projector, ``text_hidden_fcs``, embeddings and
``lm_head`` stay as they are.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable
from typing import Any

import torch

from ..config import EngineConfig
from ..errors import QuantizationError
from .modeling.lisa import LisaModel

log = logging.getLogger(__name__)


def resolve_quant_backend(config: EngineConfig, device: torch.device) -> str | None:
    """Where ``config``'s quantized weights come from: its ``quant_backend``, or for ``auto`` bitsandbytes when
    it runs on ``device`` (a CUDA GPU its kernels were built for: the aarch64 wheels lacked Jetson Orin's sm_87)
    and torchao otherwise (the CPU included). None without quantization."""
    if config.quantization is None:
        return None
    if config.quant_backend != "auto":
        return config.quant_backend
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if bitsandbytes_runs(index, config.quantization):
            return "bitsandbytes"
    return "torchao"


#: what :func:`bitsandbytes_runs` runs in a child process: one bitsandbytes layer, forward, on cuda:<index>
_BNB_PROBE = """
import sys, torch, bitsandbytes as bnb
quantization, device = sys.argv[1], torch.device("cuda", int(sys.argv[2]))
with torch.no_grad():
    if quantization == "8bit":
        layer, dtype = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False), torch.float16
    else:
        layer, dtype = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"), torch.bfloat16
    layer.to(device)(torch.zeros(1, 64, dtype=dtype, device=device))
    torch.cuda.synchronize(device)
print("bitsandbytes runs")
"""


@functools.cache
def bitsandbytes_runs(index: int, quantization: str, timeout: float = 180.0) -> bool:
    """Whether a bitsandbytes layer of ``quantization`` imports and runs a forward pass on ``cuda:<index>``,
    tried in a child process: bitsandbytes' native code has ended its process (``exit()``) on CUDA errors,
    which no ``try`` catches. Asked once per (device, quantization) and process."""
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-c", _BNB_PROBE, quantization, str(index)], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("bitsandbytes probe did not finish (%s); quantizing with torchao", exc)
        return False
    if proc.returncode == 0 and proc.stdout.strip().endswith("bitsandbytes runs"):
        return True
    last = next((line for line in reversed(proc.stderr.strip().splitlines()) if line.strip()), "no message")
    log.info("bitsandbytes does not run on cuda:%d (exit %d: %s); quantizing with torchao", index, proc.returncode,
             last[:200])
    return False


#: torchao's int4 weight layout: tinygemm's tile-packed weights, multiplied by PyTorch's own
#: ``aten._weight_int4pack_mm`` CUDA kernel (compute capability 8.0 and later: A100, H100/H200, Jetson Orin's
#: sm_87). torchao's default layout ("plain") needs the separate mslk kernel package, which Jetson lacks.
INT4_PACKING = "tile_packed_to_4d"
#: int4 group sizes, largest first: each linear layer takes the first that divides its input width
INT4_GROUP_SIZES = (128, 64, 32)


def torchao_config(quantization: str, in_features: int) -> Any | None:
    """torchao's weight-only config for one linear layer of ``in_features`` inputs: int8 per channel, or int4
    in :data:`INT4_PACKING` with the largest group size of :data:`INT4_GROUP_SIZES` that divides
    ``in_features`` (None when none does: that layer stays unquantized)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if quantization == "8bit":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    group = next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)
    if group is None:
        return None
    return Int4WeightOnlyConfig(group_size=group, int4_packing_format=INT4_PACKING, set_inductor_config=False)


def quantize_llm_torchao(model: LisaModel, quantization: str) -> None:
    """Weight-only int8 (CPU and CUDA) or int4 (CUDA, see :func:`torchao_config`) for the LLaMA decoder
    layers' linear layers with torchao, in place on the model's device; SAM, the projector,
    ``text_hidden_fcs``, embeddings and ``lm_head`` stay as they are."""
    quantize_layers_torchao(model.llm.model.layers, model.device, quantization)


def quantize_layers_torchao(layers: Iterable[torch.nn.Module], device: torch.device, quantization: str) -> int:
    """Weight-only torchao int8 / int4 (:func:`torchao_config`) for every linear layer inside ``layers`` (a
    decoder's layers, on ``device``), in place; returns how many were quantized (int4 leaves a layer whose width
    no group size divides, with a warning). QuantizationError when torchao or its kernels are missing."""
    try:
        from torchao.quantization import quantize_

        linears = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        skipped = 0
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            for linear in linears:  # torchao's kernels check the current device's capability
                config = torchao_config(quantization, linear.in_features)
                if config is None:
                    skipped += 1
                    continue
                quantize_(linear, config)
        if skipped:
            log.warning("%d of %d linear layers stay unquantized: no int4 group size of %s divides their width",
                        skipped, len(linears), INT4_GROUP_SIZES)
        return len(linears) - skipped
    except Exception as exc:  # ImportError, or kernels this device lacks
        raise QuantizationError(f"torchao cannot quantize to {quantization} here ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); install lisa-agent[quant], "
                                "or choose another quantization") from exc


def quantize_llm(model: LisaModel, quantization: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Replace the LLaMA decoder layers' linear layers with bitsandbytes 8-bit / 4-bit (nf4, double quant).

    SAM, the projector, ``text_hidden_fcs``, embeddings and ``lm_head`` stay in 16-bit.
    """
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError or a CUDA setup error
        raise QuantizationError(f"bitsandbytes is not usable here ({exc}); install lisa-agent[quant]") from exc
    for layer in model.llm.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                w = child.weight.data.to(torch.float16).cpu()
                bias = child.bias is not None
                if quantization == "8bit":
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias,
                                            has_fp16_weights=False, threshold=6.0)
                    q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias,
                                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
                if bias:
                    q.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                setattr(parent, name, q.to(device))

