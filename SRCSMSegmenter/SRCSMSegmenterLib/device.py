"""Choosing the compute device and numeric precision.

Why a module of its own: the Slicer module, the CLI and the trainer must make the same choice, and
the CPU bf16 decision depends on the processor (bf16 autocast with channels-last tensors is ≈ 2–5×
faster than fp32 on CPUs with AVX512-BF16 or AMX, and slower elsewhere).
"""

from __future__ import annotations

import functools
import platform
from contextlib import nullcontext
from typing import ContextManager, Literal

import torch

from .errors import SRCSMError

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        return False
    return False


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA, then Apple MPS, then CPU. An explicit device that is missing is an error."""
    name = (name or "auto").lower()
    if name in ("gpu",):
        name = "cuda" if torch.cuda.is_available() else "mps"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SRCSMError(
            "CUDA was requested but PyTorch sees no NVIDIA GPU (or this PyTorch is a CPU build). Use "
            "--device cpu, or install a CUDA build of PyTorch (in Slicer: the PyTorch extension)."
        )
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SRCSMError("Apple MPS was requested but is not available on this machine. Use --device cpu.")
    if name not in ("cpu", "cuda", "mps"):
        raise SRCSMError(f"Unknown device '{name}'. Choose auto, cpu, cuda or mps.")
    return torch.device(name)


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """``auto`` → fp16 autocast on CUDA/MPS, bf16 on CPUs with native bf16, else fp32."""
    if precision != "auto":
        if precision not in ("fp32", "bf16", "fp16"):
            raise SRCSMError(f"Unknown precision '{precision}'. Choose auto, fp32, bf16 or fp16.")
        if device.type == "cpu" and precision == "fp16":
            raise SRCSMError("fp16 is not supported on the CPU; use bf16 or fp32.")
        return precision
    if device.type in ("cuda", "mps"):
        return "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> ContextManager:
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(device: torch.device, precision: str) -> torch.memory_format:
    """Channels-last 3D is what makes oneDNN's bf16 convolutions fast on the CPU."""
    if device.type == "cpu" and precision == "bf16":
        return torch.channels_last_3d
    return torch.contiguous_format


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
