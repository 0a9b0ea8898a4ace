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


def kernel_arrays(stream: QuantStream, lift: bool = False) -> cpu.StreamArrays:
    """`stream`'s buffers as the kernel reads them; made once per layer (the buffers never move), each step adding
    its ring reads (`stream_arrays`). `lift`: a stream of one "KV head" per sequence ([B, rows, C] -> [B, 1, rows,
    C]), as XQuant's latents are read."""
    owner = stream
    while owner.codes is None:  # shared codes (XQuant-KV): the buffer of the layer that stores them
        owner = owner.codes_from
    view = _lifted if lift else _as_is
    ring = stream.ring if stream.ring_size and stream.ring.dtype == torch.float32 else None
    # Scale and zero as stored (fp16), calibrated in the kernel: no per-step cast or calibration of the history's.
    return cpu.StreamArrays(view(owner.codes), stream.bits, stream.group, view(stream.scale), view(stream.zero),
                            view(ring), quant.calibration(stream.bits, stream.eta))


def _lifted(t: Tensor | None) -> Tensor | None:
    """[B, rows, C] -> [B, 1, rows, C]: a stream of one "KV head" per sequence, as the kernels read it."""
    return None if t is None else t.unsqueeze(1)


def _as_is(t: Tensor | None) -> Tensor | None:
    return t


RING_READS = "cpu kernel: ring reads"


def stream_arrays(arrays: cpu.StreamArrays, stream: QuantStream, step: Step, lift: bool = False) -> cpu.StreamArrays:
    """`arrays` (`kernel_arrays(stream, lift)`) with this step's ring reads, after its write."""
    if not stream.ring_size:
        return arrays
    key = (RING_READS, stream.recent_key, stream.ring_size)  # the same for every layer's stream of that rule
    reads = step.shared.get(key)
    if reads is None:
        recent, rows = stream.ring_reads(step.stored_length, step.stored_positions, step.shared)
        reads = step.shared[key] = recent.contiguous(), rows.contiguous()
    ring = None if stream.ring.dtype == torch.float32 else stream.ring.float()
    return arrays.read_ring(*reads, _lifted(ring) if lift else ring)


def kernel_store(keys: QuantStream, values: QuantStream, lift: bool = False) -> cpu.KiviStore:
    """The one-call store of a layer's per-channel keys and per-token values (`store`), bound to their buffers
    (`lift`: as in `kernel_arrays`)."""
    view = _lifted if lift else _as_is
    return cpu.KiviStore(view(keys.ring), view(values.codes), view(values.scale), view(values.zero), values.bits,
                         values.group, view(values.ring) if values.ring_size else None)


def store(binding: cpu.KiviStore, keys: QuantStream, values: QuantStream, k: Tensor, v: Tensor, step: Step,
          rotate: bool = True) -> None:
    """Stores the step's one token k, v [B, Hkv, 1, D] (k before RoPE; `rotate=False`: stored as it is) as
    `keys.write` and `values.write` would, per-channel keys and per-token values: both rings and the value's codes
    in one call (`binding`, `kernel_store(keys, values)`), then the keys' group when the token closes it (once in
    `group` steps)."""
    position = step.shared[FIRST_POSITION]
    cos, sin = (step.cos, step.sin) if rotate else (None, None)
    binding(k, v, cos, sin, position % keys.ring_size, position % values.capacity,
            position % values.ring_size if values.ring_size else 0)
    close_key_group(keys, step)


def close_key_group(keys: QuantStream, step: Step) -> None:
    """`keys.store_closing_group` for a CPU decode step: when its token closes the group, the group's ring rows
    quantized in one call (`kernels.cpu.store_key_group`), or in torch where the kernel does not quantize as the
    stream does (a clip search, scales not float16)."""
    position, g = step.shared[FIRST_POSITION], keys.group
    if (position + 1) % g:
        return  # the token does not close its group: nothing is stored
    if keys.layout.clip or keys.scale.dtype != torch.float16 or keys.bits not in cpu.BITS:
        keys.store_closing_group(step.positions, step.shared)
        return
    group = position // g
    ring_row, slot = group % (keys.ring_size // g) * g, group * g % keys.capacity
    params = group % (keys.capacity // g)
    codes = None if keys.codes is None else keys.codes[..., slot:slot + g, :]
    cpu.store_key_group(keys.ring[..., ring_row:ring_row + g, :], keys.bits, codes,
                        keys.scale[..., params:params + 1, :], keys.zero[..., params:params + 1, :])


def attend(q: Tensor, keys: cpu.StreamArrays, values: cpu.StreamArrays, step: Step, scale: float) -> Tensor:
    """Attention output [B, H, 1, D] of one decode step over what the layer holds after storing its token."""
    batch, heads, length, dim = q.shape
    kv_heads = keys.codes.shape[1]
    grouped = (q if q.dtype == torch.float32 else q.float()).reshape(batch, kv_heads, heads // kv_heads * length, dim)
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
