"""The decode step of `xquant` layers through the fused kernels: the glue between a layer's streams and the kernel.

`xqinfer/cache/xquant.py` calls, in `XQuantGQALayer.attend` (and likewise `XQuantMHALayer.attend` with
`mha_fusable` / `mha_decode`):

    step = self.parent.step
    if gqa_fusable(self, q, step) is None:          # shapes and configuration only: safe under CUDA-graph capture
        self._write(x @ self.uk, x @ self.uv, positions)
        return gqa_decode(self, q, step)             # [B, H, 1, D], what the torch path returns

`*_fusable` returns None when the fused path applies, else why not (the layer then takes its torch path, unchanged):
a single-token step (not `step.concat`), V absorption on (`absorb=1`), no outlier channel (GQA), quantized streams
that own their codes (not bits=16), CUDA tensors, triton importable, head_dim a power of two >= 32.
The decision depends on the step's shape and the layer's configuration, never on data, so a captured decode graph
contains one path or the other. The token must be written before `*_decode` reads the buffers (a decode step writes
first and reads its own token back, `Step.read_around_write`); the glue itself never writes.

What it passes (see `reference.latent_attention_reference` for the arguments): one `QuantizedHistory` per stream
(`stream_inputs`) holding slots [0, span) of the stream's codes, scales and zeros (views, no copy) and the stream's
residual ring itself as the `Override`, whose mask and rows are `QuantStream.ring_reads` over the step's
`stored_positions` (the rule `QuantStream.read` applies, shared with it through `step.shared`); RoPE tables
`step.stored_rope`; `step.mask` [1, span]. It then applies Mv (GQA) or Wvᵀ (MHA) per head to the absorbed
output, as `attend_values` does.
"""

from __future__ import annotations

from torch import Tensor

from . import fused_latent_attention, fused_supported, fused_x_attention
from .reference import KernelConfig, Override, QuantizedHistory

__all__ = ["gqa_decode", "gqa_fusable", "mha_decode", "mha_fusable", "stream_inputs"]


def stream_inputs(stream, step) -> QuantizedHistory:
    """Slots [0, step.span) of a `QuantStream` and its residual ring, as `QuantStream.read` reads them."""
    span = step.span
    params = span if stream.axis == "token" else span // stream.group
    override = None
    if stream.ring_size:
        recent, rows = stream.ring_reads(step.stored_length, step.stored_positions, step.shared)
        override = Override(recent.squeeze(-1), stream.ring, rows)
    return QuantizedHistory(stream.codes[..., :span, :], stream.scale[..., :params, :], stream.zero[..., :params, :],
                            stream.bits, override)


def _stream_reason(stream) -> str | None:
    if stream.passthrough:
        return "the stream stores full precision (bits=16)"
    if stream.codes is None:
        return "the stream shares another layer's codes"
    return None


def _common_reason(layer, q: Tensor, step, projection: Tensor, mk: Tensor, interpreter: bool) -> str | None:
    if step.concat or q.shape[2] != 1:
        return "not a single-token decode step"
    if not q.is_cuda and not interpreter:
        # Triton's CPU interpreter (TRITON_INTERPRET=1) is for tests: a model on the CPU keeps its torch path, even
        # in a process where the variable is set (the kernel tests set it).
        return "the tensors are not on a CUDA device"
    if not layer.parent.spec.options["fused"]:
        return "the spec asks for the torch path (fused=0)"
    heads = q.shape[1]
    if not layer.parent.spec.options["absorb"] or heads > projection.shape[1]:
        return "V absorption is off for this step (absorb=0)"
    return fused_supported(q, mk)


def gqa_fusable(layer, q: Tensor, step, *, interpreter: bool = False) -> str | None:
    """None when `gqa_decode` applies to this `XQuantGQALayer` step, else the reason it does not.

    `interpreter=True` (tests) also accepts CPU tensors under TRITON_INTERPRET=1.
    """
    if layer.outlier_channel is not None:
        return "outlier=1 keeps a full-precision key channel the kernel does not read"
    return (_stream_reason(layer.key_latents) or _stream_reason(layer.value_latents)
            or _common_reason(layer, q, step, layer.mv, layer.mk, interpreter))


def gqa_decode(layer, q: Tensor, step, config: KernelConfig | None = None) -> Tensor:
    """Attention output [B, H, 1, D] of an `XQuantGQALayer` decode step whose token is already written."""
    options = layer.parent.spec.options
    keys, values = stream_inputs(layer.key_latents, step), stream_inputs(layer.value_latents, step)
    cos, sin = step.stored_rope
    mixed = fused_latent_attention(q, keys, values, layer.mk, cos, sin, step.mask, options["group"],
                                   eta=options["eta"], config=config)  # [B, H, C]
    batch, heads, _, head_dim = q.shape
    width, kv_dim = layer.mv.shape
    kv_heads = kv_dim // head_dim
    per_head = layer.mv.view(width, kv_heads, head_dim).transpose(0, 1)  # [Hkv, C, D]
    out = mixed.view(batch, kv_heads, heads // kv_heads, width) @ per_head
    return out.reshape(batch, heads, 1, head_dim)


def mha_fusable(layer, q: Tensor, step, *, interpreter: bool = False) -> str | None:
    """None when `mha_decode` applies to this `XQuantMHALayer` step, else the reason it does not (see gqa_fusable)."""
    return _stream_reason(layer.x) or _common_reason(layer, q, step, layer.wv.T, layer.wk.T, interpreter)


def mha_decode(layer, q: Tensor, step, config: KernelConfig | None = None) -> Tensor:
    """Attention output [B, H, 1, D] of an `XQuantMHALayer` decode step whose token is already written."""
    options = layer.parent.spec.options
    cos, sin = step.stored_rope
    mixed = fused_x_attention(q, stream_inputs(layer.x, step), layer.wk.T, cos, sin, step.mask, options["group"],
                              eta=options["eta"], config=config)  # [B, H, d]
    batch, heads, _, head_dim = q.shape
    hidden = mixed.shape[-1]
    per_head = layer.wv.T.view(hidden, heads, head_dim).transpose(0, 1)  # [H, d, D], a view as in attend_values
    return (mixed.unsqueeze(2) @ per_head).reshape(batch, heads, 1, head_dim)
