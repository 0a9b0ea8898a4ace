"""The decode step of `xquant` layers through the fused kernels: a layer's streams in, its attention output out.

`XQuantGQALayer.attend` (and likewise `XQuantMHALayer.attend` with `mha_fusable` / `mha_decode`) does

    if gqa_fusable(self, q, step) is None:          # shapes and configuration only: safe under CUDA-graph capture
        self._write(x @ self.uk, x @ self.uv, positions, step.shared)
        return gqa_decode(self, q, step)             # [B, H, 1, D], what the torch path returns

`*_fusable` returns None when the fused path applies, else why not (the layer then takes its torch path): a
single-token step, V absorption on, no outlier channel (GQA), no key bias, quantized streams that own their codes
(not bits=16), CUDA tensors, triton importable, head_dim a power of two >= 32. The decision depends on the step's
shape and the layer's configuration, never on data, so a captured decode graph contains one path or the other. The
token is written before `*_decode` reads the buffers (a decode step reads its own token back); this module never
writes.

The kernels take tensors only: one `QuantizedHistory` per stream (slots [0, span) of its codes, scales and zeros,
views, and its residual ring as the `Override`, whose mask and rows are the `QuantStream.ring_reads` that `read`
applies), the step's `stored_rope` and mask, and the projection's softmax scale. The value projection (Mv, or Wvᵀ
for MHA) and its bias are applied per head afterwards, as `attention.attend_rebuilt` does.

On a CPU, GQA decode steps take the C kernel instead (`gqa_cpu_unusable` / `gqa_cpu_decode`, kernels/cpu.py's
`latent_decode_attention`): keys rebuilt a few tokens at a time in cache-sized tiles (on AMX where the CPU has it),
values absorbed from their codes and projected by Mv in the kernel, nothing of the history written.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import project_heads
from ..kernels import (
    KernelConfig,
    Override,
    QuantizedHistory,
    cpu,
    fused_latent_attention,
    fused_supported,
    fused_x_attention,
)
from . import kv_decode
from .base import Step
from .stream import QuantStream

__all__ = ["gqa_cpu_arrays", "gqa_cpu_binding", "gqa_cpu_decode", "gqa_cpu_store", "gqa_cpu_unusable", "gqa_decode",
           "gqa_fusable", "mha_decode", "mha_fusable", "stream_inputs"]


def stream_inputs(stream: QuantStream, step: Step) -> QuantizedHistory:
    """Slots [0, step.span) of a stream and its residual ring, as `QuantStream.read` reads them."""
    span = step.span
    params = span if stream.axis == "token" else span // stream.group
    override = None
    if stream.ring_size:
        recent, rows = stream.ring_reads(step.stored_length, step.stored_positions, step.shared)
        override = Override(recent.squeeze(-1), stream.ring, rows)
    return QuantizedHistory(stream.codes[..., :span, :], stream.scale[..., :params, :], stream.zero[..., :params, :],
                            stream.bits, override)


def _stream_reason(stream: QuantStream) -> str | None:
    if stream.passthrough:
        return "the stream stores full precision (bits=16)"
    if stream.codes is None:
        return "the stream shares another layer's codes"
    return None


def _common_reason(layer, q: Tensor, step: Step, projection: Tensor, mk: Tensor, interpreter: bool) -> str | None:
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
    if layer.projection.bk is not None:
        return "the key projection has a bias, which the kernel's key rebuild does not add"
    return fused_supported(q, mk)


def gqa_fusable(layer, q: Tensor, step: Step, *, interpreter: bool = False) -> str | None:
    """None when `gqa_decode` applies to this `XQuantGQALayer` step, else the reason it does not.

    `interpreter=True` (tests) also accepts CPU tensors under TRITON_INTERPRET=1.
    """
    if layer.outlier_channel is not None:
        return "outlier=1 keeps a full-precision key channel the kernel does not read"
    return (_stream_reason(layer.key_latents) or _stream_reason(layer.value_latents)
            or _common_reason(layer, q, step, layer.mv, layer.mk, interpreter))


def gqa_decode(layer, q: Tensor, step: Step, config: KernelConfig | None = None) -> Tensor:
    """Attention output [B, H, 1, D] of an `XQuantGQALayer` decode step whose token is already written."""
    options, p = layer.parent.spec.options, layer.projection
    keys, values = stream_inputs(layer.key_latents, step), stream_inputs(layer.value_latents, step)
    mixed = fused_latent_attention(q, keys, values, layer.mk, *step.stored_rope, step.mask, options["group"],
                                   eta=options["eta"], scale=p.scale, config=config)  # [B, H, C]
    batch, heads, _, head_dim = q.shape
    kv_heads = layer.mv.shape[1] // head_dim
    return project_heads(mixed.view(batch, kv_heads, heads // kv_heads, -1), layer.mv, p.bv, heads)


def mha_fusable(layer, q: Tensor, step: Step, *, interpreter: bool = False) -> str | None:
    """None when `mha_decode` applies to this `XQuantMHALayer` step, else the reason it does not (see gqa_fusable)."""
    p = layer.projection
    return _stream_reason(layer.x) or _common_reason(layer, q, step, p.wv.T, p.wk.T, interpreter)


def mha_decode(layer, q: Tensor, step: Step, config: KernelConfig | None = None) -> Tensor:
    """Attention output [B, H, 1, D] of an `XQuantMHALayer` decode step whose token is already written."""
    options, p = layer.parent.spec.options, layer.projection
    mixed = fused_x_attention(q, stream_inputs(layer.x, step), p.wk.T, *step.stored_rope, step.mask,
                              options["group"], eta=options["eta"], scale=p.scale, config=config)  # [B, H, d]
    return project_heads(mixed.unsqueeze(2), p.wv.T, p.bv, q.shape[1])


def gqa_cpu_unusable(cache, layers) -> str | None:
    """Why the decode steps of an `xquant` cache on a GQA model (its `layers`) keep the torch path on a CPU instead
    of `gqa_cpu_decode` (None: they take the kernel). Configuration only: one answer for all steps and layers."""
    options, config = cache.spec.options, cache.config
    if not cache.host_steps:
        return "the CPU kernel runs in CPU steps only"
    if not options["fused"]:
        return "the spec asks for the torch path (fused=0)"
    if not options["absorb"] or config.num_heads > layers[0].mv.shape[1]:
        return "V absorption is off (absorb=0)"
    if options["outlier"]:
        return "outlier=1 keeps a full-precision key channel the kernel does not read"
    if any(layer.projection.bk is not None for layer in layers):
        return "the key projection has a bias, which the kernel's key rebuild does not add"
    if cache.dtype != torch.float32:
        return "the CPU kernel rebuilds keys in float32 only"
    streams = [stream for layer in layers for stream in (layer.key_latents, layer.value_latents)]
    if any(stream.passthrough or stream.codes is None or stream.bits not in cpu.BITS for stream in streams):
        return f"the CPU kernel reads {', '.join(map(str, cpu.BITS))}-bit codes"
    width, head_dim = layers[0].mv.shape[0], config.head_dim
    if width > cpu.MAX_DIM or width % cpu.LANES or head_dim % (2 * cpu.LANES) or config.kv_dim % cpu.REBUILD_PANEL:
        return (f"the CPU kernel reads latents of a multiple of {cpu.LANES} up to {cpu.MAX_DIM} channels, heads of a "
                f"multiple of {2 * cpu.LANES} and KV widths of a multiple of {cpu.REBUILD_PANEL}")
    if any(layer.value_latents.scale.dtype != torch.float16 for layer in layers):
        return "the CPU kernel stores float16 scales and zeros"
    if layers[0].value_latents.group % cpu.LANES:
        return f"the CPU kernel reads value groups of a multiple of {cpu.LANES} channels"
    return cpu.unavailable()


def gqa_cpu_arrays(layer) -> tuple[cpu.StreamArrays, cpu.StreamArrays]:
    """An `XQuantGQALayer`'s latent streams as `gqa_cpu_decode` reads them: one "KV head" per sequence."""
    return (kv_decode.kernel_arrays(layer.key_latents, lift=True),
            kv_decode.kernel_arrays(layer.value_latents, lift=True))


def gqa_cpu_binding(layer) -> cpu.KiviStore:
    """The one-call store of an `XQuantGQALayer`'s latents (`gqa_cpu_store`)."""
    return kv_decode.kernel_store(layer.key_latents, layer.value_latents, lift=True)


def gqa_cpu_store(layer, key_latent: Tensor, value_latent: Tensor, step: Step) -> None:
    """Stores a CPU decode step's one token, its latents [B, 1, C] float32, as `XQuantGQALayer._write` does: both
    rings and the value latent's codes in one call (`kv_decode.store`, keys unrotated), then the key group when the
    token closes it."""
    kv_decode.store(layer.kernel_store, layer.key_latents, layer.value_latents, key_latent.unsqueeze(1),
                    value_latent.unsqueeze(1), step, rotate=False)


def gqa_cpu_decode(layer, q: Tensor, step: Step) -> Tensor:
    """Attention output [B, H, 1, D] of an `XQuantGQALayer` CPU decode step whose token is already written."""
    p = layer.projection
    batch, heads, _, head_dim = q.shape
    keys, values = layer.kernel_arrays
    keys = kv_decode.stream_arrays(keys, layer.key_latents, step, lift=True)
    values = kv_decode.stream_arrays(values, layer.value_latents, step, lift=True)
    cos, sin = step.stored_rope
    out = cpu.latent_decode_attention(q.view(batch, heads, head_dim), keys, layer.mk, cos, sin, values, layer.mv,
                                      kv_decode.allowed(step), p.scale)  # [B, H, D]
    if p.bv is not None:  # each head's weights sum to one: its KV head's bias adds as it is
        kv_heads = layer.mv.shape[1] // head_dim
        out = (out.view(batch, kv_heads, heads // kv_heads, head_dim) + p.bv.view(kv_heads, 1, head_dim))
    return out.view(batch, heads, 1, head_dim)
