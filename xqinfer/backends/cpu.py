"""CPU tricks, applied at load: decode steps through the C kernels (`kernels/dense.c`: a block in two calls), or
without a compiler fp32 weights laid out for MKL's GEMV and one-token products split over the threads; the weights
on huge pages; and freed host memory kept for reuse. Each was measured on the 2-core CPU where xqinfer is
developed."""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import llama
from ..arch.base import Embedding
from ..kernels import cpu as kernels
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


def cpu_linear(x: Tensor, weight: Tensor) -> Tensor:
    """F.linear without bias on a CPU: a decode step's rows through the dense kernel, more through torch."""
    if kernels.dense_usable(x, weight):
        return kernels.dense_linear(x, weight)
    return threaded_linear(x, weight)


class CpuLinear(nn.Linear):
    """nn.Linear without bias, with `cpu_linear`'s forward."""

    def forward(self, x: Tensor) -> Tensor:
        return cpu_linear(x, self.weight)


class CpuEmbedding(Embedding):
    """An Embedding whose output products (tied embeddings) take `cpu_linear`."""

    def as_linear(self, x: Tensor) -> Tensor:
        return cpu_linear(x, self.weight)


@dataclass(frozen=True)
class DecodeBinding:
    """What a block's decode steps pass the dense kernels, looked up once: nn.Module's attribute lookups cost ~2 us
    each, and a step would make dozens of them in every layer."""

    weights: tuple[Tensor, ...]  # input norm, q|k|v, o, post-attention norm, gate|up, down
    eps: tuple[float, float]
    heads: int
    kv_heads: int
    usable: bool  # the weights are what the kernels read (one dtype they take, dense), in `dtype`
    dtype: torch.dtype


class CpuLlamaBlock(llama.Block):
    """A Llama block whose decode steps run in two kernel calls around the layer cache's attention; any other call
    (a prefill chunk, a dtype or batch the kernels do not take, a step the cache keeps capturable) is the torch
    block's."""

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, layer_cache, step) -> Tensor:
        bound = self.__dict__.get("_decode_binding") or self._bind()
        if (h.shape[1] != 1 or not bound.usable or h.dtype != bound.dtype or cos.dtype != h.dtype
                or h.shape[0] > kernels.MAX_ROWS or h.device.type != "cpu" or not layer_cache.parent.host_steps):
            return super().forward(h, cos, sin, layer_cache, step)
        weights = bound.weights
        x, q, k, v = kernels.dense_attention_input(h, weights[0], bound.eps[0], weights[1], cos, sin, bound.heads,
                                                   bound.kv_heads)
        out = layer_cache.attend(step, x, q, k, v)
        return kernels.dense_block_output(h, out, weights[2], weights[3], bound.eps[1], weights[4], weights[5])

    def _bind(self) -> DecodeBinding:
        attention, mlp = self.self_attn, self.mlp
        modules = (self.input_layernorm, attention.qkv_proj, attention.o_proj, self.post_attention_layernorm,
                   mlp.gate_up_proj, mlp.down_proj)
        weights = tuple(module.weight for module in modules)
        one_row = weights[0][None]  # [1, d] of the weights' dtype and device: what a decode step's input must be
        binding = DecodeBinding(weights, (self.input_layernorm.eps, self.post_attention_layernorm.eps),
                                attention.num_heads, attention.num_kv_heads,
                                kernels.dense_usable(one_row, *weights), one_row.dtype)
        self.__dict__["_decode_binding"] = binding
        return binding

    def _apply(self, fn, *args, **kwargs):
        # A conversion (.to(), .float()) replaces the parameters: bind them again at the next step.
        self.__dict__.pop("_decode_binding", None)
        return super()._apply(fn, *args, **kwargs)


# The CPU variant of each module class: the same parameters, another forward.
CPU_MODULES = {nn.Linear: CpuLinear, Embedding: CpuEmbedding, llama.Block: CpuLlamaBlock}


@dataclass(frozen=True)
class CpuBackend(Backend):
    dtype: torch.dtype

    @property
    def kernels(self) -> bool:
        """Whether decode steps take the C kernels (which read the checkpoint's [out, in] layout)."""
        return self.dtype in kernels.DENSE_DTYPES and kernels.unavailable() is None

    def stored_transposed(self, model: nn.Module) -> set[str]:
        """Without the kernels, the weights of one-token products at least as tall as wide (q|k|v, o, gate|up, the
        output matrix), in fp32.

        MKL's one-token fp32 GEMV streams such a W 1.4-1.8x faster stored [in, out]; down_proj [d, f] is slower that
        way, and in fp16 (10x slower) or bf16 the checkpoint layout wins.
        """
        if self.dtype != torch.float32 or self.kernels:
            return set()
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        multiplied = [module.weight for module in model.modules() if isinstance(module, nn.Linear)]
        multiplied.append(model.output_weight())  # the embedding, when tied
        return {names[id(weight)] for weight in multiplied if weight.shape[0] >= weight.shape[1]}

    def prepare(self, model: nn.Module) -> None:
        keep_freed_host_memory()
        back_with_huge_pages(model.parameters())
        if self.dtype != torch.float32 and not self.kernels:
            return
        for module in model.modules():
            variant = CPU_MODULES.get(type(module))
            if variant is not None and getattr(module, "bias", None) is None:
                module.__class__ = variant


# glibc's mallopt parameters (malloc.h), and Linux's madvise advice (mman.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
HUGE_PAGE_BYTES = 2 << 20


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


def huge_page_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole 2 MiB pages inside each (address, bytes) span, as (address, bytes), each distinct span once."""
    pages = []
    for address, size in dict.fromkeys(spans):
        start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        end = (address + size) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        if end > start:
            pages.append((start, end - start))
    return pages


def back_with_huge_pages(parameters: Iterable[Tensor]) -> int:
    """Asks Linux to keep the weights on 2 MiB pages (madvise MADV_HUGEPAGE, then MADV_COLLAPSE now, kernel 6.1+);
    returns the bytes advised.

    A decode step streams every weight once; with 4 KiB pages that is a TLB miss every 4 KiB. Measured on
    SmolLM2-135M (fp32, 2 threads, depth 512, THP mode `madvise`): decode +3%, prefill +5%. Only the whole huge pages
    inside each storage qualify (about 60% of this model's 6.75 MiB matrices). The collapse copies them once: +0.2 to
    0.5 s at load for these 513 MiB. Advice the kernel refuses (THP off,
    older kernels, file-backed weights) changes nothing, so failures are ignored; nothing happens off Linux.
    """
    libc = _glibc()
    if libc is None:
        return 0
    storages = [t.untyped_storage() for t in parameters if t.device.type == "cpu"]
    advised = 0
    for address, size in huge_page_spans((s.data_ptr(), s.nbytes()) for s in storages):
        for advice in (_MADV_HUGEPAGE, _MADV_COLLAPSE):
            libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), advice)
        advised += size
    return advised


def release_freed_host_memory() -> None:
    """Hands the free memory kept for reuse back to the system (glibc), e.g. before measuring a peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
