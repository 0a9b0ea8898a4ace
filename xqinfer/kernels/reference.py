"""The pure-torch latent attention of one decode step: the fallback of the fused kernels and their test reference.

It computes exactly what `xquant.XQuantGQALayer.attend` does for a decode step with `absorb=1`, up to the final
value projection, from the cache's raw buffers instead of from `QuantStream.read`:

    L̂k = dequantize(key codes)   (per channel: one scale/zero per G tokens of a channel)   [B, span, C]
    L̂v = dequantize(value codes) (per token: one scale/zero per G channels of a token)    [B, span, C]
         (channel c's group is c // G: a token has ceil(C / G) groups, the last one ragged when G does not divide C)
    recent tokens (the full-precision residual window) are taken from `exact` instead      (Override)
    K  = RoPE(L̂k · Mk)            split per KV head                                         [B, Hkv, span, D]
    p  = softmax(q·Kᵀ / sqrt(D))  under the mask, the GQA group of query heads per KV head   [B, H, span]
    out = p · L̂v                                                                            [B, H, C]

Each stream comes in as a `QuantizedHistory` (its codes, scales, zeros, width and residual `Override`):

    keys = QuantizedHistory(key_codes, key_scale, key_zero, key_bits, Override(recent, ring, rows))
    values = QuantizedHistory(value_codes, value_scale, value_zero, value_bits)
    out = latent_attention_reference(q, keys, values, mk, cos, sin, mask, group)  # [B, H, C]

The caller multiplies `out` by Mv per head (`out[:, h] @ Mv[:, h·D:(h+1)·D]`). The same code serves XQuant on an MHA
model with `key_axis="token"`: keys and values are then both the per-token X stream and `mk = Wkᵀ` (see
`x_attention_reference`). Shapes, validation and the meaning of every argument are documented on `QuantizedHistory`
and `latent_attention_reference`; `xqinfer.kernels.fused_latent_attention` takes the very same arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .. import quant
from ..attention import attention_weights, rebuild_keys

__all__ = [
    "KernelConfig",
    "Override",
    "QuantizedHistory",
    "Shapes",
    "check_inputs",
    "latent_attention_reference",
    "x_attention_reference",
]


class Override(NamedTuple):
    """Tokens read in full precision instead of from their codes (the residual window of `QuantStream.read`).

    * ``recent`` [span] bool: token ``j`` takes ``exact`` instead of its dequantized codes.
    * ``exact`` [B, R, C] in the model dtype: the full-precision rows. Without ``rows`` it is dense, ``R = span``
      (row ``j`` is token ``j``); with ``rows`` it can be the stream's ring itself (no gather, no copy).
    * ``rows`` [span] integer, optional: the row of ``exact`` holding token ``j`` (``position % ring_size`` for a
      `QuantStream` ring). Only read where ``recent`` is true.
    """

    recent: Tensor
    exact: Tensor
    rows: Tensor | None = None


# eq=False: a generated __eq__ would compare tensors, whose truth value is ambiguous.
@dataclass(frozen=True, eq=False)
class QuantizedHistory:
    """One quantized stream as the kernels read it: slots [0, span) of a `QuantStream` and its residual window.

    B batch, C latent width, G the effective group (see ``group`` on `latent_attention_reference`):

    * ``codes`` [B, span, packed_size(C, bits)] uint8, as `quant.pack` lays them out (one row per token).
    * ``scale``, ``zero``: per channel (keys with ``key_axis="channel"``) [B, span // G, C]; per token (values, and
      keys with ``key_axis="token"``) [B, span, ceil(C / G)] (the last group of a row ragged when G does not divide
      C, as `quant.to_groups` makes it). fp16 as stored (any float dtype works).
    * ``bits``: the code width, one of `quant.BITS`.
    * ``override``: the stream's residual window (`Override`); None when every token is read from its codes.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    override: Override | None = None


@dataclass(frozen=True)
class KernelConfig:
    """Tiling of the fused kernel (ignored by the torch reference). ``None`` picks a default for the device.

    * ``block_n``: tokens per tile (rows of the rebuild matmul), a power of two >= 16.
    * ``kv_block``: KV heads whose keys one program rebuilds from each dequantized latent tile (a power of two
      dividing the KV heads): amortizes the dequantization over heads, at the cost of registers.
    * ``block_c``: latent channels per step of the rebuild matmul (its reduction dim), a power of two >= 16.
    * ``block_cv``: latent channels per output chunk of the value pass, a power of two >= 16.
    * ``splits``: programs per (batch, KV head) along the sequence (flash-decoding); each one gets a whole number
      of tiles.
    * ``num_warps``, ``num_stages``: Triton launch options of the key kernel (the heavy one).
    """

    block_n: int | None = None
    kv_block: int | None = None
    block_c: int | None = None
    block_cv: int | None = None
    splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


@dataclass(frozen=True)
class Shapes:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    span: int
    channels: int
    key_group: int  # effective: tokens per group (key_axis="channel") or channels per group ("token")
    value_group: int  # effective: channels per group of a token
    key_axis: str


def _q3(q: Tensor) -> Tensor:
    """q [B, H, D] or [B, H, 1, D] (one decode token) -> [B, H, D]."""
    if q.dim() == 4:
        if q.shape[2] != 1:
            raise ValueError(f"latent attention is for one decode token per sequence; q has T={q.shape[2]}")
        return q[:, :, 0, :]
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D] or [B, H, 1, D]; got shape {tuple(q.shape)}")
    return q


def _mask2(mask: Tensor, batch: int, span: int) -> Tensor:
    """mask [span], [1, span] or [B, span] (bool) -> [B or 1, span] bool."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True where the token is attended); got {mask.dtype}")
    m = mask.reshape(1, -1) if mask.dim() == 1 else mask
    if m.dim() != 2 or m.shape[-1] != span or m.shape[0] not in (1, batch):
        raise ValueError(f"mask must be [span], [1, span] or [B, span] with span={span}, B={batch}; "
                         f"got {tuple(mask.shape)}")
    return m


def check_inputs(q: Tensor, keys: QuantizedHistory, values: QuantizedHistory, mk: Tensor, cos: Tensor, sin: Tensor,
                 mask: Tensor, group: int, key_axis: str) -> Shapes:
    """Validates every shape (never the data: no host sync) and returns the problem's sizes."""
    if key_axis not in ("channel", "token"):
        raise ValueError(f"key_axis must be 'channel' (GQA key latents) or 'token' (MHA X); got {key_axis!r}")
    streams = (("keys", keys), ("values", values))
    for name, history in streams:
        if history.bits not in quant.BITS:
            raise ValueError(f"{name}.bits must be one of {quant.BITS}; got {history.bits!r}")
    q3 = _q3(q)
    batch, heads, head_dim = q3.shape
    channels, kv_dim = mk.shape
    if kv_dim % head_dim:
        raise ValueError(f"mk [C, kv_dim] must have kv_dim a multiple of head_dim={head_dim}; got {tuple(mk.shape)}")
    kv_heads = kv_dim // head_dim
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot be grouped over {kv_heads} KV heads")
    if head_dim % 2:
        raise ValueError(f"rotate-half RoPE needs an even head_dim; got {head_dim}")
    if keys.codes.dim() != 3 or keys.codes.shape[0] != batch:
        raise ValueError(f"keys.codes must be [B, span, packed] with B={batch}; got {tuple(keys.codes.shape)}")
    span = keys.codes.shape[1]
    for name, history in streams:
        expected = (batch, span, quant.packed_size(channels, history.bits))
        if tuple(history.codes.shape) != expected or history.codes.dtype != torch.uint8:
            raise ValueError(f"{name}.codes must be uint8 {expected} (C={channels} from mk, {history.bits} bits); "
                             f"got {history.codes.dtype} {tuple(history.codes.shape)}")
    if key_axis == "channel":
        key_group = quant.effective_group(span, group, "channel")
        key_params = (batch, span // key_group, channels)
    else:
        key_group = quant.effective_group(channels, group, "token")
        key_params = (batch, span, quant.group_count(channels, key_group))
    value_group = quant.effective_group(channels, group, "token")
    value_params = (batch, span, quant.group_count(channels, value_group))
    for name, history, expected in (("keys", keys, key_params), ("values", values, value_params)):
        for field, t in (("scale", history.scale), ("zero", history.zero)):
            if tuple(t.shape) != expected:
                raise ValueError(f"{name}.{field} must be {expected} (group={group}, key_axis={key_axis!r}); "
                                 f"got {tuple(t.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (span, head_dim):
            raise ValueError(f"{name} must be [span, head_dim] = {(span, head_dim)}; got {tuple(t.shape)}")
    _mask2(mask, batch, span)
    for stream, history in streams:
        o = history.override
        if o is None:
            continue
        name = f"{stream}.override"
        if tuple(o.recent.shape) != (span,) or o.recent.dtype != torch.bool:
            raise ValueError(f"{name}.recent must be bool [span={span}]; got {o.recent.dtype} {tuple(o.recent.shape)}")
        if o.exact.dim() != 3 or o.exact.shape[0] != batch or o.exact.shape[2] != channels:
            raise ValueError(f"{name}.exact must be [B, R, C] = [{batch}, R, {channels}]; got {tuple(o.exact.shape)}")
        if o.rows is None and o.exact.shape[1] != span:
            raise ValueError(f"{name}.exact without rows must be dense [B, span, C]; got {tuple(o.exact.shape)}")
        if o.rows is not None and (tuple(o.rows.shape) != (span,) or o.rows.is_floating_point()):
            raise ValueError(f"{name}.rows must be integer [span={span}]; got {o.rows.dtype} {tuple(o.rows.shape)}")
    return Shapes(batch, heads, kv_heads, head_dim, span, channels, key_group, value_group, key_axis)


def _read(history: QuantizedHistory, group: int, axis: str, channels: int, dtype: torch.dtype, eta: float) -> Tensor:
    """The stream as [B, span, C] in `dtype`, exactly as `QuantStream.read` reads it (recent tokens from `exact`)."""
    layout = quant.Layout(history.bits, group, axis, eta, packer=quant.BitPacker(history.bits, history.codes.device))
    values = layout.dequantize(layout.unpack(history.codes, channels), history.scale, history.zero, dtype)
    override = history.override
    if override is None:
        return values
    exact = override.exact
    if override.rows is not None:
        exact = exact.index_select(1, override.rows.long())
    return torch.where(override.recent[:, None], exact.to(values.dtype), values)


def latent_attention_reference(q: Tensor, keys: QuantizedHistory, values: QuantizedHistory, mk: Tensor, cos: Tensor,
                               sin: Tensor, mask: Tensor, group: int, *, eta: float = 0.0, key_axis: str = "channel",
                               scale: float | None = None, config: KernelConfig | None = None) -> Tensor:
    """Attention of one decode token over quantized latents, absorbed: returns ``p · L̂v`` [B, H, C] in q's dtype.

    Arguments (B batch, H query heads, Hkv KV heads, D head_dim, C latent width, G = ``group``):

    * ``q`` [B, H, D] or [B, H, 1, D]: the rotated query of the step (model dtype: bf16, fp16 or fp32).
    * ``keys``: the key latents (`QuantizedHistory`), scales and zeros per channel (``key_axis="channel"``) or per
      token (``key_axis="token"``), and their residual window.
    * ``values``: the value latents (`QuantizedHistory`), scales and zeros per token, and their residual window.
    * ``mk`` [C, Hkv·D]: the key rebuild, ``K = L̂k · mk`` (``Mk`` for GQA latents, ``Wkᵀ`` for MHA X).
    * ``cos``, ``sin`` [span, D]: rotate-half RoPE tables at the tokens' positions (``step.stored_rope``).
    * ``mask`` bool [span], [1, span] or [B, span]: True where token ``j`` is attended (``step.mask`` of a
      decode step). Masked slots may hold anything, even codes whose scale is inf or NaN.
    * ``group``: the spec's group size; the effective group follows `quant.effective_group` (``min(G, span)``
      tokens per channel group, ``min(G, C)`` channels per token group). ``span`` must be a multiple of the former;
      the last group of a per-token row may be shorter (ragged).
    * ``eta``: XQuant-KV's calibration of the dequantization (`quant.calibrated_params`).
    * ``scale``: the softmax scale of the scores (the layer's `KVProjection.scale`); None: 1/sqrt(D).
    * ``config``: tiling of the fused kernel; ignored here.

    Latents are dequantized to q's dtype (like `QuantStream.read`), the softmax is in fp32 and its weights are cast
    back to q's dtype before the weighted sum, as in `attention.attend_rebuilt`. Two deliberate differences from it:
    masked tokens' values are zeroed before the sum (garbage in an empty slot cannot turn into NaN through
    ``0 · inf``), and a row with no allowed token returns zeros instead of NaN.
    """
    del config
    shapes = check_inputs(q, keys, values, mk, cos, sin, mask, group, key_axis)
    q3 = _q3(q)
    dtype = q3.dtype
    b, h, d, span, c = shapes.batch, shapes.heads, shapes.head_dim, shapes.span, shapes.channels
    key_latents = _read(keys, shapes.key_group, key_axis, c, dtype, eta)
    value_latents = _read(values, shapes.value_group, "token", c, dtype, eta)
    allowed = _mask2(mask, b, span)  # [B or 1, span]

    k = rebuild_keys(key_latents, mk.to(dtype), None, d, cos.to(dtype), sin.to(dtype))  # [B, Hkv, span, D]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    weights = attention_weights(q3[:, :, None], k, allowed[:, None, None, :], scale)  # [B, Hkv, group, span]
    weights = torch.nan_to_num(weights, nan=0.0)  # a row with nothing allowed: 0/0 -> zeros
    value_latents = value_latents.masked_fill(~allowed[:, :, None], 0.0)
    out = weights @ value_latents.unsqueeze(1)  # [B, Hkv, group, C]
    return out.reshape(b, h, c)


def x_attention_reference(q: Tensor, x: QuantizedHistory, wk_t: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                          group: int, *, eta: float = 0.0, scale: float | None = None,
                          config: KernelConfig | None = None) -> Tensor:
    """XQuant on an MHA model: the cache holds X per token; ``K = RoPE(X̂ · Wkᵀ)``, output ``p · X̂`` [B, H, d].

    ``x`` is the X stream (scales and zeros per token, its residual window as the override); ``wk_t`` [d, H·D] is
    ``attention.wk.T``, the key rows of the fused q|k|v weight transposed (a view is fine). The caller applies
    ``Wvᵀ`` per head afterwards.
    """
    return latent_attention_reference(q, x, x, wk_t, cos, sin, mask, group, eta=eta, key_axis="token", scale=scale,
                                      config=config)
