"""Fused GPU kernels (Triton) for the XQuant decode step, with their pure-torch fallback.

Rebuilding K from quantized latents over a long history is arithmetic-bound (2·C·kv_dim flops per token and layer),
so XQuant's decode speed rests on never writing the dequantized history to memory. `fused_latent_attention` does
one decode step (one query token per sequence) from the cache's raw buffers: unpack + dequantize the key latents,
K = L̂k·Mk per KV head on tensor cores, RoPE, GQA scores, softmax, and the weighted sum of the dequantized value
latents (V absorbed: the caller applies Mv per head). `fused_x_attention` is the same for XQuant on MHA models
(X per token, K = X̂·Wkᵀ, output p·X̂).

    from xqinfer.kernels import Override, QuantizedHistory, latent_attention
    keys = QuantizedHistory(kc, ks, kz, kbits, Override(recent, ring, rows))  # codes, scale, zero, bits, override
    values = QuantizedHistory(vc, vs, vz, vbits)
    out = latent_attention(q, keys, values, mk, cos, sin, mask, group)  # [B, H, C]

`latent_attention` dispatches: the Triton kernel when `triton_available()` and the tensors qualify
(`fused_supported`), else `latent_attention_reference`, the torch path, which is also the test reference. Triton is
an optional dependency (`pip install xqinfer[triton]`); this package imports without it.

Modules: `reference` (the torch path, argument checks, `QuantizedHistory`, `Override`, `KernelConfig`) and `fused`
(the Triton kernels, imported only when used). Both take tensors only; the glue that turns an `xquant` layer's
streams into these arguments is `xqinfer/cache/xquant_decode.py`.
"""

from __future__ import annotations

import os

from torch import Tensor

from .reference import KernelConfig, Override, QuantizedHistory, latent_attention_reference, x_attention_reference

__all__ = [
    "KernelConfig",
    "Override",
    "QuantizedHistory",
    "fused_latent_attention",
    "fused_supported",
    "fused_x_attention",
    "latent_attention",
    "latent_attention_reference",
    "triton_available",
    "x_attention",
    "x_attention_reference",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """Triton imports and can run: a CUDA device is present, or TRITON_INTERPRET=1 (its CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:  # absent, or a broken install (e.g. a CUDA build mismatch): unavailable either way
        return False
    import torch

    return torch.cuda.is_available() or _interpreting()


def fused_supported(q: Tensor, mk: Tensor) -> str | None:
    """None when the fused path can run on these tensors, else why not (no triton, CPU tensors, head_dim...)."""
    if not triton_available():
        return "triton is not installed, or there is neither CUDA nor TRITON_INTERPRET=1"
    from .fused import supported

    return supported(q, mk)


def fused_latent_attention(*args, **kwargs) -> Tensor:
    """The Triton kernel; same arguments as `latent_attention_reference` (see there). Raises if it cannot run."""
    if not triton_available():
        raise RuntimeError("fused_latent_attention needs triton and CUDA (or TRITON_INTERPRET=1 on CPU); "
                           "install it with: pip install 'xqinfer[triton]'")
    from .fused import fused_latent_attention as run

    return run(*args, **kwargs)


def fused_x_attention(*args, **kwargs) -> Tensor:
    """The Triton kernel for MHA XQuant; same arguments as `x_attention_reference`. Raises if it cannot run."""
    if not triton_available():
        raise RuntimeError("fused_x_attention needs triton and CUDA (or TRITON_INTERPRET=1 on CPU); "
                           "install it with: pip install 'xqinfer[triton]'")
    from .fused import fused_x_attention as run

    return run(*args, **kwargs)


def latent_attention(q: Tensor, keys: QuantizedHistory, values: QuantizedHistory, mk: Tensor, cos: Tensor, sin: Tensor,
                     mask: Tensor, group: int, *, eta: float = 0.0, key_axis: str = "channel",
                     scale: float | None = None, config: KernelConfig | None = None) -> Tensor:
    """The fused kernel when it can run on these tensors, else the torch reference (same arguments and result)."""
    run = fused_latent_attention if fused_supported(q, mk) is None else latent_attention_reference
    return run(q, keys, values, mk, cos, sin, mask, group, eta=eta, key_axis=key_axis, scale=scale, config=config)


def x_attention(q: Tensor, x: QuantizedHistory, wk_t: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, group: int, *,
                eta: float = 0.0, scale: float | None = None, config: KernelConfig | None = None) -> Tensor:
    """MHA XQuant: the fused kernel when it can run, else `x_attention_reference`."""
    run = fused_x_attention if fused_supported(q, wk_t) is None else x_attention_reference
    return run(q, x, wk_t, cos, sin, mask, group, eta=eta, scale=scale, config=config)
