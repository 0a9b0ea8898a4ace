"""Decode steps through the CPU kernel (`kernels/cpu.py`): the glue that turns a layer's K and V storage (two
QuantStreams of `kivi`, `asymkv` and `xquant-kv`, or the plain buffers of `fp16`) into the kernel's arrays. The torch
path of each layer's `attend` is the kernel's reference."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import quant
from ..kernels import cpu
from ..rope import apply_rotary
from .base import FIRST_POSITION, Cache, Step
from .stream import QuantStream


def unusable(cache: Cache, widths: set[int], value_groups: set[int] = frozenset()) -> str | None:
    """Why the decode steps of `cache`, whose K and V are stored `widths` bits wide (values quantized per token in
    groups of `value_groups` channels), cannot run the CPU kernel (None: they can). One answer for all layers, since
    a layer that shares codes reads its partner's buffer."""
    if not cache.host_steps:
        return "the CPU kernel runs in CPU steps only (never captured in a graph)"
    head_dim = cache.config.head_dim
    if head_dim > cpu.MAX_DIM or head_dim % cpu.LANES:
        return f"the CPU kernel reads heads of a multiple of {cpu.LANES} up to {cpu.MAX_DIM} channels, not {head_dim}"
    if not widths <= {*cpu.BITS, cpu.PLAIN}:
        return f"the CPU kernel reads {', '.join(map(str, cpu.BITS))}-bit codes"
    if cpu.PLAIN in widths and cache.dtype != torch.float32:
        return "the CPU kernel reads plain K and V in float32 only"
    if any(group % cpu.LANES for group in value_groups):
        return f"the CPU kernel reads value groups of a multiple of {cpu.LANES} channels"
    return cpu.unavailable()


def stream_arrays(stream: QuantStream, step: Step) -> cpu.StreamArrays:
    """Slots [0, span) of `stream` as the kernel reads them, after this step's write."""
    owner = stream
    while owner.codes is None:  # shared codes (XQuant-KV): the buffer of the layer that stores them
        owner = owner.codes_from
    # Scale and zero as stored (fp16), calibrated in the kernel: no per-step cast or calibration of the history's.
    calibration = quant.calibration(stream.bits, stream.eta)
    if not stream.ring_size:
        return cpu.StreamArrays(owner.codes, stream.bits, stream.group, stream.scale, stream.zero,
                                calibration=calibration)
    recent, rows = stream.ring_reads(step.stored_length, step.stored_positions, step.shared)
    ring = stream.ring if stream.ring.dtype == torch.float32 else stream.ring.float()
    return cpu.StreamArrays(owner.codes, stream.bits, stream.group, stream.scale, stream.zero, recent, rows, ring,
                            calibration)


def store(keys: QuantStream, values: QuantStream, k: Tensor, v: Tensor, step: Step) -> None:
    """Stores the step's one token k, v [B, Hkv, 1, D] (k before RoPE) as `keys.write` and `values.write` would,
    per-channel keys and per-token values: both rings and the value's codes in one call, then the keys' group in
    torch when the token closes it (once in `group` steps)."""
    position = step.shared[FIRST_POSITION]
    ring = values.ring if values.ring_size else None
    cpu.kivi_store(k, v, step.cos, step.sin, keys.ring, position % keys.ring_size, values.codes, values.scale,
                   values.zero, position % values.capacity, values.bits, values.group, ring,
                   position % values.ring_size if ring is not None else 0)
    keys.store_closing_group(step.positions, step.shared)


def attend(q: Tensor, keys: cpu.StreamArrays, values: cpu.StreamArrays, step: Step, scale: float) -> Tensor:
    """Attention output [B, H, 1, D] of one decode step over what the layer holds after storing its token."""
    batch, heads, length, dim = q.shape
    kv_heads = keys.codes.shape[1]
    grouped = q.to(torch.float32).reshape(batch, kv_heads, heads // kv_heads * length, dim)
    out = cpu.kv_decode_attention(grouped, keys, values, allowed(step), scale).view(batch, heads, length, dim)
    return out if out.dtype == q.dtype else out.to(q.dtype)


def rotate(k: Tensor, step: Step) -> Tensor:
    """The step's one new key [B, Hkv, 1, D] rotated, as `rope.apply_rotary` rotates it."""
    if k.dtype in cpu.DENSE_DTYPES and step.cos.dtype == k.dtype:
        return cpu.dense_rotate(k, step.cos, step.sin)
    return apply_rotary(k, step.cos, step.sin)


ALLOWED = ("cpu kernel: slots the query may attend to",)


def allowed(step: Step) -> Tensor:
    """[span] bool: the mask of the step's one query position, computed once for all layers."""
    mask = step.shared.get(ALLOWED)
    if mask is None:
        mask = step.shared[ALLOWED] = step.mask[0].contiguous()
    return mask
