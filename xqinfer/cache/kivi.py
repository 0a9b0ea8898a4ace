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
        history_k = self.keys.read(step.length, step.history_positions)
        if self.prerope:
            history_k = apply_rotary(history_k, *step.history_rope)
        history_v = self.values.read(step.length, step.history_positions)
        self.keys.write(k if self.prerope else k_rotated, positions)
        self.values.write(v, positions)
        keys = torch.cat((history_k, k_rotated), dim=-2)
        values = torch.cat((history_v, v), dim=-2)
        return attend(q, keys, values, step.mask)

    def tensors(self) -> list[Tensor]:
        return self.keys.tensors() + self.values.tensors()

