"""Decode speed of xqinfer vs transformers' `generate`, side by side in one process, on the same weights.

    python benchmarks/decode_vs_transformers.py                       # llama-100m, fp32, CPU, 128 + 256 tokens
    python benchmarks/decode_vs_transformers.py --reps 5 --threads 2 --json results.json

Both engines run the same random-weight model (a preset from `models/`, built by `xqinfer.loader.random_model`);
transformers loads the very same tensors from a temporary safetensors directory (xqinfer's fused q|k|v and gate|up
split back into the checkpoint's names), and the script checks that every tensor is bit-identical before timing
anything. Decoding is greedy with no stop ids (transformers gets `min_new_tokens = max_new_tokens`, so EOS cannot
end it early).

What is timed, identically on both sides: the decode phase only, i.e. the `gen - 1` forward passes (plus sampling)
that follow the first generated token. The first token comes out of prefill and is excluded.
- xqinfer: `Engine.generate` fills `GenerationStats`; `decode_tokens_per_s` = decode_steps / decode_seconds, where
  the clock starts after the first token is sampled from the prefill logits.
- transformers: a streamer records `time.perf_counter()` at every `put()`. `generate` puts the prompt, then each new
  token as soon as it is selected, so decode seconds = time of the last token - time of the first token, over
  `gen - 1` steps. Prefill (and generate's own setup) is the time from the call to the first token.
Each engine gets one untimed warm-up run; the timed repetitions alternate which engine goes first, so slow drift
of the machine (thermal, other load) does not favour either. Results are mean ± sample std over the repetitions.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch

from xqinfer.engine import Engine, GenerationStats
from xqinfer.loader import checkpoint_parts, random_model
from xqinfer.presets import preset_config
from xqinfer.sampling import SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-100m", help="a preset in models/ or a config.json path")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per engine (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the prompt ids")
    parser.add_argument("--cache", default="fp16", help="xqinfer cache spec (fp16 = plain KV in the model dtype)")
    parser.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa or eager)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.reps < 1:
        parser.error("need --prompt-tokens >= 1, --gen-tokens >= 2 and --reps >= 1")
    return args


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_ticks() -> tuple[int, int, int] | None:
    """(machine busy ticks, machine total ticks, this process's ticks) from /proc, or None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8]), int(own[11]) + int(own[12])  # utime + stime


def foreign_load(before, after) -> float | None:
    """Share of the machine's CPU time that other processes used between two cpu_ticks() readings."""
    if before is None or after is None or after[1] == before[1]:
        return None
    busy, total, own = (a - b for a, b in zip(after, before))
    return max(0.0, (busy - own) / total)


class TimingStreamer:
    """A transformers streamer that only timestamps every put(): the prompt first, then one call per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.calls = 0

    def put(self, value) -> None:
        now = time.perf_counter()
        self.calls += 1
        if self.calls == 1:  # the prompt
            return
        self.times.append(now)
        self.tokens.extend(int(t) for t in value.reshape(-1))

    def end(self) -> None:
        pass


def build_models(args):
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = preset_config(args.preset)
    model = random_model(config, torch.float32, "cpu", seed=args.seed)
    state = checkpoint_tensors(model)
    with tempfile.TemporaryDirectory(prefix="xqinfer-bench-") as tmp:
        hf_config = dict(config.source)
        hf_config["torch_dtype"] = "float32"
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config), encoding="utf-8")
        save_file(state, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        hf = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation=args.attn)
    hf.eval()
    hf_state = hf.state_dict()
    mismatched = [name for name, tensor in state.items() if not torch.equal(hf_state[name], tensor)]
    if config.tie_word_embeddings and not torch.equal(hf.lm_head.weight, model.output_weight()):
        mismatched.append("lm_head.weight (tied)")
    if mismatched:
        raise SystemExit(f"weights differ between the two models: {mismatched[:5]}")
    return config, model, hf


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face checkpoint names: fused parameters split back into their parts."""
    parts = checkpoint_parts(model.config)
    state = {}
    for name, tensor in model.state_dict().items():
        blocks = tensor.split([shape[0] for shape in parts[name].values()])
        state.update((part, block.contiguous()) for part, block in zip(parts[name], blocks))
    return state


def run_xqinfer(model, prompt: list[int], gen: int, cache: str) -> dict:
    engine = Engine(model, cache, capacity=len(prompt) + gen)
    stats = GenerationStats()
    gc.collect()
    tokens, times = [], []
    for token in engine.generate(prompt, SamplingParams(temperature=0), gen, stop_ids=(), stats=stats):
        times.append(time.perf_counter())
        tokens.append(token)
    return {
        "tokens": tokens,
        "step_seconds": [b - a for a, b in itertools.pairwise(times)],
        "decode_tok_s": stats.decode_tokens_per_s,
        "prefill_tok_s": stats.prefill_tokens_per_s,
        "decode_steps": stats.decode_steps,
    }


def run_transformers(hf, prompt: list[int], gen: int) -> dict:
    ids = torch.tensor([prompt], dtype=torch.long)
    streamer = TimingStreamer()
    gc.collect()
    with torch.inference_mode():
        start = time.perf_counter()
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=gen,
            min_new_tokens=gen,
            pad_token_id=hf.config.eos_token_id,
            streamer=streamer,
        )
    tokens = out[0, len(prompt):].tolist()
    if len(streamer.times) != gen or streamer.tokens != tokens:
        raise SystemExit(f"transformers streamed {len(streamer.times)} tokens, expected {gen}")
    decode_seconds = streamer.times[-1] - streamer.times[0]
    return {
        "tokens": tokens,
        "step_seconds": [b - a for a, b in itertools.pairwise(streamer.times)],
        "decode_tok_s": (gen - 1) / decode_seconds,
        "prefill_tok_s": len(prompt) / (streamer.times[0] - start),
        "decode_steps": gen - 1,
    }


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def summary(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "runs": values,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers

    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    config, model, hf = build_models(args)
    generator = torch.Generator().manual_seed(args.seed)
    # Ids above the special tokens, so no BOS/EOS sits in the prompt.
    prompt = torch.randint(3, config.vocab_size, (args.prompt_tokens,), generator=generator).tolist()
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {params / 1e6:.1f}M parameters, fp32, CPU, {threads} threads; "
          f"prompt {args.prompt_tokens} random ids, {args.gen_tokens} greedy tokens; "
          f"torch {torch.__version__}, transformers {transformers.__version__} (attn {hf.config._attn_implementation})")

    runners = {
        "xqinfer": lambda: run_xqinfer(model, prompt, args.gen_tokens, args.cache),
        "transformers": lambda: run_transformers(hf, prompt, args.gen_tokens),
    }
    ticks_before = cpu_ticks()
    for name, runner in runners.items():  # warm-up, untimed
        runner()
    results: dict[str, list[dict]] = {name: [] for name in runners}
    for rep in range(args.reps):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for name in order:
            results[name].append(runners[name]())
        line = "  ".join(f"{n} {results[n][-1]['decode_tok_s']:.2f}" for n in runners)
        print(f"  rep {rep + 1}/{args.reps}: decode tok/s  {line}", flush=True)

    foreign = foreign_load(ticks_before, cpu_ticks())
    xq_tokens = results["xqinfer"][0]["tokens"]
    hf_tokens = results["transformers"][0]["tokens"]
    divergence = first_divergence(xq_tokens, hf_tokens)
    agree = sum(x == y for x, y in zip(xq_tokens, hf_tokens))
    deterministic = all(r["tokens"] == results[n][0]["tokens"] for n in runners for r in results[n])

    decode = {n: summary([r["decode_tok_s"] for r in results[n]]) for n in runners}
    prefill = {n: summary([r["prefill_tok_s"] for r in results[n]]) for n in runners}
    pairs = zip(results["xqinfer"], results["transformers"])
    ratios = summary([x["decode_tok_s"] / h["decode_tok_s"] for x, h in pairs])
    # Noise-robust companion: the median time between consecutive tokens, pooled over all timed runs. A step that
    # another process preempted lands in the tail and barely moves the median.
    median_step = {n: statistics.median(s for r in results[n] for s in r["step_seconds"]) for n in runners}
    median_rate = {n: 1.0 / median_step[n] for n in runners}
    median_ratio = median_rate["xqinfer"] / median_rate["transformers"]

    print()
    print(f"{'engine':<14}{'decode tok/s':>20}{'median-step tok/s':>20}{'prefill tok/s':>20}")
    for name in runners:
        d, p = decode[name], prefill[name]
        print(f"{name:<14}{d['mean']:>12.2f} ± {d['std']:<5.2f}{median_rate[name]:>20.2f}"
              f"{p['mean']:>12.1f} ± {p['std']:<5.1f}")
    print(f"{'ratio xq/hf':<14}{ratios['mean']:>12.3f} ± {ratios['std']:<5.3f}{median_ratio:>20.3f}")
    match = "yes" if divergence is None else f"no, first divergence at generated token {divergence}"
    if foreign is not None:
        print(f"other processes used {100 * foreign:.0f}% of the machine's CPU time during the runs"
              + (" (noisy: rerun on a quiet machine)" if foreign > 0.05 else ""))
    print(f"greedy tokens identical: {match} ({agree}/{len(xq_tokens)} positions agree; "
          f"repeatable across reps: {'yes' if deterministic else 'no'})")

    report = {
        "preset": args.preset,
        "parameters": params,
        "dtype": "float32",
        "device": "cpu",
        "threads": threads,
        "cores": available_cores(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "hf_attn_implementation": hf.config._attn_implementation,
        "xqinfer_cache": args.cache,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "decode_steps": args.gen_tokens - 1,
        "reps": args.reps,
        "seed": args.seed,
        "decode_tokens_per_s": decode,
        "prefill_tokens_per_s": prefill,
        "decode_ratio_xqinfer_over_transformers": ratios,
        "median_step_tokens_per_s": median_rate,
        "median_step_ratio_xqinfer_over_transformers": median_ratio,
        "tokens_identical": divergence is None,
        "first_divergence": divergence,
        "positions_agreeing": agree,
        "repeatable": deterministic,
        "foreign_cpu_share": foreign,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
