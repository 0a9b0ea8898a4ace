"""`fp16`: the plain KV cache in the model dtype, the baseline every compressed method is judged against (shown as
`kv DTYPE`, the dtype it stores)."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from ..attention import attend
from ..config import dtype_name
from ..kernels.cpu import PLAIN, PlainStore, StreamArrays
from ..rope import apply_rotary
from . import kv_decode
from .base import FIRST_POSITION, Cache, LayerCache, Step, register


@register("fp16")
class FP16Cache(Cache):
    BENCHMARKED = ("fp16",)

    def make_layer(self, index: int) -> LayerCache:
        return FP16LayerCache(self, index)

    @cached_property
    def kernel_unusable(self) -> str | None:
        """Why decode steps keep torch's attention instead of the CPU kernel (None: they take the kernel)."""
        return kv_decode.unusable(self, {PLAIN})

    @classmethod
    def display_name(cls, spec, dtype: torch.dtype) -> str:
        # Named for what it stores, the run dtype: `kv fp32` in an fp32 run, where "fp16" would mislead.
        return f"kv {dtype_name(dtype)}"

    @classmethod
    def layer_bits_per_element(cls, spec, config, index: int, dtype: torch.dtype = torch.float16) -> float:
        return float(torch.finfo(dtype).bits)

    @classmethod
    def code_bits(cls, spec, config) -> float:
        return 16.0

    @classmethod
    def bits_label(cls, spec, config) -> str:
        return "16"


class FP16LayerCache(LayerCache):
    def __init__(self, parent: Cache, index: int) -> None:
        super().__init__(parent, index)
        config = parent.config
        shape = (parent.batch_size, config.num_kv_heads, parent.capacity, config.head_dim)
        self.keys = torch.zeros(shape, dtype=parent.dtype, device=parent.device)
        self.values = torch.zeros(shape, dtype=parent.dtype, device=parent.device)

    @cached_property
    def kernel_arrays(self) -> tuple[StreamArrays, StreamArrays]:
        return StreamArrays.plain(self.keys), StreamArrays.plain(self.values)

    @cached_property
    def kernel_store(self) -> PlainStore:
        return PlainStore(self.keys, self.values)

    def attend(self, step: Step, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scale = self.projection.scale
        if step.positions.shape[0] == 1 and self.parent.kernel_unusable is None:
            # Faster than torch's attention for one query on a CPU (a flash kernel's tiling does not pay there);
            # the store rotates and writes the token in one call, where torch takes a dozen ops.
            self.note_decode_path(step, "cpu")
            slot = step.shared[FIRST_POSITION] % self.parent.capacity
            self.kernel_store(k, v, step.cos, step.sin, slot)
            return kv_decode.attend(q, *self.kernel_arrays, step, scale)
        k = apply_rotary(k, step.cos, step.sin)
        keys, values = self.keys[:, :, : step.span], self.values[:, :, : step.span]
        if step.concat:
            out = attend(q, torch.cat((keys, k), dim=2), torch.cat((values, v), dim=2), step.mask, scale)
        tail = step.slots.shape[0]
        self.keys.index_copy_(2, step.slots, k[:, :, -tail:])
        self.values.index_copy_(2, step.slots, v[:, :, -tail:])
        if step.concat:
            return out
        self.note_decode_path(step, "torch")
        return attend(q, keys, values, step.mask, scale)

    def tensors(self) -> list[Tensor]:
        return [self.keys, self.values]
