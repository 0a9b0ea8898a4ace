"""Attention over what a cache holds, and what a layer cache may know of its attention layer.

The model hands each layer cache a `KVProjection` when the cache is built: its key and value projections (with
their biases, if any), the softmax scale and the rotary embedding. Caches never read the model. The functions
below are the one implementation of attention for every method, of the key rebuild and absorbed values that
`xquant` and `xquant-cl` share, and of the torch reference of their fused kernels.

Shapes: B batch, H query heads, Hkv KV heads (H = G·Hkv), D head_dim, T new tokens, N keys, C stored width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .rope import Rotary, apply_rotary


@dataclass(frozen=True, eq=False)
class KVProjection:
    """One attention layer as its cache sees it: `k = x·Wkᵀ + bk`, `v = x·Wvᵀ + bv`, scores scaled by `scale`."""

    wk: Tensor  # [Hkv·D, d]
    wv: Tensor  # [Hkv·D, d]
    bk: Tensor | None
    bv: Tensor | None
    head_dim: int
    scale: float
    rotary: Rotary

    @classmethod
    def plain(cls, wk: Tensor, wv: Tensor, head_dim: int, rotary: Rotary) -> KVProjection:
        """Llama's: no biases, scores scaled by 1/sqrt(head_dim)."""
        return cls(wk, wv, None, None, head_dim, 1.0 / math.sqrt(head_dim), rotary)


def attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Grouped-query attention of q [B, H, T, D] over keys/values [B, Hkv, N, D] under mask [T, N].

    The query heads that share a KV head are folded into the time axis, so K and V are never repeated.
    """
    batch, heads, length, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    if group > 1:
        q = q.reshape(batch, kv_heads, group * length, dim)
        mask = mask.repeat(group, 1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, length, dim)


def project(rows: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """rows [..., C] @ weight_t [C, out] (+ bias): K or V rebuilt from what a cache stores (X, or latents)."""
    out = rows @ weight_t
    return out if bias is None else out + bias


def rebuild_keys(rows: Tensor, weight_t: Tensor, bias: Tensor | None, head_dim: int, cos: Tensor,
                 sin: Tensor) -> Tensor:
    """Keys [B, Hkv, N, D] from stored rows [B, N, C]: projected, split per KV head, rotated at their positions."""
    keys = project(rows, weight_t, bias)
    batch, count, kv_dim = keys.shape
    keys = keys.view(batch, count, kv_dim // head_dim, head_dim).transpose(1, 2)
    return apply_rotary(keys, cos, sin)


def attention_weights(q: Tensor, keys: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Softmax weights [B, Hkv, G·T, N] of q [B, H, T, D] over keys [B, Hkv, N, D], in q's dtype (fp32 softmax).

    `allowed` (bool) broadcasts against the scores: [G·T, N] for a cache's mask, [B, 1, 1, N] for a batched one.
    """
    batch, heads, length, head_dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads * length, head_dim)
    scores = (grouped @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)


def project_heads(mixed: Tensor, weight_t: Tensor, bias: Tensor | None, heads: int) -> Tensor:
    """Absorbed values: mixed [B, Hkv, G·T, C] (weights · stored rows) -> [B, H, T, D], each KV head through its
    own columns of weight_t [C, Hkv·D]. A bias adds as it is, the weights of a row summing to one."""
    batch, kv_heads, rows, width = mixed.shape
    head_dim = weight_t.shape[1] // kv_heads
    per_head = weight_t.view(width, kv_heads, head_dim).transpose(0, 1)  # [Hkv, C, D]
    out = mixed @ per_head
    if bias is not None:
        out = out + bias.view(kv_heads, 1, head_dim)
    return out.reshape(batch, heads, rows * kv_heads // heads, head_dim)


def attend_rebuilt(q: Tensor, keys: Tensor, rows: Tensor, weight_t: Tensor, bias: Tensor | None, mask: Tensor,
                   scale: float, absorb: bool) -> Tensor:
    """Attention whose values are `rows @ weight_t + bias` (V = X·Wvᵀ, or latents·Mv), split per KV head.

    Absorbed: weights · rows first, then the projection, which skips rebuilding V; it pays while the queries are
    few (decode), since the weighted sum then runs over the wider rows instead of V.
    """
    batch, heads, length, head_dim = q.shape
    kv_heads = keys.shape[1]
    if not (absorb and length * heads <= weight_t.shape[1]):
        values = project(rows, weight_t, bias).view(batch, -1, kv_heads, head_dim).transpose(1, 2)
        return attend(q, keys, values, mask, scale)
    weights = attention_weights(q, keys, mask.repeat(heads // kv_heads, 1), scale)
    return project_heads(weights @ rows.unsqueeze(1), weight_t, bias, heads)
