"""Device and dtype defaults, and peak-memory measurement (CUDA: max allocated; CPU: peak RSS)."""

from __future__ import annotations

import os
import resource
import sys
import warnings

import torch

from .backends.cpu import release_freed_host_memory
from .config import ModelConfig, torch_dtype
from .errors import XQInferError, XQInferWarning


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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# Below this hidden size a token's operations take microseconds, less than a team of threads spends meeting at each
# one; on a busy machine a thread then waits for a time slice at every operation (docs/cli.md, --threads).
SMALL_MODEL_HIDDEN_SIZE = 512


def default_threads(config: ModelConfig) -> int:
    """Torch's intra-op threads for a model: every usable core, one for a model smaller than
    SMALL_MODEL_HIDDEN_SIZE."""
    return 1 if config.hidden_size < SMALL_MODEL_HIDDEN_SIZE else usable_cores()


def set_threads(threads: int) -> None:
    """Torch's intra-op threads; more than the usable cores is honoured with a warning (they share the cores)."""
    if threads < 1:
        raise XQInferError(f"--threads must be at least 1, got {threads}")
    cores = usable_cores()
    if threads > cores:
        warnings.warn(f"--threads {threads} is more than the {cores} cores this process may use: the threads will "
                      "share them, which is usually slower", XQInferWarning, stacklevel=2)
    torch.set_num_threads(threads)


def set_default_threads(config: ModelConfig) -> None:
    """`default_threads(config)`, unless OMP_NUM_THREADS says how many (torch has read it)."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads(config))


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


def resident_memory(device: torch.device) -> int | None:
    """CPU: the process's resident size now (what a peak's increase is measured from); None on CUDA, whose
    allocator counts the process's tensors and nothing else, and where it cannot be read."""
    if device.type != "cpu":
        return None
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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


def free_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate on `device`, or None where that cannot be read.

    CUDA: the device's free memory plus what torch's allocator holds unused. CPU (Linux): MemAvailable, within the
    cgroup's limit when one is set, after the heap's kept free memory is handed back (it would count as used).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    release_freed_host_memory()
    available = _meminfo_available()
    limit = _cgroup_room()
    if available is None or limit is None:
        return available if limit is None else limit
    return min(available, limit)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# (limit, usage) files of the cgroup a container sees at the root of its cgroup mount: v2, then v1.
_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _cgroup_room() -> int | None:
    """What the memory cgroup still allows, when it sets a limit below the machine's memory."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            with open(limit_file) as limit, open(usage_file) as usage:
                limit_text, usage_text = limit.read().strip(), usage.read().strip()
        except OSError:
            continue
        if not limit_text.isdigit() or int(limit_text) >= 1 << 60:  # "max", or v1's "no limit"
            return None
        return max(int(limit_text) - int(usage_text), 0)
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is an allocation that failed: torch's on CUDA, Python's, or the CPU allocator's
    (a RuntimeError on CPU)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and "DefaultCPUAllocator" in text and (
        "not enough memory" in text or "can't allocate memory" in text)
