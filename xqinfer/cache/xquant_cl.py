"""`xquant-cl`: cross-layer deltas of X against the previous layer's reconstruction (METHODS.md section 3).

Layers below `base_layers` store plain XQuant at `base_bits`; the last of them starts the accumulator
`X̂_i = X̂_{i-1} + Q(X_i - X̂_{i-1})`, which every later layer extends with its own delta at `bits`. The accumulator
is a working buffer rebuilt at every step (history and new tokens), held by the model-level cache.
GQA models store everything in the basis U_kv of each layer's [Wk | Wv] and keep the accumulator full width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import quant
from ..attention import attend_rebuilt, rebuild_keys
from ..rope import apply_rotary
from .base import Cache, CacheSpec, LayerCache, Option, Step, refuse, register
from .stream import FULL_PRECISION, QuantStream, stored_bits


@register("xquant-cl")
class XQuantCLCache(Cache):
    BENCHMARKED = ("xquant-cl:bits=2",)
    OPTIONS = {
        "bits": Option(2, choices=(1, 2, 3, 4, 8)),
        "base_bits": Option(4, choices=(2, 3, 4, 8)),
        "base_layers": Option(3, minimum=1),
        "group": Option(128, minimum=1),
        "absorb": Option(1, choices=(0, 1)),
        "eta": Option(0.0, minimum=0.0, maximum=0.5),
        # Ours, not [T]'s (methods.md, "shaping the stored basis"): how the stored latents are laid out and rounded.
        "key_weight": Option(1.0, minimum=0.01, maximum=100.0),
        "sigma_power": Option(0.0, minimum=0.0, maximum=1.0),
        "rotate": Option(0, choices=(0, 1)),
        "clip": Option(0, choices=(0, 1)),
        # Ours too: delta layers that store one bit more or less than `bits` ('+'-separated indices, e.g. 12+3).
        "more_bits": Option(None, kind=str),
        "fewer_bits": Option(None, kind=str),
    }

    def __init__(self, *args, **kwargs) -> None:
        # X̂ of the previous layer, for the stored slots and for this step's new tokens.
        self.previous_history: Tensor | None = None
        self.previous_new: Tensor | None = None
        super().__init__(*args, **kwargs)

    @classmethod
    def validate(cls, spec: CacheSpec) -> None:
        more, fewer = _layer_list(spec, "more_bits"), _layer_list(spec, "fewer_bits")
        if more & fewer:
            refuse(spec, f"layer {min(more & fewer)} is in both more_bits and fewer_bits")
        for key, layers, step in (("more_bits", more, 1), ("fewer_bits", fewer, -1)):
            if layers and spec.options["bits"] + step not in quant.BITS:
                refuse(spec, f"{key}: {spec.options['bits'] + step}-bit deltas are not stored "
                             f"(bits: {', '.join(map(str, quant.BITS))})")

    @classmethod
    def resolve(cls, spec: CacheSpec, config) -> CacheSpec:
        layers, base = config.num_layers, spec.options["base_layers"]
        if base > layers:
            refuse(spec, f"base_layers={base} exceeds the model's {layers} layers (accepted: 1..{layers})")
        for key in ("more_bits", "fewer_bits"):
            outside = [index for index in _layer_list(spec, key) if not base <= index < layers]
            if outside:
                refuse(spec, f"{key}: layer {outside[0]} is not a delta layer (accepted: {base}..{layers - 1})")
        return spec

    @classmethod
    def layer_bits(cls, spec: CacheSpec, index: int) -> int:
        """The code width of layer `index`: base layers at base_bits, the others at bits, one more or fewer where
        more_bits or fewer_bits name them."""
        o = spec.options
        if index < o["base_layers"]:
            return o["base_bits"]
        return o["bits"] + (index in _layer_list(spec, "more_bits")) - (index in _layer_list(spec, "fewer_bits"))

    @property
    def always_concat(self) -> bool:
        return True

    def make_layer(self, index: int) -> LayerCache:
        return XQuantCLLayer(self, index)

    def end(self) -> None:
        super().end()
        self.previous_history = self.previous_new = None

    @classmethod
    def layer_bits_per_element(cls, spec: CacheSpec, config, index: int, dtype: torch.dtype = torch.float16) -> float:
        o = spec.options
        width = min(2 * config.kv_dim, config.hidden_size) if config.is_gqa else config.hidden_size
        bits = cls.layer_bits(spec, index)
        if bits == FULL_PRECISION:
            per_element = float(torch.finfo(dtype).bits)
        else:
            per_element = stored_bits(bits, o["group"], width)
        return width * per_element / (2 * config.kv_dim)

    @classmethod
    def bits_label(cls, spec: CacheSpec, config) -> str:
        o = spec.options
        more, fewer = len(_layer_list(spec, "more_bits")), len(_layer_list(spec, "fewer_bits"))
        uneven = ", ".join(f"{count} at {o['bits'] + step}" for count, step in ((more, 1), (fewer, -1)) if count)
        return f"{o['bits']} (first {o['base_layers']} at {o['base_bits']}{'; ' + uneven if uneven else ''})"

    @classmethod
    def rebuild_flops_per_token(cls, spec: CacheSpec, config, index: int) -> float:
        # The accumulator is full width X̂: back from the U_kv basis (GQA), then K = X̂·Wk, V absorbed or rebuilt.
        d = config.hidden_size
        to_model_basis = 2 * min(2 * config.kv_dim, d) * d if config.is_gqa else 0
        keys = 2 * d * config.kv_dim
        values = 2 * config.num_heads * d if spec.options["absorb"] else 2 * d * config.kv_dim
        return float(to_model_basis + keys + values)


class XQuantCLLayer(LayerCache):
    def __init__(self, parent: XQuantCLCache, index: int) -> None:
        super().__init__(parent, index)
        o, config = parent.spec.options, parent.config
        self.is_base = index < o["base_layers"]
        shaped = o["key_weight"] != 1.0 or o["sigma_power"] or o["rotate"]
        self.encode, self.decode = (
            stored_basis(self.projection.wk, self.projection.wv, o["key_weight"], o["sigma_power"],
                         index if o["rotate"] else None)
            if config.is_gqa or shaped else (None, None)
        )
        width = self.encode.shape[1] if self.encode is not None else config.hidden_size
        bits = type(parent).layer_bits(parent.spec, index)
        self.stream = QuantStream((parent.batch_size,), parent.capacity, width, bits, o["group"], "token", 0,
                                  parent.dtype, parent.device, eta=o["eta"], clip=bool(o["clip"]))

    def attend(self, step: Step, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        parent, p, absorb = self.parent, self.projection, self.parent.spec.options["absorb"]
        source = x if self.is_base else x - parent.previous_new
        written: list[Tensor] = []
        stored = step.read_around_write(
            lambda: written.append(self.stream.write_reconstructed(self._to_stream_basis(source), step.positions)),
            lambda: self._to_model_basis(self.stream.read(step.stored_length, step.stored_positions, step.shared)),
        )
        new = self._to_model_basis(written[0])
        if not self.is_base:
            stored, new = parent.previous_history + stored, parent.previous_new + new
        parent.previous_history, parent.previous_new = stored, new
        keys = rebuild_keys(stored, p.wk.T, p.bk, p.head_dim, *step.stored_rope)
        if not step.concat:
            return attend_rebuilt(q, keys, stored, p.wv.T, p.bv, step.mask, p.scale, absorb)
        if parent.simulate:
            attended, new_keys = new, rebuild_keys(new, p.wk.T, p.bk, p.head_dim, step.cos, step.sin)
        else:
            attended, new_keys = x, apply_rotary(k, step.cos, step.sin)
        keys = torch.cat((keys, new_keys), dim=2)
        return attend_rebuilt(q, keys, torch.cat((stored, attended), dim=-2), p.wv.T, p.bv, step.mask, p.scale,
                              absorb)

    def _to_stream_basis(self, x: Tensor) -> Tensor:
        return x if self.encode is None else x @ self.encode

    def _to_model_basis(self, y: Tensor) -> Tensor:
        return y if self.decode is None else y @ self.decode

    def tensors(self) -> list[Tensor]:
        return self.stream.tensors()


def _layer_list(spec: CacheSpec, key: str) -> frozenset[int]:
    """The layer indices of a '+'-separated option (`more_bits=12+3`); refused unless they are integers."""
    text = spec.options[key]
    if not text:
        return frozenset()
    try:
        return frozenset(int(part) for part in text.split("+"))
    except ValueError:
        refuse(spec, f"{key}={text!r}: expected layer indices joined by '+' (e.g. {key}=12+3)")


def stored_basis(wk: Tensor, wv: Tensor, key_weight: float = 1.0, sigma_power: float = 0.0,
                 rotation_seed: int | None = None) -> tuple[Tensor, Tensor]:
    """(E, D): a layer stores `Q(ΔX·E)` and adds `Q(·)·D` to its accumulator; `E·D = U_kv·U_kvᵀ`.

    U_kv [d, r], r = min(d, 2·d_kv), are the left singular vectors of `[key_weight·Wk | Wv]` (the same span for
    any key_weight > 0). `E = U_kv·diag(w)·R`, `D = Rᵀ·diag(1/w)·U_kvᵀ` with `w = (σ/mean σ)^sigma_power`, so the
    rounding error lands in K and V scaled by `σ/w`; R is a random orthogonal matrix (seeded) that spreads every
    direction over every stored channel, or the identity. The defaults give [T]'s plain `E = U_kv`, `D = Eᵀ`.
    """
    stacked = torch.cat((key_weight * wk, wv), dim=0).T.to(torch.float64)
    u, sigma, _ = torch.linalg.svd(stacked, full_matrices=False)
    if not sigma_power and rotation_seed is None:
        encode = u.to(wk.dtype).contiguous()
        return encode, encode.T
    # A direction with σ ≈ 0 does not reach K or V; the floor only keeps D finite.
    weights = (sigma / sigma.mean()).clamp_min(1e-3) ** sigma_power
    encode, decode = u * weights, (u / weights).T
    if rotation_seed is not None:
        generator = torch.Generator().manual_seed(rotation_seed)
        rotation, _ = torch.linalg.qr(torch.randn(u.shape[1], u.shape[1], generator=generator, dtype=torch.float64))
        encode, decode = encode @ rotation, rotation.T @ decode
    return encode.to(wk.dtype).contiguous(), decode.to(wk.dtype).contiguous()
