"""QuantStream: one quantized sequence [..., capacity, C] in a preallocated ring, plus its full-precision residual.

Every compressed method is built from streams: KIVI keeps a per-channel K stream and a per-token V stream, XQuant a
per-token X stream (MHA) or the X·Uk / X·Uv latent streams (GQA), XQuant-CL one delta stream per layer.

Layout (capacity slots, slot = position % capacity, the same slots as the cache's `slot_positions`):
- `codes` [..., capacity, packed_size(C, bits)] uint8, one packed row per token whatever the axis;
- `scale`, `zero` [..., capacity, C // g] per token, or [..., capacity // g, C] per channel (group slot = slot // g);
- `ring` [..., R_f, C] in the model dtype: the newest tokens in full precision, slot = position % R_f.

Which tokens are read back in full precision (METHODS.md sections 1 and 4):
- per token: the `residual` newest tokens (a queue: the oldest leaves it quantized; they were quantized on arrival);
- per channel: every token since the last flush, a flush happening each time `R_g = residual or g` tokens have
  arrived (KIVI); this always covers the open group, whose tokens cannot be quantized until it closes.
Tokens are quantized as they arrive (per token) or as their group closes (per channel), so the stored codes equal
quantizing the whole sequence at once; the residual only decides what is *read* in full precision.

All of it is tensor arithmetic on static shapes driven by the step's position tensor: no host synchronization and
no allocation that depends on the length, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import quant
from ..errors import CacheSpecError

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
        self.scale_dtype = scale_dtype
        self.passthrough = bits == FULL_PRECISION
        if self.passthrough:
            self.group = 1
            self.values = torch.zeros(*lead, capacity, channels, dtype=dtype, device=device)
            return
        grouped = channels if axis == "token" else capacity
        try:
            self.group = quant.effective_group(grouped, group)
        except ValueError as exc:
            raise CacheSpecError(str(exc)) from None
        if axis == "channel" and residual % self.group:
            raise CacheSpecError(f"residual={residual} must be a multiple of the group size {self.group}")
        if codes_from is not None and (codes_from.bits, codes_from.group, codes_from.axis) != (bits, self.group, axis):
            raise CacheSpecError("layers that share codes must use the same bits, group and axis")
        self.codes = None if codes_from is not None else torch.zeros(
            *lead, capacity, quant.packed_size(channels, bits), dtype=torch.uint8, device=device
        )
        params = (capacity, channels // self.group) if axis == "token" else (capacity // self.group, channels)
        self.scale = torch.zeros(*lead, *params, dtype=scale_dtype, device=device)
        self.zero = torch.zeros(*lead, *params, dtype=scale_dtype, device=device)
        # Per channel, the open group's tokens must stay somewhere until it closes, even with residual=0.
        ring = residual if axis == "token" else max(residual, self.group)
        self.ring = torch.zeros(*lead, ring, channels, dtype=dtype, device=device)

    @property
    def ring_size(self) -> int:
        return self.ring.shape[-2]

    def tensors(self) -> list[Tensor]:
        if self.passthrough:
            return [self.values]
        own_codes = [self.codes] if self.codes is not None else []
        return own_codes + [self.scale, self.zero, self.ring]

    # ------------------------------------------------------------------------------------------------ read

    def read(self, length: Tensor, slot_positions: Tensor) -> Tensor:
        """Slots [0, span) reconstructed [..., span, C], span = len(slot_positions) (their positions).

        `length` is the number of tokens written so far; empty slots hold garbage that the attention mask hides.
        """
        span = slot_positions.shape[0]
        if self.passthrough:
            # A copy, like the dequantized tensor of the real path: a ring prefill writes before it attends.
            return self.values[..., :span, :].clone()
        if self.codes_from is not None:
            codes = self.codes_from.last_codes
        else:
            codes = quant.unpack(self.codes[..., :span, :], self.bits, self.channels)
        self.last_codes = codes
        params = span if self.axis == "token" else span // self.group
        scale, zero = self.scale[..., :params, :], self.zero[..., :params, :]
        dim = quant.group_dim(self.axis)
        grouped = quant.to_groups(codes, self.group, self.axis)
        values = quant.dequantize_codes(grouped, scale.unsqueeze(dim), zero.unsqueeze(dim), self.bits, self.dtype,
                                        eta=self.eta)
        values = quant.from_groups(values, self.axis)
        if self.ring_size == 0:
            return values
        recent = (slot_positions >= self._full_precision_from(length)) & (slot_positions >= 0)
        exact = self.ring.index_select(-2, slot_positions.clamp(min=0) % self.ring_size)
        return torch.where(recent[:, None], exact, values)

    def _full_precision_from(self, length: Tensor) -> Tensor:
        if self.axis == "token":
            return length - self.residual
        flush = self.residual or self.group
        return torch.div(length, flush, rounding_mode="floor") * flush

    def simulate(self, y: Tensor) -> Tensor:
        """y [..., T, C] as the `sim` protocol reads it: quantized and dequantized, groups from y's first token.

        A trailing per-channel group shorter than G is quantized over the tokens it has (padding with copies of its
        last token leaves its min and max, hence its scale and zero, unchanged).
        """
        if self.passthrough:
            return y
        count = y.shape[-2]
        pad = (-count) % self.group if self.axis == "channel" else 0
        if pad:
            y = torch.cat((y, y[..., -1:, :].expand(*y.shape[:-2], pad, y.shape[-1])), dim=-2)
        grouped = quant.to_groups(y, self.group, self.axis)
        scale, zero = quant.minmax_params(grouped, self.bits, self.scale_dtype, dim=quant.group_dim(self.axis))
        if self.codes_from is not None:
            codes = self.codes_from.last_simulated_codes
        else:
            codes = quant.quantize_codes(grouped, scale, zero, self.bits)
        self.last_simulated_codes = codes
        out = quant.dequantize_codes(codes, scale, zero, self.bits, torch.float32, eta=self.eta)
        return quant.from_groups(out, self.axis)[..., :count, :].to(y.dtype)

    # ------------------------------------------------------------------------------------------------ write

    def write(self, y: Tensor, positions: Tensor) -> None:
        """Stores y [..., T, C], the tokens at contiguous `positions` [T] that follow everything written so far."""
        if self.passthrough:
            tail = min(y.shape[-2], self.capacity)
            self.values.index_copy_(-2, positions[-tail:] % self.capacity, y[..., -tail:, :])
            return
        if self.axis == "token":
            self._write_tokens(y, positions)
        else:
            self._write_channel_groups(y, positions)
        if self.ring_size:
            tail = min(y.shape[-2], self.ring_size)
            self.ring.index_copy_(-2, positions[-tail:] % self.ring_size, y[..., -tail:, :])

    def write_reconstructed(self, y: Tensor, positions: Tensor) -> Tensor:
        """Stores y like `write` (a per-token stream without residual) and returns what reading it back gives."""
        if self.passthrough:
            self.write(y, positions)
            return y
        q = self._write_tokens(y, positions)
        return quant.dequantize(q, self.dtype, eta=self.eta)

    def _write_tokens(self, y: Tensor, positions: Tensor) -> quant.Quantized:
        tail = min(y.shape[-2], self.capacity)
        q = quant.quantize_per_token(y, self.bits, self.group, scale_dtype=self.scale_dtype)
        slots = positions[-tail:] % self.capacity
        if self.codes is not None:
            self.codes.index_copy_(-2, slots, q.codes[..., -tail:, :])
        self.scale.index_copy_(-2, slots, q.scale[..., -tail:, :])
        self.zero.index_copy_(-2, slots, q.zero[..., -tail:, :])
        return q

    def _write_channel_groups(self, y: Tensor, positions: Tensor) -> None:
        # The groups touched by this chunk start at the open group's first token, whose earlier tokens are in the
        # ring. All of them are quantized (a static number of groups), but only those that close are stored.
        g, ring = self.group, self.ring_size
        count = y.shape[-2]
        groups = (count + g - 2) // g + 1
        first = positions[0]
        start = first - first % g
        window = start + torch.arange(groups * g, device=positions.device)
        source = torch.cat((self.ring, y, torch.zeros_like(y[..., :1, :])), dim=-2)
        index = torch.where(
            window < first, window % ring, torch.where(window < first + count, ring + window - first, ring + count)
        )
        q = quant.quantize_per_channel(source.index_select(-2, index), self.bits, g, scale_dtype=self.scale_dtype)
        group_ends = start + (torch.arange(groups, device=positions.device) + 1) * g - 1
        closed = group_ends <= positions[-1]
        token_slots = window % self.capacity
        group_slots = torch.div(window[::g], g, rounding_mode="floor") % (self.capacity // g)
        if self.codes is not None:
            _masked_store(self.codes, token_slots, q.codes, closed.repeat_interleave(g))
        _masked_store(self.scale, group_slots, q.scale, closed)
        _masked_store(self.zero, group_slots, q.zero, closed)


def _masked_store(buffer: Tensor, slots: Tensor, values: Tensor, keep: Tensor) -> None:
    """buffer[..., slots, :] = values where keep, unchanged elsewhere (static shapes, no data-dependent indexing)."""
    current = buffer.index_select(-2, slots)
    buffer.index_copy_(-2, slots, torch.where(keep[:, None], values, current))


def stored_bits(bits: int, group: int, param_bits: int = 16) -> float:
    """Bits per element of a group-quantized tensor: the code plus its group's scale and zero."""
    return bits + 2 * param_bits / group
