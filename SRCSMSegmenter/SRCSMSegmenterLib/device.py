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


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _gpu_missing_message(requested: str) -> str:
    """What is missing for ``requested`` (cuda | mps | gpu) *on this platform*, and the fix.

    ``gpu`` is what the Slicer module's device choice sends: on macOS that means Apple MPS, elsewhere an
    NVIDIA GPU through CUDA, so the message must name the one this platform would use."""
    system = platform.system()
    if requested == "mps" or (requested == "gpu" and system == "Darwin"):
        if system != "Darwin":
            return (f"Apple MPS was requested, but MPS exists only on macOS (this is {system}). Choose the CPU "
                    f"(--device cpu; in Slicer: device 'CPU'), or --device cuda on a machine with an NVIDIA GPU.")
        return ("A GPU (Apple MPS) was requested but PyTorch reports MPS as unavailable on this Mac (MPS needs an "
                "Apple-silicon or AMD GPU, macOS 12.3 or newer and a PyTorch build for arm64/x86_64 macOS). "
                "Choose the CPU (--device cpu; in Slicer: device 'CPU').")
    what = "A GPU" if requested == "gpu" else "CUDA"
    if system == "Darwin":
        return (f"{what} (NVIDIA CUDA) was requested, but PyTorch has no CUDA on macOS. Use --device mps for the "
                f"Apple GPU, or --device cpu.")
    build = ("this PyTorch is a CPU-only build" if torch.version.cuda is None
             else f"this PyTorch is built for CUDA {torch.version.cuda}, but it finds no usable NVIDIA GPU or driver")
    return (f"{what} was requested, but on {system} that needs an NVIDIA GPU with CUDA and {build}. Either "
            f"choose the CPU (--device cpu; in Slicer: device 'CPU'), or install a CUDA build of PyTorch "
            f"(pip: --index-url https://download.pytorch.org/whl/cuXYZ for your driver's CUDA version, "
            f"see pytorch.org/get-started; in Slicer: the PyTorch extension's installer) and check the NVIDIA driver (nvidia-smi).")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA, then Apple MPS, then CPU; ``gpu`` → this platform's GPU (MPS on macOS, else CUDA).
    An explicit device that is missing is an error that names what is missing here and the fix."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "gpu":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        raise SRCSMError(_gpu_missing_message("gpu"))
    if name == "cuda" and not torch.cuda.is_available():
        raise SRCSMError(_gpu_missing_message("cuda"))
    if name == "mps" and not _mps_available():
        raise SRCSMError(_gpu_missing_message("mps"))
    if name not in ("cpu", "cuda", "mps"):
        raise SRCSMError(f"Unknown device '{name}'. Choose auto, cpu, gpu, cuda or mps.")
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


def has_instance_norm(network: torch.nn.Module) -> bool:
    """True when the network normalises per instance (recipe v2's U-Net)."""
    norms = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)
    return any(isinstance(m, norms) for m in network.modules())


def memory_format(device: torch.device, precision: str,
                  network: torch.nn.Module | None = None) -> torch.memory_format:
    """The tensor layout that runs ``network`` fastest on ``device`` in ``precision``.

    Channels-last 3D is what makes oneDNN's bf16 convolutions fast on the CPU — but not with instance
    normalisation: its channels-last bf16 kernels are slower than the contiguous ones, and a v2 U-Net
    trains ≈ 13 % and infers ≈ 15 % faster contiguous (measured with torch 2.13 on AVX512-BF16,
    docs/benchmarks.md "Training throughput"). The layout changes no value.
    """
    if device.type == "cpu" and precision == "bf16":
        if network is not None and has_instance_norm(network):
            return torch.contiguous_format
        return torch.channels_last_3d
    return torch.contiguous_format


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
