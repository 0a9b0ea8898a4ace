"""CPU tricks, applied at load: fp32 weights laid out for MKL's GEMV, one-token products split over the threads, and
freed host memory kept for reuse. Each was measured on the 2-core CPU where xqinfer is developed."""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch.base import Embedding
from .base import Backend

# A one-token product x·Wᵀ is a matrix-vector product, which MKL runs on one thread however many torch has. Split
# into one block of output rows per thread, as a batched product that torch spreads over its threads, it reads an fp32
# W 1.4-1.6x faster on 2 cores; below this size the split costs more than it saves, and in fp16/bf16 it is slower.
SPLIT_MIN_BYTES = 1 << 18


def threaded_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., in] @ weightᵀ -> [..., out], as F.linear; a single row on a multi-threaded CPU uses every thread."""
    threads = torch.get_num_threads()
    out, width = weight.shape
    if x.shape[:-1].numel() != 1 or threads == 1 or out % threads or weight.nbytes < SPLIT_MIN_BYTES:
        return F.linear(x, weight)
    blocks = weight.view(threads, out // threads, width).transpose(1, 2)  # [threads, in, out / threads], no copy
    return torch.bmm(x.reshape(1, 1, width).expand(threads, 1, width), blocks).view(*x.shape[:-1], out)


class ThreadedLinear(nn.Linear):
    """nn.Linear without bias whose one-token products use every intra-op thread."""

    def forward(self, x: Tensor) -> Tensor:
        return threaded_linear(x, self.weight)


class ThreadedEmbedding(Embedding):
    """An Embedding whose one-token output products (tied embeddings) use every intra-op thread."""

    def as_linear(self, x: Tensor) -> Tensor:
        return threaded_linear(x, self.weight)


@dataclass(frozen=True)
class CpuBackend(Backend):
    dtype: torch.dtype

    def stored_transposed(self, model: nn.Module) -> set[str]:
        """The weights of one-token products at least as tall as wide (q|k|v, o, gate|up, the output matrix), in fp32.

        MKL's one-token fp32 GEMV streams such a W 1.4-1.8x faster stored [in, out]; down_proj [d, f] is slower that
        way, and in fp16 (10x slower) or bf16 the checkpoint layout wins.
        """
        if self.dtype != torch.float32:
            return set()
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        multiplied = [module.weight for module in model.modules() if isinstance(module, nn.Linear)]
        multiplied.append(model.output_weight())  # the embedding, when tied
        return {names[id(weight)] for weight in multiplied if weight.shape[0] >= weight.shape[1]}

    def prepare(self, model: nn.Module) -> None:
        keep_freed_host_memory()
        if self.dtype != torch.float32:
            return
        for module in model.modules():
            # The same module and parameters, given a CPU forward.
            if type(module) is nn.Linear and module.bias is None:
                module.__class__ = ThreadedLinear
            elif type(module) is Embedding:
                module.__class__ = ThreadedEmbedding


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_host_memory() -> None:
    """Keeps freed host memory in the process for reuse (glibc): what a CPU decode step frees, the next one takes.

    A step allocates and frees the same large temporaries at every token (the dequantized history, its codes). By
    default glibc maps each block above its mmap threshold afresh and trims the heap after large frees, so every step
    faults its temporaries back in page by page: measured 6-8 million page faults and 2.3 tok/s for KIVI at 4k on
    llama-100m, against 0.26 million and 5.6 tok/s with every block kept on the heap and no trimming. Process-wide
    and idempotent; nothing happens without glibc. `release_freed_host_memory` hands it back.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def release_freed_host_memory() -> None:
    """Hands the free memory kept for reuse back to the system (glibc), e.g. before measuring a peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
