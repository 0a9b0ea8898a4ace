"""`xquant-kv`: XQuant of Yang et al. (EMNLP 2025), 1-2 bit KV with calibration and shared codes (METHODS.md 6).

KIVI's quantizer with AsymKV-style bits: keys take 2 bits below layer `kq`, else 1 (values likewise with `vq`).
Two additions:
- data-free calibration: codes as usual, dequantized with `ẑ = z + η·s·(2^b - 1)`, `ŝ = (1 - 2η)·s`, η = `eta1`
  for 1-bit codes and `eta2` for 2-bit ones;
- cross-layer code sharing: layers pair as (2i, 2i+1); an odd layer at or above `km` (keys) or `vm` (values)
  stores no codes and reads layer l-1's, with its own scale and zero (its own min/max, then calibrated).
Defaults for an L-layer model: `kq = L, vq = 0, km = L, vm = L/2` (1.375 equivalent bits at L = 32).
"""

from __future__ import annotations

from .asymkv import HIGH_BITS, LOW_BITS, layer_bits, layer_count_option, resolve_layer_counts
from .base import CacheSpec, Option, refuse, register
from .kv_quant import KVQuantCache


@register("xquant-kv")
class XQuantKVCache(KVQuantCache):
    BENCHMARKED = ("xquant-kv",)
    OPTIONS = {
        "kq": layer_count_option(),
        "vq": layer_count_option(),
        "km": layer_count_option(),
        "vm": layer_count_option(),
        "eta1": Option(1 / 6, minimum=0.0, maximum=0.5),
        "eta2": Option(0.045, minimum=0.0, maximum=0.5),
        "group": Option(32, minimum=1),
        "residual": Option(128, minimum=0),
    }

    @classmethod
    def resolve(cls, spec: CacheSpec, config) -> CacheSpec:
        layers = config.num_layers
        spec = resolve_layer_counts(spec, config, {"kq": layers, "vq": 0, "km": layers, "vm": layers // 2})
        for side, bits, share in (("keys", cls.key_bits, cls.shares_key_codes),
                                  ("values", cls.value_bits, cls.shares_value_codes)):
            for index in range(1, layers, 2):
                if share(spec, index) and bits(spec, index) != bits(spec, index - 1):
                    refuse(spec, f"layer {index} would share the {side} codes of layer {index - 1} at another bit "
                                 "width; the layers of a shared pair must use the same bits (move kq/vq to an "
                                 "even layer, or km/vm above it)")
        return spec

    @classmethod
    def key_bits(cls, spec: CacheSpec, index: int) -> int:
        return layer_bits(spec, index < spec.options["kq"])

    @classmethod
    def value_bits(cls, spec: CacheSpec, index: int) -> int:
        return layer_bits(spec, index < spec.options["vq"])

    @classmethod
    def shares_key_codes(cls, spec: CacheSpec, index: int) -> bool:
        return index % 2 == 1 and index >= spec.options["km"]

    @classmethod
    def shares_value_codes(cls, spec: CacheSpec, index: int) -> bool:
        return index % 2 == 1 and index >= spec.options["vm"]

    @classmethod
    def eta(cls, spec: CacheSpec, bits: int) -> float:
        return {LOW_BITS: spec.options["eta1"], HIGH_BITS: spec.options["eta2"]}.get(bits, 0.0)
