"""Group-wise asymmetric uniform quantization and real bit packing: the only place this math lives.

Every cache method calls into this module. METHODS.md section 1 is the specification:

    z = min(g),  s = (max(g) - min(g)) / (2^b - 1),  q = clamp(round((x - z) / s), 0, 2^b - 1),  x̂ = q·s + z

Layout conventions (x is ``[..., T, C]``: any leading dims, then tokens, then channels):

* per-token  (``axis="token"``):   a group is ``g`` consecutive channels of one token.
  ``codes [..., T, packed_size(C, b)]``, ``scale``/``zero`` ``[..., T, ceil(C / g)]``.
* per-channel (``axis="channel"``): a group is ``g`` consecutive tokens of one channel.
  ``codes [..., T, packed_size(C, b)]``, ``scale``/``zero`` ``[..., T // g, C]``.

Codes are always packed along the channel (last) dimension, one packed row per token, for both layouts. So a
cache can preallocate ``[..., capacity, packed_size(C, b)]`` bytes whatever the axis, token ``t``'s codes live in
row ``t``, and quantizing tokens in blocks gives bit-identical bytes to quantizing them all at once.

Group size: ``g = min(group, size of the grouped dim)`` (METHODS.md: "where G exceeds the dimension, the group is
the whole dimension"). Channel ``c`` of a token belongs to group ``c // g``.

Ragged groups (per token only): real widths are not always multiples of the group (SmolLM2's value latents are 192
wide, its hidden size 576, against G = 128). A row of ``C`` channels then has ``ceil(C / g)`` groups, the last one
shorter (192 channels with g = 128: one group of 128 and one of 64). :func:`to_groups` pads such a row with copies
of its last element up to whole groups, which leaves the last group's min and max, hence its scale and zero,
exactly those of its own elements; :func:`from_groups` drops the padding again. When ``g`` divides ``C`` nothing is
padded: the grouped view is the one reshape it always was (same ops, same results). Per channel, groups of tokens
must tile ``T`` (a cache rounds its capacity to a multiple of the group), and a ``T`` that is not a multiple of
``g`` raises ``ValueError``.

Storage rounding (a decision this module owns): scale and zero are stored in ``scale_dtype`` (fp16 by default,
or the model dtype). The stored zero is ``min(g)`` rounded *down* to that dtype and the stored scale is
``(max(g) - zero) / (2^b - 1)`` rounded *up*; codes are then computed from these stored values. This keeps every
element inside ``[zero, zero + (2^b - 1)·scale]``, so the reconstruction error is at most half a stored step for
every element (plus float32 rounding), whatever the storage dtype. Plain round-to-nearest storage would break
that bound at 8 bits with a bf16 scale (255 × bf16's relative error ≈ half a step on its own).
A constant group stores ``scale = 0`` and codes 0 and reconstructs exactly when the constant is representable in
``scale_dtype`` (always true when ``scale_dtype`` is the input's dtype); otherwise it gets a tiny non-zero scale
and its error is still at most half of that. Values beyond the storage dtype's finite range are clamped to it,
so nothing becomes inf or NaN.

All functions are vectorized torch with static shapes: no ``.item()``, no host sync, no data-dependent shapes, so
they can run inside a captured CUDA graph. The math is done in float32 whatever the input dtype.

A cache runs this code for every layer of every decode step, where each torch op is a kernel launch (or, on a CPU,
a dispatch) that costs as much as the arithmetic on a few tokens. So the code issues as few ops as the math allows,
never at the price of a different result: no no-op casts, and stored fp16/bf16 scales and zeros enter float32
arithmetic as they are (a mixed-dtype op widens them exactly, which is what a separate ``.float()`` would do).
Packing takes its shift vectors from a :class:`BitPacker` that a cache makes once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "BITS",
    "Axis",
    "Quantized",
    "Layout",
    "quantize_per_token",
    "quantize_per_channel",
    "dequantize",
    "to_groups",
    "from_groups",
    "group_dim",
    "effective_group",
    "group_count",
    "pad_to_groups",
    "minmax_params",
    "CLIP_RATIOS",
    "clipped_params",
    "quantize_codes",
    "dequantize_codes",
    "calibrated_params",
    "packed_size",
    "pack",
    "unpack",
    "BitPacker",
]

BITS: tuple[int, ...] = (1, 2, 3, 4, 8)
"""Accepted bit widths."""

Axis = Literal["token", "channel"]
_AXES: tuple[str, ...] = ("token", "channel")


# --------------------------------------------------------------------------------------------- validation


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}; got {bits!r}")


def _check_group(group: int) -> None:
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be an integer >= 1 (e.g. 32 or 128); got {group!r}")


def _check_axis(axis: str) -> None:
    if axis not in _AXES:
        raise ValueError(f"axis must be one of {', '.join(repr(a) for a in _AXES)}; got {axis!r}")


def _levels(bits: int) -> int:
    return (1 << bits) - 1


# --------------------------------------------------------------------------------------------- grouping


def effective_group(size: int, group: int, axis: Axis) -> int:
    """The group size actually used along a grouped dimension of ``size``: ``min(group, size)``.

    Per token the last group of a row may be shorter (ragged); per channel the groups must tile the tokens, and a
    ``size`` that is not a multiple of the group raises ``ValueError``.
    """
    _check_axis(axis)
    g = _clipped(size, group)
    if axis == "channel" and size % g != 0:
        raise ValueError(
            f"dimension of size {size} is not a multiple of the group size {g}; groups of tokens must tile it "
            f"(choose a group that divides {size})"
        )
    return g


def group_count(size: int, group: int) -> int:
    """Groups along a dimension of ``size``: ``ceil(size / g)``, ``g = min(group, size)`` (the last one ragged when
    ``g`` does not divide ``size``). The number of scale/zero columns of a per-token row of ``size`` channels."""
    return -(-size // _clipped(size, group))


def _clipped(size: int, group: int) -> int:
    _check_group(group)
    return min(group, size) if size > 0 else group


def group_dim(axis: Axis) -> int:
    """The dimension of a grouped view (see :func:`to_groups`) that one group spans: -1 per token, -2 per channel.

    Also the dimension of ``x [..., T, C]`` that is grouped: channels per token, tokens per channel.
    """
    _check_axis(axis)
    return -1 if axis == "token" else -2


def to_groups(x: Tensor, group: int, axis: Axis) -> Tensor:
    """View ``x [..., T, C]`` so that each quantization group lies along :func:`group_dim` ``(axis)``.

    * ``axis="token"``:   ``[..., T, ceil(C / g), g]``  (groups along dim -1)
    * ``axis="channel"``: ``[..., T // g, g, C]``       (groups along dim -2)

    A view (no copy) when ``x`` is contiguous in its last two dims and ``g`` divides ``C``. A ragged row (per token,
    ``g`` not dividing ``C``) is padded with copies of its last element, which leave the last group's min and max
    unchanged; :func:`from_groups` with the true ``C`` drops them.
    """
    _check_axis(axis)
    if x.dim() < 2:
        raise ValueError(f"expected a tensor [..., T, C] with at least 2 dims; got shape {tuple(x.shape)}")
    *lead, t, c = x.shape
    if axis == "token":
        g = effective_group(c, group, axis)
        x = pad_to_groups(x, g, -1)  # ragged rows only
        return x.reshape(*lead, t, x.shape[-1] // g, g)
    g = effective_group(t, group, axis)
    return x.reshape(*lead, t // g, g, c)


def pad_to_groups(x: Tensor, group: int, dim: int) -> Tensor:
    """``x`` with dimension ``dim`` filled up to a multiple of ``group`` by copies of its last entry, which move
    neither end of the last group, hence neither its scale nor its zero; ``x`` itself when it is one already."""
    size = x.shape[dim]
    pad = (-size) % group
    if not pad:
        return x
    last = x.narrow(dim, size - 1, 1)
    return torch.cat((x, last.expand(*x.shape[:dim], pad, *x.shape[dim:][1:])), dim=dim)


def from_groups(xg: Tensor, axis: Axis, size: int | None = None) -> Tensor:
    """Inverse of :func:`to_groups`: back to ``[..., T, C]``.

    ``size``: the size of the grouped dimension (``x.shape[group_dim(axis)]`` of the tensor that was grouped: ``C``
    per token), which drops the padding of a ragged last group (a view); None keeps every element.
    """
    _check_axis(axis)
    dim = group_dim(axis)
    x = xg.flatten(-2) if axis == "token" else xg.flatten(-3, -2)
    if size is None or x.shape[dim] == size:
        return x
    return x.narrow(dim, 0, size)


# --------------------------------------------------------------------------------------------- core math


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when ``t`` already has that dtype (the no-op call is still a dispatched op)."""
    return t if t.dtype == dtype else t.to(dtype)


def _float32_operand(t: Tensor) -> Tensor:
    """``t`` ready to meet a float32 tensor in one op: as it is when the op's type promotion widens it to float32
    exactly as ``t.float()`` would (integer codes, fp16, bf16), else cast (float64 would promote the op instead).

    Only for an operand whose partner is float32: two fp16 tensors would compute in fp16.
    """
    return t if not t.is_floating_point() or torch.finfo(t.dtype).bits <= 32 else t.float()


@functools.lru_cache(maxsize=None)
def _infinity(direction: float, dtype: torch.dtype) -> Tensor:
    """±inf as a 0-dim CPU tensor, the target of ``nextafter``: broadcast on any device without a fill of its own."""
    with torch.inference_mode(False):  # a plain tensor, usable outside inference mode too
        return torch.tensor(direction, dtype=dtype)


def _round_stored(value: Tensor, dtype: torch.dtype, direction: float) -> Tensor:
    """Cast float32 ``value`` to ``dtype``, rounding toward ``direction`` (+inf: up, -inf: down) instead of nearest.

    Values are first clamped to the dtype's finite range so that storage never yields inf.
    """
    fmax = torch.finfo(dtype).max
    value = value.clamp(-fmax, fmax)
    if dtype == torch.float32:
        return value  # float32 storage is exact: there is no side to be wrong on
    stored = value.to(dtype)
    wrong_side = stored < value if direction > 0 else stored > value
    stepped = torch.nextafter(stored, _infinity(direction, dtype))
    # nextafter cannot leave the finite range here: a value at ±max is representable, so it is never stepped.
    return torch.where(wrong_side, stepped, stored)


def minmax_params(
    xg: Tensor, bits: int, scale_dtype: torch.dtype = torch.float16, dim: int = -1
) -> tuple[Tensor, Tensor]:
    """Scale and zero of each group of a grouped tensor, reducing over ``dim`` (kept, size 1).

    Returns ``(scale, zero)`` in ``scale_dtype``, broadcastable against ``xg``. The zero is ``min`` rounded down
    and the scale ``(max - zero) / (2^b - 1)`` rounded up to ``scale_dtype`` (see the module docstring for why).
    """
    _check_bits(bits)
    xf = _cast(xg, torch.float32)
    # Not torch.aminmax: it picks a different one of -0.0 and +0.0 than amin/amax do, so it changes stored zeros.
    return _range_params(xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True), bits, scale_dtype)


def _range_params(lo: Tensor, hi: Tensor, bits: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Scale and zero, as stored, of the range [lo, hi]: the zero rounded down, the scale rounded up."""
    zero = _round_stored(lo, scale_dtype, float("-inf"))
    # The scale is measured from the zero actually stored, so the top of the range stays covered.
    span = (hi - _float32_operand(zero)).clamp_min(0.0)
    scale = _round_stored(span / _levels(bits), scale_dtype, float("inf"))
    return scale, zero


CLIP_RATIOS: tuple[float, ...] = tuple(1.0 - 0.05 * i for i in range(11))
"""The ranges :func:`clipped_params` tries, as fractions of each group's min-max range (1.0 first: min-max)."""


def clipped_params(
    xg: Tensor,
    bits: int,
    scale_dtype: torch.dtype = torch.float16,
    dim: int = -1,
    eta: float = 0.0,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Like :func:`minmax_params`, but each group's range is the one of :data:`CLIP_RATIOS` (shrunk about the range's
    centre) whose round trip, codes clamped and ``eta`` applied, has the least squared error over the group.

    Clipping the few extreme elements gives every other element a finer step: on Gaussian groups of 384 at 3 bits
    it lowers the error by about a third. The first best ratio wins, so a group min-max reconstructs as well as any
    keeps min-max. ``weight`` (0 or 1, broadcastable against ``xg``) leaves padding out of the error.
    """
    _check_bits(bits)
    xf = _cast(xg, torch.float32)
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    # Every candidate at once along a new leading dimension: a handful of ops per call whatever the ratio count.
    ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32, device=xf.device).view(-1, *([1] * xf.dim()))
    inset = (1.0 - ratios) / 2 * (hi - lo)
    scale, zero = _range_params(lo + inset, hi - inset, bits, scale_dtype)
    codes = quantize_codes(xf, scale, zero, bits)
    error = (dequantize_codes(codes, scale, zero, bits, torch.float32, eta=eta) - xf).square_()
    if weight is not None:
        error = error * weight
    best = error.sum(dim=dim, keepdim=True).argmin(dim=0, keepdim=True)
    return scale.gather(0, best).squeeze(0), zero.gather(0, best).squeeze(0)


def quantize_codes(xg: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes ``clamp(round((x - zero) / scale), 0, 2^b - 1)`` as uint8, same shape as ``xg`` (unpacked).

    ``scale``/``zero`` are the stored values (any float dtype), broadcastable against ``xg``. A group with
    ``scale == 0`` (constant) gets codes 0.
    """
    _check_bits(bits)
    s = _float32_operand(scale)
    # A zero scale divides into inf or NaN here, which the final where replaces: no safe divisor is needed.
    q = torch.round((_cast(xg, torch.float32) - _float32_operand(zero)) / s).clamp_(0, _levels(bits))
    return torch.where(s > 0, q, 0.0).to(torch.uint8)


def calibrated_params(scale: Tensor, zero: Tensor, bits: int, eta: float = 0.0) -> tuple[Tensor, Tensor]:
    """Float32 dequantization parameters, with XQuant-KV's data-free calibration when ``eta != 0``.

    ``ẑ = z + η·s·(2^b - 1)``, ``ŝ = (1 - 2η)·s``: both end levels move inward by ``η`` of the range, which lowers
    the expected error of very low-bit codes (METHODS.md section 6). ``eta = 0`` returns the stored values.
    """
    _check_bits(bits)
    s = _cast(scale, torch.float32)
    if eta == 0.0:
        return s, _cast(zero, torch.float32)
    a, b = calibration(bits, eta)
    return a * s, _float32_operand(zero) + b * s


def calibration(bits: int, eta: float) -> tuple[float, float]:
    """(a, b) of the calibrated parameters ``ŝ = a·s``, ``ẑ = z + b·s`` (see `calibrated_params`)."""
    return 1.0 - 2.0 * eta, eta * _levels(bits)


def dequantize_codes(
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
    *,
    eta: float = 0.0,
) -> Tensor:
    """``codes·ŝ + ẑ`` (unpacked codes, broadcastable scale/zero), computed in float32, returned in ``dtype``.

    ``dtype`` defaults to ``scale.dtype``. ``eta`` is the calibration of :func:`calibrated_params`.
    """
    _check_bits(bits)
    # ŝ and ẑ (one value per group) are cast to float32 first: a CPU does not vectorize an op whose float operands
    # differ in type (1.8x slower measured), and the widening is exact, so no device gets a different result.
    s, z = calibrated_params(scale, zero, bits, eta)
    dtype = dtype if dtype is not None else scale.dtype
    codes = _float32_operand(codes)
    if dtype == torch.float32:
        return torch.addcmul(z, codes, s)
    # Still computed in float32, rounded once as it is stored: a GPU then writes the history once, in `dtype`,
    # instead of a float32 copy and a cast of it (three times the traffic in bf16).
    out = torch.empty(torch.broadcast_shapes(z.shape, codes.shape, s.shape), dtype=dtype, device=codes.device)
    return torch.addcmul(z, codes, s, out=out)


# --------------------------------------------------------------------------------------------- packing


def packed_size(n: int, bits: int) -> int:
    """Bytes needed to pack ``n`` codes of ``bits`` bits: ``ceil(n·b/8)`` for b in {1,2,4,8}, ``ceil(n/8)·3`` for 3."""
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    if bits == 3:
        return -(-n // 8) * 3
    per = 8 // bits
    return -(-n // per)


def _codes_per_unit(bits: int) -> int:
    return 8 if bits == 3 else 8 // bits


class BitPacker:
    """:func:`pack` and :func:`unpack` for one bit width, with their constant vectors made once on one device.

    A cache makes one per stream when it allocates its buffers (before any CUDA-graph capture), so that packing
    inside a decode step launches no ``arange`` of its own; the module functions make a throwaway one per call.
    """

    def __init__(self, bits: int, device: torch.device | str | None = None) -> None:
        _check_bits(bits)
        self.bits = bits
        # Where each code of a unit starts. 3-bit codes straddle bytes, so a unit of 8 is assembled in an int32 word
        # whose 3 bytes start at `byte_shifts`; narrower codes stay inside their byte (8-bit codes are bytes already).
        three = bits == 3
        self.code_shifts = torch.arange(0, 24 if three else 8, bits, device=device,
                                        dtype=torch.int32 if three else torch.uint8)
        self.byte_shifts = torch.arange(0, 24, 8, device=device, dtype=torch.int32) if three else None
        # For 1, 2 and 4 bits, the codes of every possible byte: row b holds byte b's 8 // bits codes, in order, as one
        # word (viewed back as bytes after a lookup, so the machine's byte order cancels out). Unpacking is then one
        # gather of a word per byte, 4x faster on a CPU than shifting each code out (a broadcast over a short last
        # dimension does not vectorize) and no more kernels on a GPU.
        self.words = None
        if bits in (1, 2, 4):
            per_byte = 8 // bits
            byte_values = torch.arange(256, dtype=torch.int32).unsqueeze(-1)
            codes = (byte_values >> torch.arange(0, 8, bits, dtype=torch.int32)) & _levels(bits)
            word = {8: torch.int64, 4: torch.int32, 2: torch.int16}[per_byte]
            self.words = codes.to(torch.uint8).view(word).flatten().to(device)

    def pack(self, codes: Tensor, *, in_range: bool = False) -> Tensor:
        """See :func:`pack`. ``in_range=True`` skips the masking, for codes known to lie in ``[0, 2^b)``."""
        bits = self.bits
        if bits == 8:
            return _cast(codes, torch.uint8)
        n = codes.shape[-1]
        unit = _codes_per_unit(bits)
        pad = (-n) % unit
        if bits == 3 or codes.is_floating_point():
            # Float codes truncate through int32, as they always have; integer codes keep their low bits either way.
            codes = _cast(codes, torch.int32)
        c = _cast(codes, self.code_shifts.dtype)
        if not in_range:
            c = c & _levels(bits)
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.reshape(*c.shape[:-1], -1, unit)
        # Bit fields do not overlap, so a sum is a bitwise OR.
        word = (c << self.code_shifts).sum(dim=-1, dtype=self.code_shifts.dtype)
        if bits != 3:
            return word
        out = (word.unsqueeze(-1) >> self.byte_shifts) & 0xFF
        return out.to(torch.uint8).flatten(-2)

    def unpack(self, packed: Tensor, n: int) -> Tensor:
        """See :func:`unpack`."""
        bits = self.bits
        expected = packed_size(n, bits)
        if packed.shape[-1] != expected:
            raise ValueError(
                f"packed last dim is {packed.shape[-1]} bytes but {n} codes of {bits} bits need {expected}"
            )
        if bits == 8:
            return _cast(packed, torch.uint8)
        if bits == 3:
            p = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, 3)
            word = (p << self.byte_shifts).sum(dim=-1, dtype=torch.int32)
            codes = (word.unsqueeze(-1) >> self.code_shifts) & _levels(bits)
            codes = codes.flatten(-2)
        else:
            index = _cast(packed, torch.int32).reshape(-1)
            codes = self.words.index_select(0, index).view(torch.uint8).view(*packed.shape[:-1], -1)
        if codes.shape[-1] != n:
            codes = codes[..., :n]
        return _cast(codes, torch.uint8)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack codes along the last dimension into uint8: ``[..., n] -> [..., packed_size(n, bits)]``.

    For b in {1, 2, 4, 8}, ``8/b`` codes per byte, code ``i`` of a byte in bits ``[i·b, (i+1)·b)`` (LSB first).
    For b = 3, 8 codes form a little-endian 24-bit word stored as 3 bytes. The tail is zero-padded. Codes are
    masked to ``b`` bits so an out-of-range value cannot corrupt its neighbours.
    """
    return BitPacker(bits, codes.device).pack(codes)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: ``[..., packed_size(n, bits)] uint8 -> [..., n]`` uint8 codes."""
    return BitPacker(bits, packed.device).unpack(packed, n)


# --------------------------------------------------------------------------------------------- high level


@dataclass
class Quantized:
    """A quantized block ``[..., T, C]``: what a cache stores (see the module docstring for the layouts).

    The fields may be views into a cache's preallocated buffers; :func:`dequantize` only uses their shapes.
    """

    codes: Tensor  # packed uint8 [..., T, packed_size(channels, bits)]
    scale: Tensor  # [..., T, ceil(C / group)] per token, [..., T // group, C] per channel
    zero: Tensor  # same shape and dtype as scale
    bits: int
    group: int  # the effective group size (already min(group, dim))
    axis: Axis
    channels: int  # C: packing pads the last dim, so the true width must be kept
    dtype: torch.dtype  # the input's dtype, the default of dequantize()

    @property
    def shape(self) -> torch.Size:
        """Shape of the tensor this block reconstructs."""
        return torch.Size((*self.codes.shape[:-1], self.channels))

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes + scale + zero."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


@dataclass(frozen=True, eq=False)
class Layout:
    """How a tensor ``[..., T, C]`` is quantized: code width, group, axis, calibration, storage of scale and zero, and
    the packer of its codes. The one implementation of quantize, dequantize and their round trip (``sim``).

    ``group`` is the requested size; each call groups with ``min(group, size)`` of the grouped dimension. ``eta`` is
    the calibration :func:`dequantize` applies (see :func:`calibrated_params`). ``packer``: a :class:`BitPacker` for
    ``bits`` made in advance on the tensors' device (a cache's); by default one is made on the CPU. ``clip``: each
    group's range is searched (:func:`clipped_params`) instead of taken as its min and max.
    """

    bits: int
    group: int
    axis: Axis
    eta: float = 0.0
    scale_dtype: torch.dtype = torch.float16
    packer: BitPacker | None = None
    clip: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_group(self.group)
        _check_axis(self.axis)
        if self.packer is None:
            object.__setattr__(self, "packer", BitPacker(self.bits))
        elif self.packer.bits != self.bits:
            raise ValueError(f"a packer for {self.packer.bits} bits cannot pack {self.bits}-bit codes")

    @property
    def dim(self) -> int:
        """The dimension of ``x [..., T, C]`` (and of its grouped view) that a group spans."""
        return group_dim(self.axis)

    def params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero of ``x``'s groups, as stored (without the codes: a layer that shares another's)."""
        scale, zero = self._group_params(to_groups(x, self.group, self.axis), x.shape[self.dim])
        return scale.squeeze(self.dim), zero.squeeze(self.dim)

    def _group_params(self, xg: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """Scale and zero of grouped ``xg``, whose grouped dimension held ``size`` elements before padding."""
        if not self.clip:
            return minmax_params(xg, self.bits, self.scale_dtype, dim=self.dim)
        padded = xg.shape[-1] * xg.shape[-2] if self.axis == "token" else xg.shape[-3] * xg.shape[-2]
        weight = None
        if padded != size:
            real = torch.arange(padded, device=xg.device) < size
            weight = real.view(xg.shape[-2:]) if self.axis == "token" else real.view(*xg.shape[-3:-1], 1)
        return clipped_params(xg, self.bits, self.scale_dtype, self.dim, self.eta, weight)

    def quantize(self, x: Tensor) -> Quantized:
        """Packed codes, scale and zero of ``x`` (see the module docstring for the layouts)."""
        # Cast once here rather than once in each of minmax_params and quantize_codes.
        xg = to_groups(_cast(x, torch.float32), self.group, self.axis)
        scale, zero = self._group_params(xg, x.shape[self.dim])
        codes = from_groups(quantize_codes(xg, scale, zero, self.bits), self.axis, x.shape[self.dim])
        return Quantized(
            codes=self.packer.pack(codes, in_range=True),  # quantize_codes clamps them
            scale=scale.squeeze(self.dim),
            zero=zero.squeeze(self.dim),
            bits=self.bits,
            group=xg.shape[self.dim],
            axis=self.axis,
            channels=x.shape[-1],
            dtype=x.dtype,
        )

    def unpack(self, packed: Tensor, channels: int) -> Tensor:
        return self.packer.unpack(packed, channels)

    def dequantize(self, codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
        """``[..., T, C]`` in ``dtype`` from unpacked codes and their stored scale and zero (calibrated by ``eta``)."""
        grouped = to_groups(codes, self.group, self.axis)
        values = dequantize_codes(grouped, scale.unsqueeze(self.dim), zero.unsqueeze(self.dim), self.bits, dtype,
                                  eta=self.eta)
        return from_groups(values, self.axis, codes.shape[self.dim])

    def round_trip(self, x: Tensor, codes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(x quantized and dequantized, in x's dtype; its grouped codes), skipping the packing (the ``sim``
        protocol). ``codes``: another tensor's grouped codes to reconstruct with x's own scale and zero (shared codes).

        A trailing per-channel group shorter than the group is quantized over the tokens it has (padded with copies
        of its last token, which move neither its min nor its max), as ragged per-token rows are.
        """
        size = x.shape[self.dim]  # of the grouped dimension, before any padding
        padded = pad_to_groups(x, min(self.group, size), self.dim) if self.axis == "channel" else x
        grouped = to_groups(padded, self.group, self.axis)
        scale, zero = self._group_params(grouped, size)
        if codes is None:
            codes = quantize_codes(grouped, scale, zero, self.bits)
        out = dequantize_codes(codes, scale, zero, self.bits, torch.float32, eta=self.eta)
        return _cast(from_groups(out, self.axis, size), x.dtype), codes

    def simulate(self, x: Tensor) -> Tensor:
        """``x`` as reading it back after quantizing gives it, in one pass (bit-identical to quantize, dequantize)."""
        return self.round_trip(x)[0]


def quantize_per_token(
    x: Tensor,
    bits: int,
    group: int,
    *,
    scale_dtype: torch.dtype = torch.float16,
    packer: BitPacker | None = None,
) -> Quantized:
    """Quantize ``x [..., T, C]`` with groups of ``group`` consecutive channels of each token.

    Returns codes ``[..., T, packed_size(C, bits)]`` and scale/zero ``[..., T, ceil(C / g)]``, ``g = min(group, C)``;
    when ``g`` does not divide ``C``, the last group of each row is the ``C mod g`` channels left (ragged). Tokens
    are independent, so quantizing them one at a time gives identical results.
    """
    return Layout(bits, group, "token", scale_dtype=scale_dtype, packer=packer or BitPacker(bits, x.device)).quantize(x)


def quantize_per_channel(
    x: Tensor,
    bits: int,
    group: int,
    *,
    scale_dtype: torch.dtype = torch.float16,
    packer: BitPacker | None = None,
) -> Quantized:
    """Quantize ``x [..., T, C]`` with groups of ``group`` consecutive tokens of each channel.

    ``T`` must be a multiple of ``g = min(group, T)``. Returns codes ``[..., T, packed_size(C, bits)]`` and
    scale/zero ``[..., T // g, C]``. Blocks of ``g`` tokens are independent, so quantizing them one block at a time
    gives identical results.
    """
    layout = Layout(bits, group, "channel", scale_dtype=scale_dtype, packer=packer or BitPacker(bits, x.device))
    return layout.quantize(x)


def dequantize(
    q: Quantized, dtype: torch.dtype | None = None, *, eta: float = 0.0, packer: BitPacker | None = None
) -> Tensor:
    """Reconstruct ``[..., T, C]`` from a :class:`Quantized` block, in ``dtype`` (default: the input's dtype).

    ``eta`` applies XQuant-KV's data-free calibration (see :func:`calibrated_params`); 0 is plain dequantization.
    """
    layout = Layout(q.bits, q.group, q.axis, eta=eta, packer=packer or BitPacker(q.bits, q.codes.device))
    out = layout.dequantize(layout.unpack(q.codes, q.channels), q.scale, q.zero, torch.float32)
    return _cast(out, dtype if dtype is not None else q.dtype)
