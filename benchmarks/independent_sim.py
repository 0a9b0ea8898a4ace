"""`xqinfer ppl --protocol sim` against an independent simulation of the same methods, side by side in one run.

The independent side shares nothing with xqinfer's model or quantizers: Hugging Face transformers runs the same GGUF
(its own loader and Llama), and hooks written here from METHODS.md's definitions replace each K and V the attention
reads by its min-max fake-quantized value (the `sim` protocol: every K and V quantized, no residual window, groups
from the window's first token). Keys per channel in groups of G tokens, after RoPE (KIVI) or before it (KIVI*,
`prerope=1`, the k_proj output); values per token in groups of G channels of each head. Only the windows are
xqinfer's (its tokenizer and `make_windows`), so both sides score the same tokens.

    python benchmarks/independent_sim.py [--ctx 512] [--limit 16] [--json FILE]

Covered: KIVI at 2/3/4/8 bits, KIVI* at 2/3/4 bits, AsymKV's default (2-bit K, 1-bit V in every layer), and
XQuant-KV (per-layer bits, the eta calibration, odd layers reading the previous layer's codes with their own min and
max): its default, with every odd layer sharing, and at 1 bit everywhere. xquant's GQA latents and XQuant-CL's
deltas are not simulated here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
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


# (xqinfer spec, the per-layer plan for a model of L layers, group, keys before RoPE)
METHODS = [
    ("kivi:bits=8", uniform(8, 8), 32, False),
    ("kivi:bits=4", uniform(4, 4), 32, False),
    ("kivi:bits=3", uniform(3, 3), 32, False),
    ("kivi:bits=2", uniform(2, 2), 32, False),
    ("kivi:bits=4,group=128,prerope=1", uniform(4, 4), 128, True),
    ("kivi:bits=3,group=128,prerope=1", uniform(3, 3), 128, True),
    ("kivi:bits=2,group=128,prerope=1", uniform(2, 2), 128, True),
    ("asymkv", uniform(2, 1), 32, False),
    ("xquant-kv", xquant_kv(), 32, False),
    ("xquant-kv:km=0,vm=0", xquant_kv(km=0, vm=0), 32, False),
    ("xquant-kv:kq=0,vq=0", xquant_kv(kq=0), 32, False),
]


def fake_quantize(x: torch.Tensor, side: Side, dim: int, codes: torch.Tensor | None = None):
    """(x's slices along `dim` quantized min-max and read back, their codes): codes round((x - min) / s) clamped,
    s = (max - min) / (2^b - 1), read back as c (1 - 2 eta) s + min + eta (2^b - 1) s; a constant slice reads back
    as its value. `codes`: another tensor's codes, read back with x's own min and max (shared codes)."""
    levels = 2**side.bits - 1
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (high - low) / levels
    if codes is None:
        codes = torch.where(scale > 0, ((x - low) / scale).round().clamp(0, levels), torch.zeros_like(x))
    return codes * ((1 - 2 * side.eta) * scale) + low + side.eta * levels * scale, codes


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


@contextmanager
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


def hf_perplexity(model, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            tokens = torch.tensor([window])
            logits = model(tokens).logits[0, :-1].float()
            nll += F.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
            count += len(window) - 1
    return math.exp(nll / count)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--limit", type=int, default=16, help="windows")
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON (a new file)")
    args = parser.parse_args(argv)
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; choose a new file")
    if not args.dataset.is_file():
        sys.exit(f"error: no dataset at {args.dataset} (see ../shared/ASSETS.md)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        sys.exit("error: the independent side needs transformers and gguf: pip install -e '.[test]'")
    import xqinfer.api
    from xqinfer.ppl import make_windows, perplexity, read_text

    llm = xqinfer.api.load()
    gguf = xqinfer.api.default_model()
    ids = llm.tokenizer.encode(read_text(args.dataset), add_bos=True)
    windows = make_windows(ids, args.ctx, args.limit)
    started = time.time()
    ours = perplexity(llm, args.dataset, [spec for spec, *_ in METHODS], ctx=args.ctx, protocol="sim",
                      limit=args.limit)
    ours_ppl = {str(score.spec): math.exp(score.nll_sum / score.tokens) for score in ours.scores}
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    baseline = ours_ppl[str(ours.scores[0].spec)]
    rows = [{"method": "fp16", "xqinfer": baseline, "independent": hf_perplexity(hf, windows)}]
    layers = hf.config.num_hidden_layers
    for (spec, plan, group, prerope), score in zip(METHODS, ours.scores[1:], strict=True):
        with simulated(hf, plan(layers), group, prerope):
            rows.append({"method": str(score.spec), "xqinfer": ours_ppl[str(score.spec)],
                         "independent": hf_perplexity(hf, windows)})
    print(f"WikiText-2 test, ctx {args.ctx}, {len(windows)} windows, sim; {time.time() - started:.0f} s\n")
    print("| method | xqinfer PPL | independent PPL | difference |")
    print("|---|---:|---:|---:|")
    for row in rows:
        row["relative_difference"] = row["xqinfer"] / row["independent"] - 1
        print(f"| `{row['method']}` | {row['xqinfer']:.4f} | {row['independent']:.4f} | "
              f"{100 * row['relative_difference']:+.2f}% |")
    if args.json is not None:
        with args.json.open("x") as handle:
            json.dump({"ctx": args.ctx, "windows": len(windows), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
