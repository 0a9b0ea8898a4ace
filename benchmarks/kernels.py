"""Fused XQuant decode attention (Triton) vs the torch path, per layer, at Llama-3.1-8B shapes, on one CUDA GPU.

    python benchmarks/kernels.py                                    # 4k 16k 32k, bf16, 4-bit, batch 1
    python benchmarks/kernels.py --context 32k --bits 4 2 --batch 1 8 --out kernels.json

Shapes (one layer of Llama-3.1-8B under `xquant` GQA): 32 query heads, 8 KV heads, head_dim 128, latent width
C = kv_dim = 1024 per stream; keys per channel, values per token, group 128 (fp16 scale and zero), a full-precision
residual ring of 128 tokens (`--residual`); one query token per sequence. Both paths compute `p · L̂v` [B, 32, 1024]
(V absorbed; the Mv projection that follows is the same for both and is not timed):
- fused: `xqinfer.kernels.fused_latent_attention` (the split kernel + the combine kernel), for every tiling of
  `--configs` (the fastest is reported as `fused`);
- torch: `xqinfer.kernels.latent_attention_reference`, i.e. what the cache does today (unpack, dequantize, rebuild
  K = L̂k·Mk, RoPE, SDPA-like absorbed attention), with the dequantized history written to memory.

Timing: CUDA events around `--reps` replays of a CUDA graph holding one call (the engine replays decode steps as
graphs too, so no Python launch overhead is counted), after `--warmup` replays; eager timings (events around plain
calls) are reported next to them. Median over `--repeats` measurements.

Rates:
- `rebuild_tflops`: the key rebuild's flops, 2·B·span·C·kv_dim (exactly what the kernel's K-tile dots execute), over
  the fused time; `tensor_flops` adds the score dots as executed (query rows padded to 16, block-diagonal over
  kv_block heads) and the value dots (2·B·span·H·C).
- `gbps`: bytes that must come from memory at least once (codes, fp16 scales/zeros, Mk, RoPE tables, the ring rows,
  q) over the time; the fp32 scratch traffic (scores, per-slice partials) is reported apart in `scratch_bytes`.
- next to them, the same run's measured bf16 matmul peak (`--matmul` cube, torch.matmul) and device-to-device copy
  bandwidth (`--copy-gib` GiB, counted as bytes read + bytes written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HEADS, KV_HEADS, HEAD_DIM, CHANNELS, GROUP, LAYERS = 32, 8, 128, 1024, 128, 32
DEVICE = "cuda"
CONTEXTS = {"4k": 4096, "8k": 8192, "16k": 16384, "32k": 32768, "64k": 65536, "128k": 131072}
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# block_n,block_c,block_cv,kv_block,num_warps,num_stages; splits are left to the default (about 2 programs per
# SM). The first is the kernel's default. ptxas (sm_90) register counts, all without spill: 128,64,*,1,8,2: 248-254;
# 128,64,*,1,8,1: 240; 128,32,*,1,8,2: 254; 64,64,*,1,4,2: 251-254; 64,64,*,1,4,1: 168. kv_block 2 spills
# (64-500 bytes) at every tiling tried: it is there to be measured, not as a recommendation.
DEFAULT_CONFIGS = ["128,64,64,1,8,2", "128,64,64,1,8,1", "128,32,64,1,8,2", "128,64,128,1,8,2", "64,64,64,1,4,2",
                   "64,64,64,1,4,3", "64,64,64,1,4,1", "64,64,64,2,4,1"]


def context_tokens(text: str) -> int:
    key = text.strip().lower()
    if key in CONTEXTS:
        return CONTEXTS[key]
    try:
        value = int(key[:-1]) * 1024 if key.endswith("k") else int(key)
    except ValueError:
        raise argparse.ArgumentTypeError(f"context {text!r}: expected e.g. 4k, 16k, 32k or a token count") from None
    if value < GROUP or value % GROUP:
        raise argparse.ArgumentTypeError(f"context {text!r}: must be a positive multiple of the group ({GROUP})")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", nargs="+", type=context_tokens, default=[4096, 16384, 32768],
                        help="cached tokens per sequence: 4k, 16k, 32k ... (default: 4k 16k 32k)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model dtype (default bf16)")
    parser.add_argument("--bits", nargs="+", type=int, default=[4], choices=(2, 3, 4, 8),
                        help="code width of both latent streams (default 4)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="sequences per step (default 1)")
    parser.add_argument("--residual", type=int, default=128, help="full-precision ring tokens, 0 for none")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="N,C,CV,KVB,WARPS,STAGES",
                        help="fused tilings to time: block_n,block_c,block_cv,kv_block,num_warps,num_stages")
    parser.add_argument("--warmup", type=int, default=10, help="untimed replays before measuring (default 10)")
    parser.add_argument("--reps", type=int, default=50, help="replays per measurement (default 50)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements, the median is reported (default 5)")
    parser.add_argument("--matmul", type=int, default=8192, help="cube size of the bf16 matmul peak (default 8192)")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="GiB copied for the bandwidth peak (default 2)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch path (it needs ~GBs at long spans)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    if min(args.batch) < 1 or args.reps < 1 or args.repeats < 1 or args.warmup < 0 or args.residual < 0:
        parser.error("need --batch >= 1, --reps >= 1, --repeats >= 1, --warmup >= 0, --residual >= 0")
    try:
        args.configs = [tuple(int(v) for v in c.split(",")) for c in args.configs]
    except ValueError:
        parser.error("--configs: expected block_n,block_c,block_cv,kv_block,num_warps,num_stages (integers)")
    if any(len(c) != 6 for c in args.configs):
        parser.error("--configs: expected 6 integers each: block_n,block_c,block_cv,kv_block,num_warps,num_stages")
    return args


def require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing run")
    from xqinfer.kernels import triton_available

    if not triton_available():
        raise SystemExit("benchmarks/kernels.py needs triton: pip install 'xqinfer[triton]'")


# ------------------------------------------------------------------------------------------------------- timing


def time_ms(fn, warmup: int, reps: int, repeats: int, graph: bool) -> float:
    """Median over `repeats` of the mean milliseconds per call of `fn` (replayed as a CUDA graph when `graph`)."""
    import torch

    run = fn
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (and compile) outside the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        run = captured.replay
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / reps)
    return statistics.median(samples)


def matmul_peak(n: int, args) -> dict:
    import torch

    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=DEVICE, dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.matmul(a, b, out=out), 3, max(5, args.reps // 5), args.repeats, graph=False)
    return {"n": n, "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


def copy_peak(gib: float, args) -> dict:
    import torch

    count = int(gib * 2**30) // 2
    src = torch.empty(count, device=DEVICE, dtype=torch.bfloat16).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 3, max(5, args.reps // 5), args.repeats, graph=False)
    moved = 2 * src.numel() * src.element_size()  # read + write
    return {"gib": gib, "ms": ms, "gbps": moved / ms / 1e6}


# ------------------------------------------------------------------------------------------------------- problem


def build_problem(batch: int, span: int, bits: int, dtype, residual: int, seed: int):
    """A decode step's arguments as an XQuant GQA layer holds them: span tokens cached, the newest in the ring."""
    import torch

    from xqinfer import quant
    from xqinfer.kernels import Override, QuantizedHistory

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (batch, span, CHANNELS)
    key_latents = torch.randn(shape, device=DEVICE, generator=g) * 2 + torch.randn(CHANNELS, device=DEVICE, generator=g)
    value_latents = torch.randn(shape, device=DEVICE, generator=g)
    kq = quant.quantize_per_channel(key_latents, bits, GROUP)
    vq = quant.quantize_per_token(value_latents, bits, GROUP)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE, generator=g).to(dtype)
    mk = (torch.randn(CHANNELS, KV_HEADS * HEAD_DIM, device=DEVICE, generator=g) / math.sqrt(CHANNELS)).to(dtype)
    positions = torch.arange(span, device=DEVICE)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    mask = torch.ones(span, dtype=torch.bool, device=DEVICE)

    def ring_override(latents):
        if not residual:
            return None
        ring_rows = positions % residual
        ring = torch.zeros(batch, residual, CHANNELS, device=DEVICE, dtype=dtype)
        ring[:, ring_rows[-residual:]] = latents[:, -residual:].to(dtype)
        return Override(positions >= span - residual, ring, ring_rows)

    keys = QuantizedHistory(kq.codes, kq.scale, kq.zero, bits, ring_override(key_latents))
    values = QuantizedHistory(vq.codes, vq.scale, vq.zero, bits, ring_override(value_latents))
    return q, keys, values, mk, cos, sin, mask, GROUP


def work(batch: int, span: int, bits: int, dtype_bytes: int, residual: int, splits: int, kv_block: int) -> dict:
    """Flops the kernels' dots execute and bytes that must be read at least once, for one layer."""
    from xqinfer.quant import packed_size

    group = HEADS // KV_HEADS
    rows = max(16, 1 << (kv_block * group - 1).bit_length())  # query rows of the score dot, block-diagonal q
    rebuild = 2 * batch * span * CHANNELS * KV_HEADS * HEAD_DIM
    scores = 2 * batch * span * (KV_HEADS // kv_block) * rows * kv_block * HEAD_DIM
    values = 2 * batch * span * max(16, 1 << (HEADS - 1).bit_length()) * CHANNELS
    codes = 2 * batch * span * packed_size(CHANNELS, bits)
    params = 2 * 2 * batch * (span // GROUP) * CHANNELS + 2 * 2 * batch * span * (CHANNELS // GROUP)
    ring = 2 * batch * min(residual, span) * CHANNELS * dtype_bytes
    weights = CHANNELS * KV_HEADS * HEAD_DIM * dtype_bytes + 2 * span * HEAD_DIM * dtype_bytes
    q = batch * HEADS * HEAD_DIM * dtype_bytes
    scratch = 4 * batch * HEADS * span * 2 + 4 * batch * HEADS * splits * (CHANNELS + 2) * 2
    return {"rebuild_flops": rebuild, "tensor_flops": rebuild + scores + values,
            "bytes": codes + params + ring + weights + q, "scratch_bytes": scratch}


def exact_fp32(history):
    """The `QuantizedHistory` with its ring rows in fp32 (codes, scales and zeros as stored)."""
    if history.override is None:
        return history
    return dataclasses.replace(history, override=history.override._replace(exact=history.override.exact.float()))


def relative_error(out, exact) -> float:
    return ((out.float() - exact.float()).norm() / exact.float().norm()).item()


def run_case(batch: int, span: int, bits: int, args, peaks: dict) -> dict:
    import torch

    from xqinfer.kernels import KernelConfig, fused, latent_attention_reference

    dtype = getattr(torch, DTYPES[args.dtype])
    problem = build_problem(batch, span, bits, dtype, args.residual, args.seed)
    row = {"batch": batch, "context": span, "bits": bits, "dtype": args.dtype, "residual": args.residual}

    q, keys, values, mk, cos, sin, mask, group = problem
    exact = latent_attention_reference(q.float(), exact_fp32(keys), exact_fp32(values), mk.float(), cos.float(),
                                       sin.float(), mask, group)

    configs = []
    for block_n, block_c, block_cv, kv_block, warps, stages in args.configs:
        config = KernelConfig(block_n=block_n, block_c=block_c, block_cv=block_cv, kv_block=kv_block,
                              num_warps=warps, num_stages=stages)
        entry = {"block_n": block_n, "block_c": block_c, "block_cv": block_cv, "kv_block": kv_block,
                 "num_warps": warps, "num_stages": stages}
        try:
            launch = fused.prepare(*problem, config=config)
            out = fused.fused_latent_attention(*problem, config=config)
            entry["splits"] = launch.calls[0].grid[1]
            entry["rel_error"] = relative_error(out, exact)

            def call(config=config):
                return fused.fused_latent_attention(*problem, config=config)

            entry["graph_ms"] = time_ms(call, args.warmup, args.reps, args.repeats, graph=True)
            entry["eager_ms"] = time_ms(call, args.warmup, args.reps, args.repeats, graph=False)
        except Exception as exc:  # a tiling that does not fit (shared memory, registers) is reported, not fatal
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        configs.append(entry)
    timed = [c for c in configs if "graph_ms" in c]
    row["configs"] = configs
    if timed:
        best = min(timed, key=lambda c: c["graph_ms"])
        amount = work(batch, span, bits, torch.finfo(dtype).bits // 8, args.residual, best["splits"],
                      best["kv_block"])
        seconds = best["graph_ms"] / 1e3
        row["fused"] = dict(best, **amount,
                            rebuild_tflops=amount["rebuild_flops"] / seconds / 1e12,
                            tensor_tflops=amount["tensor_flops"] / seconds / 1e12,
                            gbps=amount["bytes"] / seconds / 1e9,
                            fraction_of_matmul_peak=amount["tensor_flops"] / seconds / 1e12
                            / peaks["matmul"]["tflops"],
                            fraction_of_copy_bandwidth=amount["bytes"] / seconds / 1e9 / peaks["copy"]["gbps"],
                            model_ms_per_token=best["graph_ms"] * LAYERS)
    if not args.no_torch:
        def call():
            return latent_attention_reference(*problem)

        torch_path = {"rel_error": relative_error(call(), exact)}
        try:
            torch_path["graph_ms"] = time_ms(call, args.warmup, args.reps, args.repeats, graph=True)
            torch_path["eager_ms"] = time_ms(call, args.warmup, args.reps, args.repeats, graph=False)
        except torch.cuda.OutOfMemoryError as exc:
            torch_path["error"] = f"out of memory: {str(exc).splitlines()[0][:200]}"
        torch_path["model_ms_per_token"] = torch_path.get("graph_ms", float("nan")) * LAYERS
        row["torch"] = torch_path
        if timed and "graph_ms" in torch_path:
            row["speedup"] = torch_path["graph_ms"] / row["fused"]["graph_ms"]
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def describe(row: dict) -> str:
    fused = row.get("fused")
    text = f"B={row['batch']:<3} ctx={row['context']:<6} {row['bits']}-bit  "
    if fused:
        text += (f"fused {fused['graph_ms'] * 1e3:8.1f} us  {fused['rebuild_tflops']:6.1f} TFLOP/s rebuild  "
                 f"{fused['gbps']:7.1f} GB/s  err {fused['rel_error']:.1e}  "
                 f"(n{fused['block_n']} c{fused['block_c']} cv{fused['block_cv']} kv{fused['kv_block']} "
                 f"w{fused['num_warps']} "
                 f"s{fused['num_stages']} splits {fused['splits']})")
    else:
        text += "fused: every tiling failed"
    torch_path = row.get("torch")
    if torch_path and "graph_ms" in torch_path:
        text += f"  | torch {torch_path['graph_ms'] * 1e3:8.1f} us"
        if "speedup" in row:
            text += f"  x{row['speedup']:.2f}"
    return text


def main(argv=None) -> dict:
    args = parse_args(argv)
    require_gpu()
    import torch
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    peaks = {"matmul": matmul_peak(args.matmul, args), "copy": copy_peak(args.copy_gib, args)}
    print(f"{props.name}: bf16 matmul {peaks['matmul']['tflops']:.1f} TFLOP/s, "
          f"copy {peaks['copy']['gbps']:.0f} GB/s (read + write)", flush=True)
    rows = []
    for batch in args.batch:
        for span in args.context:
            for bits in args.bits:
                row = run_case(batch, span, bits, args, peaks)
                rows.append(row)
                print(describe(row), flush=True)
    result = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "channels": CHANNELS,
                   "group": GROUP, "layers": LAYERS},
        "peaks": peaks,
        "results": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
