"""Device and dtype defaults, and peak-memory measurement (CUDA: max allocated; CPU: peak RSS)."""

from __future__ import annotations

import resource
import sys

import torch

from .backends.cpu import release_freed_host_memory
from .config import torch_dtype
from .errors import XQInferError


def pick_device(name: str | None = None) -> torch.device:
    """`cuda` when present unless told otherwise; asking for CUDA without one is an error, not a silent fallback."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise XQInferError(f"device {name!r} is not supported (accepted: cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise XQInferError("--device cuda was asked for but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise XQInferError(f"device {name!r} is not supported (accepted: cpu, cuda, cuda:N)")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA and fp32 on CPU by default: CPU matmuls in bf16 are slow and lose the reference's precision."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_freed_host_memory()  # free memory kept for reuse is not part of what the next measurement uses
    # Writing 5 to clear_refs resets the kernel's peak-RSS counter (VmHWM); without it the peak is process-wide.
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Bytes: the allocator's peak on CUDA, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
