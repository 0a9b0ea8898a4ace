"""`kivi`: keys quantized per channel, values per token, the newest tokens in full precision (METHODS.md section 4).

`prerope=1` is KIVI* of the XQuant paper: keys are cached before RoPE and rotated after dequantization.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rope import apply_rotary
from .base import Cache, CacheSpec, LayerCache, Option, attend, refuse, register
from .stream import FULL_PRECISION, QuantStream, stored_bits


@register("kivi")
class KIVICache(Cache):
    OPTIONS = {
        "bits": Option(2, choices=(2, 3, 4, 8)),
        "group": Option(32, minimum=1),
        "residual": Option(128, minimum=0),
        "prerope": Option(0, choices=(0, 1)),
    }

    @classmethod
    def validate(cls, spec: CacheSpec) -> None:
        if spec.options["residual"] % spec.options["group"]:
            refuse(spec, "residual must be a multiple of group (keys are flushed to quantized groups R at a time)")

    @property
    def always_concat(self) -> bool:
        return True

    def capacity_multiple(self) -> int:
        return self.spec.options["group"]

    def make_layer(self, index: int, model) -> LayerCache:
        return KIVILayerCache(self, index)

    @classmethod
    def layer_bits_per_element(cls, spec: CacheSpec, config, index: int, dtype: torch.dtype = torch.float16) -> float:
        o = spec.options
        if o["bits"] == FULL_PRECISION:
            return float(torch.finfo(dtype).bits)
        key_group = o["group"]  # per channel: groups of tokens, never limited by a dimension
        value_group = min(o["group"], config.head_dim)
        return (stored_bits(o["bits"], key_group) + stored_bits(o["bits"], value_group)) / 2


class KIVILayerCache(LayerCache):
    def __init__(self, parent: KIVICache, index: int) -> None:
        super().__init__(parent, index)
        o, config = parent.spec.options, parent.config
        lead = (parent.batch_size, config.num_kv_heads)
        common = dict(capacity=parent.capacity, channels=config.head_dim, bits=o["bits"], group=o["group"],
                      residual=o["residual"], dtype=parent.dtype, device=parent.device)
        self.prerope = bool(o["prerope"])
        self.keys = QuantStream(lead, axis="channel", **common)
        self.values = QuantStream(lead, axis="token", **common)

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        step = self.parent.step
        k_rotated = apply_rotary(k, step.cos, step.sin)
        stored_k = k if self.prerope else k_rotated

        def write() -> None:
            self.keys.write(stored_k, positions)
            self.values.write(v, positions)

        def read() -> tuple[Tensor, Tensor]:
            keys = self.keys.read(step.stored_length, step.stored_positions)
            if self.prerope:
                keys = apply_rotary(keys, *step.stored_rope)
            return keys, self.values.read(step.stored_length, step.stored_positions)

        keys, values = step.read_around_write(write, read)
        if step.concat:
            new_k, new_v = k_rotated, v
            if self.parent.simulate:
                new_k = self.keys.simulate(stored_k)
                new_k = apply_rotary(new_k, step.cos, step.sin) if self.prerope else new_k
                new_v = self.values.simulate(v)
            keys = torch.cat((keys, new_k), dim=-2)
            values = torch.cat((values, new_v), dim=-2)
        return attend(q, keys, values, step.mask)

    def tensors(self) -> list[Tensor]:
        return self.keys.tensors() + self.values.tensors()

