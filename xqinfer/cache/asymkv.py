"""`asymkv`: KIVI's quantizer with layer-wise bits (METHODS.md section 5).

Keys of the first `lk` layers and values of the first `lv` layers take 2 bits, every other layer 1 bit.
The defaults, `lk = L, lv = 0` for an L-layer model, are "AsymKV-1.5bit".
"""

from __future__ import annotations

from dataclasses import replace

from .base import CacheSpec, Option, refuse, register
from .kv_quant import KVQuantCache

HIGH_BITS, LOW_BITS = 2, 1


def layer_bits(spec: CacheSpec, high: bool) -> int:
    """2 or 1 bits; a test-only `bits` option (16) switches quantization off for exactness checks."""
    return spec.options.get("bits") or (HIGH_BITS if high else LOW_BITS)


def layer_count_option() -> Option:
    """A layer index option whose default depends on the model (None until resolved)."""
    return Option(None, minimum=0, kind=int)


def resolve_layer_counts(spec: CacheSpec, config, defaults: dict[str, int]) -> CacheSpec:
    """Fills the model-dependent layer counts and refuses ones beyond the model."""
    layers = config.num_layers
    options = dict(spec.options)
    for key, default in defaults.items():
        options[key] = default if options[key] is None else options[key]
        if options[key] > layers:
            refuse(spec, f"{key}={options[key]} exceeds the model's {layers} layers (accepted: 0..{layers})")
    return replace(spec, options=options)


@register("asymkv")
class AsymKVCache(KVQuantCache):
    BENCHMARKED = ("asymkv",)
    OPTIONS = {
        "lk": layer_count_option(),
        "lv": layer_count_option(),
        "group": Option(32, minimum=1),
        "residual": Option(128, minimum=0),
    }

    @classmethod
    def resolve(cls, spec: CacheSpec, config) -> CacheSpec:
        return resolve_layer_counts(spec, config, {"lk": config.num_layers, "lv": 0})

    @classmethod
    def key_bits(cls, spec: CacheSpec, index: int) -> int:
        return layer_bits(spec, index < spec.options["lk"])

    @classmethod
    def value_bits(cls, spec: CacheSpec, index: int) -> int:
        return layer_bits(spec, index < spec.options["lv"])
