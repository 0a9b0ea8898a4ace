"""QuantStream: one quantized sequence [..., capacity, C] in a preallocated ring, plus its full-precision residual.

Every compressed method is built from streams: KIVI keeps a per-channel K stream and a per-token V stream, XQuant a
per-token X stream (MHA) or the X·Uk / X·Uv latent streams (GQA), XQuant-CL one delta stream per layer.

Layout (capacity slots, slot = position % capacity, the same slots as the cache's `slot_positions`):
- `codes` [..., capacity, packed_size(C, bits)] uint8, one packed row per token whatever the axis;
- `scale`, `zero` [..., capacity, ceil(C / g)] per token (the last group of a row ragged when g does not divide C),
  or [..., capacity // g, C] per channel (group slot = slot // g; the capacity is a multiple of g);
- `ring` [..., R_f, C] in the model dtype: the newest tokens in full precision, slot = position % R_f.

Which tokens are read back in full precision (METHODS.md sections 1 and 4):
- per token: the `residual` newest tokens (a queue: the oldest leaves it quantized; they were quantized on arrival);
- per channel: every token since the last flush, a flush happening each time `R_g = residual or g` tokens have
  arrived (KIVI); this always covers the open group, whose tokens cannot be quantized until it closes.
Tokens are quantized as they arrive (per token) or as their group closes (per channel), so the stored codes equal
quantizing the whole sequence at once; the residual only decides what is *read* in full precision.

All of it is tensor arithmetic on static shapes driven by the step's position tensor: no host synchronization and
no allocation that depends on the length, so a decode step can be captured in a CUDA graph.

A decode step runs this for every layer, so every op counts (each is a kernel launch on a GPU, even in a graph):
constants (pack shifts, group offsets) are made once per stream, and index work that depends only on the step's
positions (slots, ring rows, which slots are read from the ring) can be shared by every stream of the step
through the `shared` dict of `read` and `write` (a `Step.shared`). On a CPU that dict also holds the step's first
position as a Python int (`base.FIRST_POSITION`), which lets a decode step skip quantizing a group that does not close.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .. import quant
from ..errors import CacheSpecError
from .base import FIRST_POSITION

FULL_PRECISION = 16  # test-only width: store values as they are (exactness checks with quantization off)


class QuantStream:
    def __init__(
        self,
        lead: tuple[int, ...],
        capacity: int,
        channels: int,
        bits: int,
        group: int,
        axis: quant.Axis,
        residual: int,
        dtype: torch.dtype,
        device: torch.device,
        scale_dtype: torch.dtype = torch.float16,
        eta: float = 0.0,
        codes_from: QuantStream | None = None,
        clip: bool = False,
    ) -> None:
        self.capacity = capacity
        self.eta = eta
        # A stream that shares codes (XQuant-KV) stores only its own scales and zeros and reads its partner's codes
        # as the partner last read them (`last_codes`), which is also the partner's history before a ring write.
        self.codes_from = codes_from
        self.last_codes: Tensor | None = None
        self.last_simulated_codes: Tensor | None = None
        self.channels = channels
        self.bits = bits
        self.axis = axis
        self.residual = residual
        self.dtype = dtype
        self.passthrough = bits == FULL_PRECISION
        if self.passthrough:
            self.group = 1
            self.values = torch.zeros(*lead, capacity, channels, dtype=dtype, device=device)
            return
        grouped = channels if axis == "token" else capacity
        try:
            self.group = quant.effective_group(grouped, group, axis)
        except ValueError as exc:
            raise CacheSpecError(str(exc)) from None
        if axis == "channel" and residual % self.group:
            raise CacheSpecError(f"residual={residual} must be a multiple of the group size {self.group}")
        if codes_from is not None and (codes_from.bits, codes_from.group, codes_from.axis) != (bits, self.group, axis):
            raise CacheSpecError("layers that share codes must use the same bits, group and axis")
        self.codes = None if codes_from is not None else torch.zeros(
            *lead, capacity, quant.packed_size(channels, bits), dtype=torch.uint8, device=device
        )
        params = ((capacity, quant.group_count(channels, self.group)) if axis == "token"
                  else (capacity // self.group, channels))
        self.scale = torch.zeros(*lead, *params, dtype=scale_dtype, device=device)
        self.zero = torch.zeros(*lead, *params, dtype=scale_dtype, device=device)
        # Per channel, the open group's tokens must stay somewhere until it closes, even with residual=0.
        ring = residual if axis == "token" else max(residual, self.group)
        self.ring = torch.zeros(*lead, ring, channels, dtype=dtype, device=device)
        self.layout = quant.Layout(bits, self.group, axis, eta, scale_dtype, quant.BitPacker(bits, device), clip)
        # A group's token slots from its first, for the decode step's per-channel write.
        self.group_offsets = torch.arange(self.group, device=device) if axis == "channel" else None
        self.ring_rows = torch.arange(ring, device=device)
        # Streams with the same rule for which tokens read in full precision share that mask within a step.
        self.recent_key = ("read: recent", axis, residual if axis == "token" else residual or self.group)

    @property
    def ring_size(self) -> int:
        return self.ring.shape[-2]

    def tensors(self) -> list[Tensor]:
        if self.passthrough:
            return [self.values]
        own_codes = [self.codes] if self.codes is not None else []
        return own_codes + [self.scale, self.zero, self.ring]

    # ------------------------------------------------------------------------------------------------ read

    def read(self, length: Tensor, slot_positions: Tensor, shared: dict | None = None) -> Tensor:
        """Slots [0, span) reconstructed [..., span, C], span = len(slot_positions) (their positions).

        `length` is the number of tokens written so far; empty slots hold garbage that the attention mask hides.
        `shared`: a dict that lives exactly as long as `length` and `slot_positions` (a step's), where the streams
        reading them keep the index work they have in common, done once for all of them.
        """
        span = slot_positions.shape[0]
        if self.passthrough:
            # A copy, like the dequantized tensor of the real path: a ring prefill writes before it attends.
            return self.values[..., :span, :].clone()
        if self.codes_from is not None:
            codes = self.codes_from.last_codes
        else:
            codes = self.layout.unpack(self.codes[..., :span, :], self.channels)
        self.last_codes = codes
        params = span if self.axis == "token" else span // self.group
        values = self.layout.dequantize(codes, self.scale[..., :params, :], self.zero[..., :params, :], self.dtype)
        if self.ring_size == 0:
            return values
        if self.ring_size > span:
            recent, rows = self.ring_reads(length, slot_positions, shared)
            return torch.where(recent, self.ring.index_select(-2, rows), values)
        # Only the ring's rows can differ from the dequantized history: patching those costs O(ring) where a
        # select over every slot costs two more passes over the whole span (most of a long-context step on a CPU).
        slots, recent = _once(shared, ("read: ring patch",) + self.recent_key + (self.ring_size, span),
                              lambda: self._ring_patch(length, span))
        if recent is None:
            return values.index_copy_(-2, slots, self.ring)
        patch = torch.where(recent, self.ring, values.index_select(-2, slots))
        return values.index_copy_(-2, slots, patch)

    def ring_reads(self, length: Tensor, slot_positions: Tensor, shared: dict | None = None) -> tuple[Tensor, Tensor]:
        """([span, 1] which slots read from the ring, [span] their ring rows): the full-precision rule of `read`,
        also what the fused kernels get as their override."""
        recent = _once(shared, self.recent_key, lambda: self._recent(length, slot_positions))
        rows = _once(shared, ("read: ring rows", self.ring_size), lambda: slot_positions.clamp(min=0) % self.ring_size)
        return recent, rows

    def _ring_patch(self, length: Tensor, span: int) -> tuple[Tensor, Tensor | None]:
        """For each ring row (ring_size <= span): ([R] the slot it patches, [R, 1] whether it is read from the ring,
        or None when every row is).

        Row r holds the newest position p_r = r (mod R) below `length`; the R positions are consecutive, so their
        slots p_r mod span are distinct (a position's slot is p mod capacity, and span is either the capacity or
        above every position held). A row holding nothing yet (p_r < 0) lands on an empty slot, which attention
        masks. Per token, the ring is exactly the `residual` newest tokens, all read from it; per channel, only
        those since the last flush are.
        """
        newest = length - 1
        positions = newest - torch.remainder(newest - self.ring_rows, self.ring_size)
        slots = torch.remainder(positions, span)
        if self.axis == "token":
            return slots, None
        return slots, (positions >= self._full_precision_from(length))[:, None]

    def _recent(self, length: Tensor, slot_positions: Tensor) -> Tensor:
        """[span, 1]: which slots are read from the ring, in full precision. Never an empty slot (position -1)."""
        start = self._full_precision_from(length)
        if self.axis == "token":
            start = start.clamp(min=0)  # per channel it is a multiple of the flush size, never negative
        return (slot_positions >= start)[:, None]

    def _full_precision_from(self, length: Tensor) -> Tensor:
        if self.axis == "token":
            return length - self.residual
        flush = self.residual or self.group
        return torch.div(length, flush, rounding_mode="floor") * flush

    def simulate(self, y: Tensor) -> Tensor:
        """y [..., T, C] as the `sim` protocol reads it: quantized and dequantized, groups from y's first token."""
        if self.passthrough:
            return y
        shared = self.codes_from.last_simulated_codes if self.codes_from is not None else None
        values, self.last_simulated_codes = self.layout.round_trip(y, shared)
        return values

    # ------------------------------------------------------------------------------------------------ write

    def write(self, y: Tensor, positions: Tensor, shared: dict | None = None) -> None:
        """Stores y [..., T, C], the tokens at contiguous `positions` [T] that follow everything written so far.

        `shared`: as in `read`, a dict that lives exactly as long as `positions` (a step's).
        """
        if self.passthrough:
            tail = min(y.shape[-2], self.capacity)
            self.values.index_copy_(-2, positions[-tail:] % self.capacity, y[..., -tail:, :])
            return
        if self.axis == "token":
            self._store_tokens(*self._quantize(y), positions, shared)
            self._write_ring(y, positions, shared)
        elif y.shape[-2] == 1:
            # One token (decode): once it is in the ring, so is all of its group.
            self._write_ring(y, positions, shared)
            self.store_closing_group(positions, shared)
        else:
            self._write_channel_groups(y, positions)
            self._write_ring(y, positions, shared)

    def write_reconstructed(self, y: Tensor, positions: Tensor) -> Tensor:
        """Stores y like `write` (a per-token stream without residual) and returns what reading it back gives."""
        if self.passthrough:
            self.write(y, positions)
            return y
        q = self.layout.quantize(y)
        self._store_tokens(q.codes, q.scale, q.zero, positions, None)
        return quant.dequantize(q, self.dtype, eta=self.eta, packer=self.layout.packer)

    def _quantize(self, y: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """y's packed codes, scale and zero in the stream's layout; no codes for a stream that reads another's."""
        if self.codes is None:
            return None, *self.layout.params(y)
        q = self.layout.quantize(y)
        return q.codes, q.scale, q.zero

    def _store_tokens(self, codes: Tensor | None, scale: Tensor, zero: Tensor, positions: Tensor,
                      shared: dict | None) -> None:
        tail = min(positions.shape[0], self.capacity)
        slots = _once(shared, ("write: slots", self.capacity, tail), lambda: _last(positions, tail) % self.capacity)
        if codes is not None:
            self.codes.index_copy_(-2, slots, _last(codes, tail, dim=-2))
        self.scale.index_copy_(-2, slots, _last(scale, tail, dim=-2))
        self.zero.index_copy_(-2, slots, _last(zero, tail, dim=-2))

    def _write_ring(self, y: Tensor, positions: Tensor, shared: dict | None) -> None:
        if not self.ring_size:
            return
        ring, tail = self.ring_size, min(y.shape[-2], self.ring_size)
        rows = _once(shared, ("write: ring rows", ring, tail), lambda: _last(positions, tail) % ring)
        self.ring.index_copy_(-2, rows, _last(y, tail, dim=-2))

    def store_closing_group(self, positions: Tensor, shared: dict | None) -> None:
        """Quantizes the group of the one token just written to the ring (per channel), and stores it if that token
        closes it.

        Every step quantizes (static shapes), but only a closing token's group is stored: the open group's slots
        keep what they hold until then. The ring holds the whole group since it is a multiple of the group size.
        """
        g = self.group
        first = shared.get(FIRST_POSITION) if shared is not None else None
        if first is not None and (first + 1) % g:
            return  # known on the host (a CPU step): the token does not close its group, nothing would be stored
        ring_group, token_slots, group_slot, closes = _once(
            shared, ("write: closing group", g, self.ring_size, self.capacity), lambda: self._closing_group(positions)
        )
        lead, channels = self.ring.shape[:-2], self.ring.shape[-1]
        grouped_ring = self.ring.view(*lead, self.ring_size // g, g, channels)
        codes, scale, zero = self._quantize(grouped_ring.index_select(-3, ring_group).flatten(-3, -2))
        if codes is not None:
            _masked_store(self.codes, token_slots, codes, closes)
        _masked_store(self.scale, group_slot, scale, closes)
        _masked_store(self.zero, group_slot, zero, closes)

    def _closing_group(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For the one token at `positions` [1]: its group's ring group, token slots, group slot, and [1, 1] whether
        the token closes the group."""
        g = self.group
        group = torch.div(positions, g, rounding_mode="floor")
        token_slots = (group * g + self.group_offsets) % self.capacity
        closes = ((positions + 1) % g == 0)[:, None]
        return group % (self.ring_size // g), token_slots, group % (self.capacity // g), closes

    def _write_channel_groups(self, y: Tensor, positions: Tensor) -> None:
        # The groups touched by this chunk start at the open group's first token, whose earlier tokens are in the
        # ring. All of them are quantized (a static number of groups), but only those that close are stored.
        g, ring = self.group, self.ring_size
        count = y.shape[-2]
        # At most the buffer's groups (a chunk never touches more): a longer window would wrap onto its own first
        # slots, and the store of a group left open there would undo that of a group that closed.
        groups = min((count + g - 2) // g + 1, self.capacity // g)
        first = positions[0]
        start = first - first % g
        window = start + torch.arange(groups * g, device=positions.device)
        source = torch.cat((self.ring, y, torch.zeros_like(y[..., :1, :])), dim=-2)
        index = torch.where(
            window < first, window % ring, torch.where(window < first + count, ring + window - first, ring + count)
        )
        codes, scale, zero = self._quantize(source.index_select(-2, index))
        group_ends = start + (torch.arange(groups, device=positions.device) + 1) * g - 1
        closed = group_ends <= positions[-1]
        token_slots = window % self.capacity
        group_slots = torch.div(window[::g], g, rounding_mode="floor") % (self.capacity // g)
        if codes is not None:
            _masked_store(self.codes, token_slots, codes, closed.repeat_interleave(g)[:, None])
        _masked_store(self.scale, group_slots, scale, closed[:, None])
        _masked_store(self.zero, group_slots, zero, closed[:, None])


def _once(shared: dict | None, key: tuple, compute: Callable[[], Any]) -> Any:
    """compute(), or what it gave for `key` earlier in the step whose `shared` dict this is."""
    if shared is None:
        return compute()
    if key not in shared:
        shared[key] = compute()
    return shared[key]


def _last(x: Tensor, count: int, dim: int = 0) -> Tensor:
    """The last `count` entries of x along `dim`, without the (no-op, still dispatched) slice when that is all."""
    return x if x.shape[dim] == count else x.narrow(dim, x.shape[dim] - count, count)


def _masked_store(buffer: Tensor, slots: Tensor, values: Tensor, keep: Tensor) -> None:
    """buffer[..., slots, :] = values where keep ([len(slots), 1] or [1, 1]), unchanged elsewhere (static shapes,
    no data-dependent indexing)."""
    current = buffer.index_select(-2, slots)
    buffer.index_copy_(-2, slots, torch.where(keep, values, current))


def stored_bits(bits: int, group: int, width: int | None = None, param_bits: int = 16) -> float:
    """Bits per element of a group-quantized tensor: the code plus its share of its group's scale and zero.

    `width`: the channels of a per-token row, which holds `quant.group_count(width, group)` groups (the last one
    ragged when the group does not divide it, `min(group, width)` when the group exceeds it). None: groups that
    tile their dimension (per channel: a cache's capacity is a multiple of the group).
    """
    if width is None:
        return bits + 2 * param_bits / group
    # Integer numerator and denominator: exactly 2·param_bits/g (the same float) when g divides the width.
    return bits + 2 * param_bits * quant.group_count(width, group) / width
