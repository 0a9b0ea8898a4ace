"""`kivi`: keys quantized per channel, values per token, the newest tokens in full precision (METHODS.md section 4).

`prerope=1` is KIVI* of the XQuant paper: keys are cached before RoPE and rotated after dequantization.
"""

from __future__ import annotations

from .base import Option, register
from .kv_quant import KVQuantCache


@register("kivi")
class KIVICache(KVQuantCache):
    BENCHMARKED = ("kivi:bits=2", "kivi:bits=2,group=128,prerope=1")
    OPTIONS = {
        "bits": Option(2, choices=(2, 3, 4, 8)),
        "group": Option(32, minimum=1),
        "residual": Option(128, minimum=0),
        "prerope": Option(0, choices=(0, 1)),
    }
