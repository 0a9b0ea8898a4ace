"""`xqinfer ppl --protocol sim` against an independent simulation of the same methods, side by side in one run.

The independent side shares nothing with xqinfer's model or quantizers: Hugging Face transformers runs the same GGUF
(its own loader and Llama), and hooks written here from METHODS.md's definitions replace what the attention reads by
its min-max fake-quantized value (the `sim` protocol: everything quantized, no residual window, groups from the
window's first token). KV methods: keys per channel in groups of G tokens, after RoPE (KIVI) or before it (KIVI*,
`prerope=1`, the k_proj output); values per token in groups of G channels of each head. XQuant (GQA): k_proj and
v_proj read their input X through its SVD latents, X·Uk per channel and X·Uv per token. XQuant-CL (GQA): both read
the accumulator X̂_i = X̂_(i-1) + Q((X_i - X̂_(i-1))·U_kv)·U_kvᵀ, per token. Only the windows are xqinfer's (its
tokenizer and `make_windows`), so both sides score the same tokens.

    python benchmarks/independent_sim.py [--ctx 512] [--limit 16] [--method PREFIX ...] [--json FILE]

Covered: KIVI at 2/3/4/8 bits, KIVI* at 2/3/4 bits, AsymKV's default (2-bit K, 1-bit V in every layer), XQuant-KV
(per-layer bits, the eta calibration, odd layers reading the previous layer's codes with their own min and max: its
default, with every odd layer sharing, and at 1 bit everywhere), XQuant's GQA latents at 2/3/4 bits (with
`outlier=1` and `eta`), and XQuant-CL at 2/3/4 bits (with `eta`). The XQuant sides need a GQA model (the default
SmolLM2 is one).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "data" / "wikitext2-test.txt"

ETA = {1: 1 / 6, 2: 0.045}  # XQuant-KV's calibration by code width (eta1, eta2)


@dataclass(frozen=True)
class Side:
    """How one layer's K or V is fake-quantized: code bits, calibration eta, and whether it reads the codes of the
    layer before it (with its own min and max)."""
    bits: int
    eta: float = 0.0
    shared: bool = False
    storage: torch.dtype = torch.float32  # of the scale and zero; float16 rounded outward, as xqinfer stores them


def uniform(key_bits: int, value_bits: int):
    return lambda layers: [(Side(key_bits), Side(value_bits))] * layers


def xquant_kv(kq: int | None = None, vq: int = 0, km: int | None = None, vm: int | None = None):
    """XQuant-KV's layers from METHODS.md section 6: 2-bit keys below kq (values below vq), 1-bit above; an odd
    layer at or above km (vm) reads the previous layer's key (value) codes; eta by code width."""
    def plan(layers: int):
        key_from, value_from = layers if km is None else km, layers // 2 if vm is None else vm
        rows = []
        for index in range(layers):
            key_bits = 2 if index < (layers if kq is None else kq) else 1
            value_bits = 2 if index < vq else 1
            rows.append((Side(key_bits, ETA[key_bits], index % 2 == 1 and index >= key_from),
                         Side(value_bits, ETA[value_bits], index % 2 == 1 and index >= value_from)))
        return rows
    return plan


def kv(plan, group: int = 32, prerope: bool = False):
    """A KV method: the per-layer plan, the group, and whether keys are quantized before RoPE."""
    def simulation(model, storage: torch.dtype):
        layers = [(replace(k, storage=storage), replace(v, storage=storage))
                  for k, v in plan(model.config.num_hidden_layers)]
        return simulated(model, layers, group, prerope)
    return simulation


def latents(bits: int, group: int = 128, outlier: bool = False, eta: float = 0.0):
    return lambda model, storage: xquant_latents(model, Side(bits, eta, storage=storage), group, outlier)


def deltas(bits: int, base_bits: int = 4, base_layers: int = 3, group: int = 128, eta: float = 0.0):
    return lambda model, storage: xquant_cl_deltas(model, Side(bits, eta, storage=storage),
                                                   Side(base_bits, eta, storage=storage), base_layers, group)


# (xqinfer spec, its independent simulation: (model, storage of scales and zeros) -> context manager)
METHODS = [
    ("kivi:bits=8", kv(uniform(8, 8))),
    ("kivi:bits=4", kv(uniform(4, 4))),
    ("kivi:bits=3", kv(uniform(3, 3))),
    ("kivi:bits=2", kv(uniform(2, 2))),
    ("kivi:bits=4,group=128,prerope=1", kv(uniform(4, 4), 128, True)),
    ("kivi:bits=3,group=128,prerope=1", kv(uniform(3, 3), 128, True)),
    ("kivi:bits=2,group=128,prerope=1", kv(uniform(2, 2), 128, True)),
    ("asymkv", kv(uniform(2, 1))),
    ("xquant-kv", kv(xquant_kv())),
    ("xquant-kv:km=0,vm=0", kv(xquant_kv(km=0, vm=0))),
    ("xquant-kv:kq=0,vq=0", kv(xquant_kv(kq=0))),
    ("xquant:bits=4", latents(4)),
    ("xquant:bits=3", latents(3)),
    ("xquant:bits=2", latents(2)),
    ("xquant:bits=2,outlier=1", latents(2, outlier=True)),
    ("xquant:bits=2,eta=0.045", latents(2, eta=0.045)),
    ("xquant-cl:bits=4", deltas(4)),
    ("xquant-cl:bits=3", deltas(3)),
    ("xquant-cl:bits=2", deltas(2)),
    ("xquant-cl:bits=2,eta=0.045", deltas(2, eta=0.045)),
]


def stored(x: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    """x as a `dtype` value, the nearest one on the side of `direction` (±inf) when x falls between two."""
    if dtype == torch.float32:
        return x
    nearest = x.to(dtype)
    beyond = nearest.float() < x if direction > 0 else nearest.float() > x
    return torch.where(beyond, torch.nextafter(nearest, torch.full_like(nearest, direction)), nearest).float()


def fake_quantize(x: torch.Tensor, side: Side, dim: int, codes: torch.Tensor | None = None):
    """(x's slices along `dim` quantized min-max and read back, their codes): the zero z is the min and the scale
    s = (max - z) / (2^b - 1), both stored as `side.storage` (the zero rounded down, the scale up, so the range stays
    covered); codes round((x - z) / s) clamped, read back as ẑ + c·ŝ with ẑ = z + eta (2^b - 1) s and
    ŝ = (1 - 2 eta) s (METHODS.md section 6); a constant slice reads back as its value.
    `codes`: another tensor's codes, read back with x's own min and max (shared codes)."""
    levels = 2**side.bits - 1
    zero = stored(x.amin(dim, keepdim=True), side.storage, -math.inf)
    scale = stored((x.amax(dim, keepdim=True) - zero).clamp_min(0) / levels, side.storage, math.inf)
    if codes is None:
        codes = torch.where(scale > 0, ((x - zero) / scale).round().clamp(0, levels), torch.zeros_like(x))
    return torch.addcmul(zero + side.eta * levels * scale, codes, (1 - 2 * side.eta) * scale), codes


def per_channel(x: torch.Tensor, side: Side, group: int, token_dim: int, codes: torch.Tensor | None = None):
    """Each channel quantized over groups of `group` consecutive tokens (the last one shorter)."""
    parts = x.split(group, dim=token_dim)
    shared = codes.split(group, dim=token_dim) if codes is not None else [None] * len(parts)
    out = [fake_quantize(part, side, token_dim, c) for part, c in zip(parts, shared)]
    return torch.cat([o for o, _ in out], dim=token_dim), torch.cat([c for _, c in out], dim=token_dim)


def per_token(x: torch.Tensor, side: Side, group: int, head_dim: int, codes: torch.Tensor | None = None):
    """x [..., heads * head_dim]: each token's channels quantized in groups of `group` within each head."""
    heads = x.view(*x.shape[:-1], -1, head_dim)
    parts = heads.split(group, dim=-1)
    shared = codes.split(group, dim=-1) if codes is not None else [None] * len(parts)
    out = [fake_quantize(part, side, -1, c) for part, c in zip(parts, shared)]
    return torch.cat([o for o, _ in out], dim=-1).view(x.shape), torch.cat([c for _, c in out], dim=-1)


@contextlib.contextmanager
def simulated(model, plan, group: int, prerope: bool):
    """The model's attention reads fake-quantized K and V while inside, layer i's as plan[i] = (keys, values)."""
    from transformers.models.llama import modeling_llama

    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else (
        model.config.hidden_size // model.config.num_attention_heads)
    codes: dict[tuple[str, int], torch.Tensor] = {}  # this forward's codes, for the layer after to share
    current = [0]  # the layer whose attention runs (the rotary function is not told)

    def quantized(kind: str, index: int, side: Side, x: torch.Tensor, quantize) -> torch.Tensor:
        out, codes[kind, index] = quantize(x, side, codes.get((kind, index - 1)) if side.shared else None)
        return out

    handles = []
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        keys, values = plan[index]
        handles.append(attention.register_forward_pre_hook(
            lambda module, args, index=index: current.__setitem__(0, index)))
        handles.append(attention.v_proj.register_forward_hook(
            lambda module, args, out, index=index, side=values: quantized(
                "v", index, side, out, lambda x, s, c: per_token(x, s, group, head_dim, c))))
        if prerope:  # k_proj's output [B, T, Hkv * D]: tokens on dim 1
            handles.append(attention.k_proj.register_forward_hook(
                lambda module, args, out, index=index, side=keys: quantized(
                    "k", index, side, out, lambda x, s, c: per_channel(x, s, group, 1, c))))
    rotary = modeling_llama.apply_rotary_pos_emb
    if not prerope:  # the rotated keys [B, Hkv, T, D]: tokens on dim 2
        def quantized_rotary(q, k, cos, sin, *args, **kwargs):
            q, k = rotary(q, k, cos, sin, *args, **kwargs)
            index = current[0]
            return q, quantized("k", index, plan[index][0], k, lambda x, s, c: per_channel(x, s, group, 2, c))
        modeling_llama.apply_rotary_pos_emb = quantized_rotary
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = rotary
        for handle in handles:
            handle.remove()


def left_singular(weight_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, Σ·Bᵀ) of the thin SVD of `weight_t` (d × n, row-vector convention), in float64, returned in float32."""
    u, sigma, bt = torch.linalg.svd(weight_t.double(), full_matrices=False)
    return u.float(), (sigma[:, None] * bt).float()


def require_gqa(model) -> None:
    if model.config.num_key_value_heads >= model.config.num_attention_heads:
        sys.exit("error: the XQuant simulations here are of the GQA variant; this model is MHA")


@contextlib.contextmanager
def xquant_latents(model, side: Side, group: int, outlier: bool):
    """k_proj and v_proj of every layer output (Q(X·U)·Σ·Bᵀ) instead of X·W: the key latents quantized per channel
    over groups of `group` tokens (channel 0 left exact with `outlier`), the value latents per token in groups of
    `group` channels of the whole latent row."""
    require_gqa(model)

    def rebuilt(module, args, out, u, m, per_channel_groups: bool):
        z = args[0] @ u  # [B, T, r]
        if per_channel_groups:
            kept = int(outlier)
            z = torch.cat((z[..., :kept], per_channel(z[..., kept:], side, group, 1)[0]), dim=-1)
        else:
            z = per_token(z, side, group, z.shape[-1])[0]
        return z @ m + (module.bias if module.bias is not None else 0)

    handles = []
    for layer in model.model.layers:
        for projection, keys in ((layer.self_attn.k_proj, True), (layer.self_attn.v_proj, False)):
            u, m = left_singular(projection.weight.T)
            handles.append(projection.register_forward_hook(
                functools.partial(rebuilt, u=u, m=m, per_channel_groups=keys)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def xquant_cl_deltas(model, side: Side, base: Side, base_layers: int, group: int):
    """k_proj and v_proj of layer i read X̂_i instead of X_i: below `base_layers`, X̂_i = Q(X_i·U)·Uᵀ at the base's
    bits; above, X̂_i = X̂_(i-1) + Q((X_i - X̂_(i-1))·U)·Uᵀ, U the left singular vectors of layer i's [Wk | Wv], every
    Q per token in groups of `group` channels."""
    require_gqa(model)
    rebuilt: dict[int, torch.Tensor] = {}  # this forward's X̂ by layer

    def keys(module, args, out, index: int, basis: torch.Tensor):
        x = args[0]
        previous = rebuilt.get(index - 1) if index >= base_layers else None
        source = x if previous is None else x - previous
        coordinates = per_token(source @ basis, base if previous is None else side, group, basis.shape[1])[0]
        rebuilt[index] = coordinates @ basis.T if previous is None else previous + coordinates @ basis.T
        return F.linear(rebuilt[index], module.weight, module.bias)

    handles = []
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        basis, _ = left_singular(torch.cat((attention.k_proj.weight, attention.v_proj.weight)).T)
        handles.append(attention.k_proj.register_forward_hook(functools.partial(keys, index=index, basis=basis)))
        # Llama's attention calls k_proj before v_proj, so v_proj reads the X̂ that k_proj's hook just rebuilt.
        handles.append(attention.v_proj.register_forward_hook(
            lambda module, args, out, index=index: F.linear(rebuilt[index], module.weight, module.bias)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits[0].float(), dim=-1)


class Tally:
    """One side's negative log-likelihood over the windows, and its largest log-probability gap to another side."""

    def __init__(self) -> None:
        self.nll, self.count, self.gap = 0.0, 0, 0.0

    def add(self, scores: torch.Tensor, tokens: torch.Tensor, other: torch.Tensor | None = None) -> None:
        self.nll -= scores[:-1].gather(-1, tokens[0, 1:, None]).sum().item()
        self.count += tokens.shape[1] - 1
        if other is not None:
            self.gap = max(self.gap, (scores - other).abs().max().item())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--limit", type=int, default=16, help="windows")
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--method", action="append", metavar="PREFIX",
                        help="only the methods whose spec starts with PREFIX (repeatable; default: all)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON (a new file)")
    args = parser.parse_args(argv)
    methods = [m for m in METHODS if not args.method or any(m[0].startswith(p) for p in args.method)]
    if not methods:
        parser.error(f"no method starts with {', '.join(args.method)}; known: {', '.join(m[0] for m in METHODS)}")
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; choose a new file")
    if not args.dataset.is_file():
        sys.exit(f"error: no dataset at {args.dataset} (see ../shared/ASSETS.md)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        sys.exit("error: the independent side needs transformers and gguf: pip install -e '.[test]'")
    import xqinfer.api
    from xqinfer.cache import make_cache
    from xqinfer.ppl import make_windows, read_text, window_logits

    llm = xqinfer.api.load()
    gguf = xqinfer.api.default_model()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = llm.tokenizer.encode(read_text(args.dataset), add_bos=True)
    windows = make_windows(ids, args.ctx, args.limit)
    caches = [make_cache(spec, llm.model, args.ctx) for spec in ["fp16"] + [spec for spec, _ in methods]]
    for cache in caches:
        cache.simulate = True
    simulations = [lambda model, storage: contextlib.nullcontext()] + [simulation for _, simulation in methods]
    tallies = [{side: Tally() for side in ("xqinfer", "float16", "float32")} for _ in caches]
    started = time.time()
    with torch.inference_mode():
        for window in windows:
            tokens = torch.tensor([window])
            for cache, simulation, tally in zip(caches, simulations, tallies):
                ours = log_probs(window_logits(llm, cache, tokens, "sim", 1))
                tally["xqinfer"].add(ours, tokens)
                for storage in (torch.float16, torch.float32):
                    with simulation(hf, storage):
                        tally[str(storage).removeprefix("torch.")].add(log_probs(hf(tokens).logits), tokens, ours)
    print(f"WikiText-2 test, ctx {args.ctx}, {len(windows)} windows, sim; {time.time() - started:.0f} s\n")
    print("| method | xqinfer PPL | independent, fp16 scales | max abs Δ log p | independent, float32 scales | "
          "difference |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for cache, tally in zip(caches, tallies):
        ours, same, exact = tally["xqinfer"], tally["float16"], tally["float32"]
        rows.append({"method": str(cache.spec), "xqinfer": ours.ppl, "independent_fp16_scales": same.ppl,
                     "max_abs_log_prob_gap": same.gap, "independent_float32_scales": exact.ppl,
                     "relative_difference_float32": ours.ppl / exact.ppl - 1})
        print(f"| `{cache.spec}` | {ours.ppl:.4f} | {same.ppl:.4f} | {same.gap:.1e} | {exact.ppl:.4f} | "
              f"{100 * (ours.ppl / exact.ppl - 1):+.2f}% |")
    if args.json is not None:
        with args.json.open("x") as handle:
            json.dump({"ctx": args.ctx, "windows": len(windows), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
