"""`xqinfer ppl --protocol sim` against an independent simulation of the same methods, side by side in one run.

The independent side shares nothing with xqinfer's model or quantizers: Hugging Face transformers runs the same GGUF
(its own loader and Llama), and hooks written here from METHODS.md's definitions replace each K and V the attention
reads by its min-max fake-quantized value (the `sim` protocol: every K and V quantized, no residual window, groups
from the window's first token). Keys per channel in groups of G tokens, after RoPE (KIVI) or before it (KIVI*,
`prerope=1`, the k_proj output); values per token in groups of G channels of each head. Only the windows are
xqinfer's (its tokenizer and `make_windows`), so both sides score the same tokens.

    python benchmarks/independent_sim.py [--ctx 512] [--limit 16] [--json FILE]

Covered: KIVI at 2/3/4/8 bits, KIVI* at 2/3/4 bits, AsymKV's default (2-bit K, 1-bit V in every layer). xquant's
GQA latents, XQuant-CL's deltas and XQuant-KV's shared codes are not simulated here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "data" / "wikitext2-test.txt"

# (xqinfer spec, key bits, value bits, group, keys before RoPE)
METHODS = [
    ("kivi:bits=8", 8, 8, 32, False),
    ("kivi:bits=4", 4, 4, 32, False),
    ("kivi:bits=3", 3, 3, 32, False),
    ("kivi:bits=2", 2, 2, 32, False),
    ("kivi:bits=4,group=128,prerope=1", 4, 4, 128, True),
    ("kivi:bits=3,group=128,prerope=1", 3, 3, 128, True),
    ("kivi:bits=2,group=128,prerope=1", 2, 2, 128, True),
    ("asymkv", 2, 1, 32, False),
]


def fake_quantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min-max quantization of x's slices along `dim`, read back: round((x - min) / s) s + min with
    s = (max - min) / (2^b - 1); a constant slice reads back as its value."""
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (high - low) / (2**bits - 1)
    codes = torch.where(scale > 0, ((x - low) / scale).round().clamp(0, 2**bits - 1), torch.zeros_like(x))
    return codes * scale + low


def per_channel(x: torch.Tensor, bits: int, group: int, token_dim: int) -> torch.Tensor:
    """Each channel quantized over groups of `group` consecutive tokens (the last one shorter)."""
    return torch.cat([fake_quantize(part, bits, token_dim) for part in x.split(group, dim=token_dim)], dim=token_dim)


def per_token(x: torch.Tensor, bits: int, group: int, head_dim: int) -> torch.Tensor:
    """x [..., heads * head_dim]: each token's channels quantized in groups of `group` within each head."""
    heads = x.view(*x.shape[:-1], -1, head_dim)
    parts = [fake_quantize(part, bits, -1) for part in heads.split(group, dim=-1)]
    return torch.cat(parts, dim=-1).view(x.shape)


@contextmanager
def simulated(model, key_bits: int, value_bits: int, group: int, prerope: bool):
    """The model's attention reads fake-quantized K and V while inside."""
    from transformers.models.llama import modeling_llama

    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else (
        model.config.hidden_size // model.config.num_attention_heads)
    handles = []
    for layer in model.model.layers:
        attention = layer.self_attn
        handles.append(attention.v_proj.register_forward_hook(
            lambda module, args, out: per_token(out, value_bits, group, head_dim)))
        if prerope:  # k_proj's output [B, T, Hkv * D]: tokens on dim 1
            handles.append(attention.k_proj.register_forward_hook(
                lambda module, args, out: per_channel(out, key_bits, group, token_dim=1)))
    rotary = modeling_llama.apply_rotary_pos_emb
    if not prerope:  # the rotated keys [B, Hkv, T, D]: tokens on dim 2
        def quantized_rotary(q, k, cos, sin, *args, **kwargs):
            q, k = rotary(q, k, cos, sin, *args, **kwargs)
            return q, per_channel(k, key_bits, group, token_dim=2)
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
    for (spec, key_bits, value_bits, group, prerope), score in zip(METHODS, ours.scores[1:], strict=True):
        with simulated(hf, key_bits, value_bits, group, prerope):
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
