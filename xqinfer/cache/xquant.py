"""`xquant`: cache the quantized layer input X and rebuild K and V from it at every step (METHODS.md section 2).

MHA caches X per token (one tensor where KV keeps two). GQA caches the SVD latents X·Uk (per channel) and X·Uv
(per token): `Wk = Uk Σk Bkᵀ` once at load, and `K = (X·Uk)·Mk` with `Mk = Σk Bkᵀ` folded into one small matrix.
By default the value side is absorbed: attention weights multiply X̂ (or X·Uv) first and Wv (or Mv) is applied
after, since V carries no RoPE; this removes the V rebuild.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from ..attention import attend_rebuilt, rebuild_keys
from ..kernels.cpu import KiviStore, StreamArrays
from ..rope import apply_rotary
from .base import Cache, CacheSpec, LayerCache, Option, Step, refuse, register
from .stream import FULL_PRECISION, QuantStream, stored_bits
from .xquant_decode import (
    gqa_cpu_arrays,
    gqa_cpu_binding,
    gqa_cpu_decode,
    gqa_cpu_store,
    gqa_cpu_unusable,
    gqa_decode,
    gqa_fusable,
    mha_decode,
    mha_fusable,
)


@register("xquant")
class XQuantCache(Cache):
    BENCHMARKED = ("xquant:bits=4",)
    OPTIONS = {
        "bits": Option(4, choices=(2, 3, 4, 8)),
        "group": Option(128, minimum=1),
        "residual": Option(128, minimum=0),
        "outlier": Option(0, choices=(0, 1)),
        "absorb": Option(1, choices=(0, 1)),
        "eta": Option(0.0, minimum=0.0, maximum=0.5),
        # The fused decode kernel where it can run (Triton on CUDA, C on a CPU, absorb=1; see cache/xquant_decode.py);
        # 0 keeps the torch path, to measure one against the other.
        "fused": Option(1, choices=(0, 1)),
    }

    @property
    def always_concat(self) -> bool:
        return True

    def capacity_multiple(self) -> int:
        return self.spec.options["group"] if self.config.is_gqa else 1

    @classmethod
    def resolve(cls, spec: CacheSpec, config) -> CacheSpec:
        if spec.options["outlier"] and not config.is_gqa:
            refuse(spec, "outlier=1 keeps channel 0 of the GQA latents X·Uk and this model is MHA "
                         "(accepted here: outlier=0)")
        if config.is_gqa and spec.options["residual"] % spec.options["group"]:
            refuse(spec, "residual must be a multiple of group on a GQA model (key latents are flushed to "
                         "quantized groups R at a time)")
        return spec

    def make_layer(self, index: int) -> LayerCache:
        return XQuantGQALayer(self, index) if self.config.is_gqa else XQuantMHALayer(self, index)

    @cached_property
    def kernel_unusable(self) -> str | None:
        """Why decode steps keep the torch path instead of the CPU kernel (None: GQA layers take the kernel)."""
        if not self.config.is_gqa:
            return "the CPU kernel reads GQA latents; MHA layers (the cached X) keep the torch path"
        return gqa_cpu_unusable(self, self.layers)

    @classmethod
    def layer_bits_per_element(cls, spec: CacheSpec, config, index: int, dtype: torch.dtype = torch.float16) -> float:
        o = spec.options
        if o["bits"] == FULL_PRECISION:
            cached = config.hidden_size if not config.is_gqa else 2 * latent_width(config)
            return cached * torch.finfo(dtype).bits / (2 * config.kv_dim)
        if not config.is_gqa:
            per_token = config.hidden_size * stored_bits(o["bits"], o["group"], config.hidden_size)
            return per_token / (2 * config.kv_dim)
        width = latent_width(config)
        keys = stored_bits(o["bits"], o["group"])  # groups of tokens: they tile the capacity
        values = stored_bits(o["bits"], o["group"], width)  # groups of channels: the last one may be ragged
        if o["outlier"]:
            # Channel 0 of X·Uk stays in 16 bits instead of its share of codes, scales and zeros.
            keys = ((width - 1) * keys + 16) / width
        return width * (keys + values) / (2 * config.kv_dim)

    @classmethod
    def residual_elements(cls, spec: CacheSpec, config, index: int) -> int:
        residual = spec.options["residual"]
        if not config.is_gqa:
            return residual * config.hidden_size
        # Key latents are grouped per channel (their ring holds at least the open group), less a kept outlier channel.
        width = latent_width(config)
        return max(residual, spec.options["group"]) * (width - spec.options["outlier"]) + residual * width

    @classmethod
    def rebuild_flops_per_token(cls, spec: CacheSpec, config, index: int) -> float:
        # K = X̂·Wk (MHA) or (X̂Uk)·Mk (GQA); V absorbed costs the weighted sum over the stored width per query head.
        width = latent_width(config) if config.is_gqa else config.hidden_size
        keys = 2 * width * config.kv_dim
        values = 2 * config.num_heads * width if spec.options["absorb"] else 2 * width * config.kv_dim
        return float(keys + values)


class XQuantMHALayer(LayerCache):
    def __init__(self, parent: XQuantCache, index: int) -> None:
        super().__init__(parent, index)
        o, config = parent.spec.options, parent.config
        self.x = QuantStream((parent.batch_size,), parent.capacity, config.hidden_size, o["bits"], o["group"], "token",
                             parent.residual, parent.dtype, parent.device, eta=o["eta"])

    def attend(self, step: Step, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        p, absorb, positions = self.projection, self.parent.spec.options["absorb"], step.positions
        fused = mha_fusable(self, q, step) is None
        self.note_decode_path(step, "triton" if fused else "torch")
        if fused:
            # CUDA decode: the fused kernel dequantizes, rebuilds and attends without materializing the history.
            self.x.write(x, positions, step.shared)
            return mha_decode(self, q, step)
        stored = step.read_around_write(
            lambda: self.x.write(x, positions, step.shared),
            lambda: self.x.read(step.stored_length, step.stored_positions, step.shared),
        )
        keys = rebuild_keys(stored, p.wk.T, p.bk, p.head_dim, *step.stored_rope)
        if not step.concat:
            return attend_rebuilt(q, keys, stored, p.wv.T, p.bv, step.mask, p.scale, absorb)
        if self.parent.simulate:
            x = self.x.simulate(x)
            new_keys = rebuild_keys(x, p.wk.T, p.bk, p.head_dim, step.cos, step.sin)
        else:
            new_keys = apply_rotary(k, step.cos, step.sin)
        keys = torch.cat((keys, new_keys), dim=2)
        return attend_rebuilt(q, keys, torch.cat((stored, x), dim=-2), p.wv.T, p.bv, step.mask, p.scale, absorb)

    def tensors(self) -> list[Tensor]:
        return self.x.tensors()


class XQuantGQALayer(LayerCache):
    def __init__(self, parent: XQuantCache, index: int) -> None:
        super().__init__(parent, index)
        o, config = parent.spec.options, parent.config
        self.uk, self.mk = latent_factors(self.projection.wk)
        self.uv, self.mv = latent_factors(self.projection.wv)
        self.outlier = bool(o["outlier"])
        lead, dtype = (parent.batch_size,), parent.dtype
        width = latent_width(config)
        self.key_latents = QuantStream(lead, parent.capacity, width - self.outlier, o["bits"], o["group"], "channel",
                                       parent.residual, dtype, parent.device, eta=o["eta"])
        self.value_latents = QuantStream(lead, parent.capacity, width, o["bits"], o["group"], "token",
                                         parent.residual, dtype, parent.device, eta=o["eta"])
        self.outlier_channel = (
            QuantStream(lead, parent.capacity, 1, FULL_PRECISION, 1, "token", 0, dtype, parent.device)
            if self.outlier else None
        )

    @cached_property
    def kernel_arrays(self) -> tuple[StreamArrays, StreamArrays]:
        return gqa_cpu_arrays(self)

    @cached_property
    def kernel_store(self) -> KiviStore:
        return gqa_cpu_binding(self)

    def attend(self, step: Step, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        p, positions = self.projection, step.positions
        fused = gqa_fusable(self, q, step) is None
        on_cpu = not fused and positions.shape[0] == 1 and not step.concat and self.parent.kernel_unusable is None
        self.note_decode_path(step, "triton" if fused else "cpu" if on_cpu else "torch")
        if fused:
            self._write(x @ self.uk, x @ self.uv, positions, step.shared)
            return gqa_decode(self, q, step)
        if on_cpu:
            gqa_cpu_store(self, x @ self.uk, x @ self.uv, step)
            return gqa_cpu_decode(self, q, step)
        new_keys, new_values = x @ self.uk, x @ self.uv
        stored_keys, stored_values = step.read_around_write(
            lambda: self._write(new_keys, new_values, positions, step.shared), lambda: self._read(step)
        )
        if step.concat:
            if self.parent.simulate:
                new_keys, new_values = self._simulate(new_keys), self.value_latents.simulate(new_values)
            stored_keys = torch.cat((stored_keys, new_keys), dim=-2)
            stored_values = torch.cat((stored_values, new_values), dim=-2)
        keys = rebuild_keys(stored_keys, self.mk, p.bk, p.head_dim, *step.key_rope(stored_keys.shape[-2]))
        return attend_rebuilt(q, keys, stored_values, self.mv, p.bv, step.mask, p.scale,
                              self.parent.spec.options["absorb"])

    def _write(self, key_latents: Tensor, value_latents: Tensor, positions: Tensor, shared: dict) -> None:
        if self.outlier_channel is not None:
            self.outlier_channel.write(key_latents[..., :1], positions, shared)
        self.key_latents.write(key_latents[..., int(self.outlier):], positions, shared)
        self.value_latents.write(value_latents, positions, shared)

    def _read(self, step: Step) -> tuple[Tensor, Tensor]:
        keys = self.key_latents.read(step.stored_length, step.stored_positions, step.shared)
        if self.outlier_channel is not None:
            outlier = self.outlier_channel.read(step.stored_length, step.stored_positions, step.shared)
            keys = torch.cat((outlier, keys), dim=-1)
        return keys, self.value_latents.read(step.stored_length, step.stored_positions, step.shared)

    def _simulate(self, key_latents: Tensor) -> Tensor:
        if self.outlier_channel is None:
            return self.key_latents.simulate(key_latents)
        return torch.cat((key_latents[..., :1], self.key_latents.simulate(key_latents[..., 1:])), dim=-1)

    def tensors(self) -> list[Tensor]:
        streams = [self.key_latents, self.value_latents] + ([self.outlier_channel] if self.outlier_channel else [])
        # The SVD factors are derived weights (made once at load), not cached tokens: they are not counted here.
        return [t for s in streams for t in s.tensors()]


def latent_width(config) -> int:
    """Rank of the thin SVD of Wk (d × d_kv): d_kv, or d when the KV width exceeds the hidden size."""
    return min(config.kv_dim, config.hidden_size)


def latent_factors(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(U, M) with `weightᵀ = U·M`: U [d, r] the left singular vectors, M = Σ·Bᵀ [r, d_kv], r = min(d, d_kv) (exact)."""
    u, sigma, bt = torch.linalg.svd(weight.T.to(torch.float64), full_matrices=False)
    return u.to(weight.dtype).contiguous(), (sigma[:, None] * bt).to(weight.dtype).contiguous()
