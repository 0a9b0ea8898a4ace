"""KIVI's quantizer with per-layer choices (bits, calibration, shared codes): the base of `kivi`, `asymkv` and
`xquant-kv`. Keys are quantized per channel, values per token, the newest tokens kept in full precision.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from ..attention import attend
from ..kernels.cpu import KiviStore, StreamArrays
from ..rope import apply_rotary
from . import kv_decode
from .base import Cache, CacheSpec, LayerCache, Step, refuse
from .stream import FULL_PRECISION, QuantStream, stored_bits


class KVQuantCache(Cache):
    """K per channel and V per token with KIVI's groups and residual; subclasses decide bits and sharing per layer."""

    @classmethod
    def validate(cls, spec: CacheSpec) -> None:
        if spec.options["residual"] % spec.options["group"]:
            refuse(spec, "residual must be a multiple of group (keys are flushed to quantized groups R at a time)")

    @classmethod
    def key_bits(cls, spec: CacheSpec, index: int) -> int:
        return spec.options["bits"]

    @classmethod
    def value_bits(cls, spec: CacheSpec, index: int) -> int:
        return spec.options["bits"]

    @classmethod
    def shares_key_codes(cls, spec: CacheSpec, index: int) -> bool:
        """Whether layer `index` reads its keys' codes from layer index - 1 (XQuant-KV)."""
        return False

    @classmethod
    def shares_value_codes(cls, spec: CacheSpec, index: int) -> bool:
        return False

    @classmethod
    def eta(cls, spec: CacheSpec, bits: int) -> float:
        """Calibration of dequantization for codes of `bits` bits (0: plain)."""
        return 0.0

    @property
    def always_concat(self) -> bool:
        return True

    @property
    def prerope(self) -> bool:
        return bool(self.spec.options.get("prerope", 0))

    def capacity_multiple(self) -> int:
        return self.spec.options["group"]

    @cached_property
    def kernel_unusable(self) -> str | None:
        """Why decode steps keep the torch path instead of the CPU kernel (None: they take the kernel)."""
        if self.prerope:
            return "prerope=1 rotates the keys after dequantizing them"
        widths = {bits for layer in self.layers for bits in (layer.keys.bits, layer.values.bits)}
        return kv_decode.unusable(self, widths, {layer.values.group for layer in self.layers})

    @cached_property
    def stores_in_kernel(self) -> bool:
        """Whether the kernel path's decode steps also store their token in one call (`kv_decode.store`): float32
        rows and float16 scales, as `kernels.cpu.KiviStore` writes them."""
        return self.dtype == torch.float32 and all(layer.values.scale.dtype == torch.float16 for layer in self.layers)

    def make_layer(self, index: int) -> LayerCache:
        return KVQuantLayer(self, index)

    @classmethod
    def layer_bits_per_element(cls, spec: CacheSpec, config, index: int, dtype: torch.dtype = torch.float16) -> float:
        key_bits, value_bits = cls.key_bits(spec, index), cls.value_bits(spec, index)
        if FULL_PRECISION in (key_bits, value_bits):
            return float(torch.finfo(dtype).bits)
        group = spec.options["group"]
        # Keys: groups of tokens, which tile the capacity; values: groups of channels within a head (ragged when the
        # group does not divide head_dim).
        keys = stored_bits(0 if cls.shares_key_codes(spec, index) else key_bits, group)
        values = stored_bits(0 if cls.shares_value_codes(spec, index) else value_bits, group, config.head_dim)
        return (keys + values) / 2

    @classmethod
    def residual_elements(cls, spec: CacheSpec, config, index: int) -> int:
        # Keys are grouped per channel: their ring holds at least the open group.
        residual, group = spec.options["residual"], spec.options["group"]
        return (max(residual, group) + residual) * config.kv_dim

    @classmethod
    def bits_label(cls, spec: CacheSpec, config) -> str:
        return f"{cls.code_bits(spec, config):g}"

    @classmethod
    def code_bits(cls, spec: CacheSpec, config) -> float:
        total = 0
        for index in range(config.num_layers):
            total += 0 if cls.shares_key_codes(spec, index) else cls.key_bits(spec, index)
            total += 0 if cls.shares_value_codes(spec, index) else cls.value_bits(spec, index)
        return total / (2 * config.num_layers)


class KVQuantLayer(LayerCache):
    def __init__(self, parent: KVQuantCache, index: int) -> None:
        super().__init__(parent, index)
        spec, config = parent.spec, parent.config
        lead = (parent.batch_size, config.num_kv_heads)
        common = dict(capacity=parent.capacity, channels=config.head_dim, group=spec.options["group"],
                      residual=parent.residual, dtype=parent.dtype, device=parent.device)
        kind = type(parent)
        previous = parent.layers[index - 1] if index else None
        key_bits, value_bits = kind.key_bits(spec, index), kind.value_bits(spec, index)
        self.keys = QuantStream(lead, axis="channel", bits=key_bits, eta=kind.eta(spec, key_bits),
                                codes_from=previous.keys if kind.shares_key_codes(spec, index) else None, **common)
        self.values = QuantStream(lead, axis="token", bits=value_bits, eta=kind.eta(spec, value_bits),
                                  codes_from=previous.values if kind.shares_value_codes(spec, index) else None,
                                  **common)

    @cached_property
    def kernel_arrays(self) -> tuple[StreamArrays, StreamArrays]:
        return kv_decode.kernel_arrays(self.keys), kv_decode.kernel_arrays(self.values)

    @cached_property
    def kernel_store(self) -> KiviStore:
        return kv_decode.kernel_store(self.keys, self.values)

    def attend(self, step: Step, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        prerope, positions = self.parent.prerope, step.positions
        kernel = positions.shape[0] == 1 and not step.concat and self.parent.kernel_unusable is None
        self.note_decode_path(step, "cpu" if kernel else "torch")
        if kernel:
            # CPU decode: the token stored in one call where the kernel can (the CPU kernel path never stores keys
            # before RoPE), attention straight from the codes, the history never dequantized into memory.
            if self.parent.stores_in_kernel:
                kv_decode.store(self.kernel_store, self.keys, self.values, k, v, step)
            else:
                self.keys.write(kv_decode.rotate(k, step), positions, step.shared)
                self.values.write(v, positions, step.shared)
            keys, values = self.kernel_arrays
            keys = kv_decode.stream_arrays(keys, self.keys, step)
            values = kv_decode.stream_arrays(values, self.values, step)
            return kv_decode.attend(q, keys, values, step, self.projection.scale)
        k_rotated = apply_rotary(k, step.cos, step.sin)
        stored_k = k if prerope else k_rotated

        def write() -> None:
            self.keys.write(stored_k, positions, step.shared)
            self.values.write(v, positions, step.shared)

        def read() -> tuple[Tensor, Tensor]:
            keys = self.keys.read(step.stored_length, step.stored_positions, step.shared)
            if prerope:
                keys = apply_rotary(keys, *step.stored_rope)
            return keys, self.values.read(step.stored_length, step.stored_positions, step.shared)

        keys, values = step.read_around_write(write, read)
        if step.concat:
            new_k, new_v = k_rotated, v
            if self.parent.simulate:
                new_k = self.keys.simulate(stored_k)
                new_k = apply_rotary(new_k, step.cos, step.sin) if prerope else new_k
                new_v = self.values.simulate(v)
            keys = torch.cat((keys, new_k), dim=-2)
            values = torch.cat((values, new_v), dim=-2)
        return attend(q, keys, values, step.mask, self.projection.scale)

    def tensors(self) -> list[Tensor]:
        return self.keys.tensors() + self.values.tensors()
