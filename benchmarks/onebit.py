"""Where 1-bit KV caches lose a model: per-layer error of K, V and the attention output, on real text.

    python benchmarks/onebit.py                                      # kivi:bits=2, asymkv, xquant-kv; 8 windows
    python benchmarks/onebit.py --ctx 512 --limit 16 --json onebit.json
    python benchmarks/onebit.py --cache xquant-kv:eta1=0,eta2=0 --cache xquant-kv:km=30,vm=30
    python benchmarks/onebit.py --cache none --scan values --limit 4 # PPL with one layer's V at 1 bit

Every method runs under the `sim` protocol (ppl's default: one pass per window, every K and V read through its
quantized form, groups from the window's first token) on the windows `xqinfer ppl` cuts, fp16 first. Per layer,
summed over the windows:
- `K err`, `V err`: ‖K̂ − K‖ / ‖K‖ and ‖V̂ − V‖ / ‖V‖, K̂ and V̂ being what the layer's own streams read back
  (`QuantStream.simulate`, the sim protocol's path) and K, V the exact tensors the model handed that layer;
- `out local`: ‖o − o*‖ / ‖o*‖, o the layer's attention output (before o_proj), o* exact attention over the same
  q, K and V: what this layer's quantization costs by itself;
- `out vs fp16`: ‖o − o_fp16‖ / ‖o_fp16‖ against the fp16 run's output of that layer, the error carried in from the
  layers below included.
Then PPL ± stderr and KLD to fp16 (nats per token), as `xqinfer ppl --kld` computes them.

`--scan keys|values|both`: from `--scan-base` (XQuant-KV with every K and V at 2 bits and no shared codes; its
`eta1`/`eta2` apply), PPL and KLD when only one layer's keys, or only one layer's values, take 1 bit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch
import torch.nn.functional as F

import xqinfer
from xqinfer.attention import attend
from xqinfer.cache import CacheSpec, make_cache, parse_spec
from xqinfer.cache.base import REGISTRY, attention_mask
from xqinfer.cache.kv_quant import KVQuantCache
from xqinfer.cache.xquant_kv import XQuantKVCache
from xqinfer.ppl import BASELINE, MethodScore, make_windows, read_text, window_logits
from xqinfer.rope import apply_rotary

DATASET = REPO.parent / "shared" / "data" / "wikitext2-test.txt"
DEFAULT_CACHES = ["kivi:bits=2", "asymkv", "xquant-kv"]
ERRORS = ("k", "v", "local", "fp16")


class RecordingLayer:
    """Attends as the layer cache it wraps; records the squared error and norm of what that layer read back."""

    def __init__(self, inner, sums: dict[str, float], reference: list, record: bool, own_codes: dict) -> None:
        self.inner = inner
        self.sums = sums
        self.reference = reference  # the fp16 run's attention outputs of this window, by layer
        self.record = record  # the fp16 run: fill `reference` instead
        self.own_codes = own_codes  # (side, layer) -> the codes each layer's K or V gets when quantized on its own

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def attend(self, step, x, q, k, v):
        out = self.inner.attend(step, x, q, k, v)
        if self.record:
            self.reference.append(out)
            return out
        k_rotated = apply_rotary(k, step.cos, step.sin)
        stored = k if self.inner.parent.prerope else k_rotated
        # A second read gives what attend read: simulate is deterministic, and a layer that shares codes still finds
        # its partner's codes of this window. RoPE rotates pairs of channels, so it leaves ‖K̂ − K‖ as it is.
        self._add("k", self.inner.keys.simulate(stored), stored)
        self._add("v", self.inner.values.simulate(v), v)
        mask = attention_mask(step.positions, step.positions, self.inner.parent.window)
        self._add("local", out, attend(q, k_rotated, v, mask, self.inner.projection.scale))
        self._add("fp16", out, self.reference[self.inner.index])
        self._match("k", self.inner.keys, stored)
        self._match("v", self.inner.values, v)
        return out

    def _match(self, side: str, stream, exact: torch.Tensor) -> None:
        """Counts how many of this layer's own codes equal layer index - 1's own codes (what sharing assumes)."""
        index = self.inner.index
        codes = stream.layout.round_trip(exact)[1]
        self.own_codes[side, index] = (stream.bits, codes)
        previous = self.own_codes.get((side, index - 1))
        if previous is not None and previous[0] == stream.bits:
            self.sums[side + " match"] += (codes == previous[1]).sum().item()
            self.sums[side + " codes"] += codes.numel()

    def _add(self, name: str, approx: torch.Tensor, exact: torch.Tensor) -> None:
        self.sums[name + " err"] += (approx.float() - exact.float()).pow(2).sum().item()
        self.sums[name] += exact.float().pow(2).sum().item()


class OneLayerAtOneBit(XQuantKVCache):
    """XQuant-KV with 2-bit K and V and no shared codes, except one layer's keys or values at 1 bit (the spec's
    `one_bit` option, "keys:3" or "values:3"; not registered: only this benchmark builds it)."""

    @classmethod
    def key_bits(cls, spec: CacheSpec, index: int) -> int:
        return 1 if spec.options["one_bit"] == f"keys:{index}" else 2

    @classmethod
    def value_bits(cls, spec: CacheSpec, index: int) -> int:
        return 1 if spec.options["one_bit"] == f"values:{index}" else 2

    @classmethod
    def shares_key_codes(cls, spec: CacheSpec, index: int) -> bool:
        return False

    @classmethod
    def shares_value_codes(cls, spec: CacheSpec, index: int) -> bool:
        return False


class Run:
    """One method over the windows: its cache (layers wrapped when errors are recorded) and running sums."""

    def __init__(self, llm, cache, reference: list, record_errors: bool, is_baseline: bool) -> None:
        self.cache = cache
        cache.simulate = True
        config = llm.config
        self.label = str(cache.spec)
        self.bits = type(cache).code_bits(cache.spec, config)
        self.score = MethodScore(cache.spec, 0.0, "", self.label)
        names = [n for e in ERRORS for n in (e, e + " err")] + ["k match", "k codes", "v match", "v codes"]
        self.sums = [dict.fromkeys(names, 0.0) for _ in cache.layers]
        if record_errors or is_baseline:
            own_codes: dict = {}
            cache.layers = [RecordingLayer(layer, sums, reference, is_baseline, own_codes)
                            for layer, sums in zip(cache.layers, self.sums)]
        self.layer_bits = [(layer.keys.bits, layer.values.bits, layer.keys.codes_from is not None,
                            layer.values.codes_from is not None) if isinstance(cache, KVQuantCache) else None
                           for layer in cache.layers]

    def score_window(self, llm, tokens: torch.Tensor, baseline: torch.Tensor | None) -> torch.Tensor:
        start = time.perf_counter()
        logits = window_logits(llm, self.cache, tokens, "sim", 1)
        log_probs = F.log_softmax(logits[0, :-1].float(), dim=-1)
        nll = -log_probs.gather(-1, tokens[0, 1:, None]).squeeze(-1)
        score = self.score
        score.nll_sum += nll.sum().item()
        score.nll_squares += nll.pow(2).sum().item()
        score.tokens += nll.numel()
        score.windows += 1
        if baseline is not None:
            score.kld_sum += F.kl_div(log_probs, baseline, log_target=True, reduction="sum").item()
        score.seconds += time.perf_counter() - start
        return log_probs

    def summary(self) -> dict:
        score = self.score
        row = {"spec": self.label, "code_bits": self.bits, "ppl": score.ppl, "ppl_stderr": score.ppl_stderr,
               "kld": score.kld, "windows": score.windows, "tokens": score.tokens}
        if "one_bit" in self.cache.spec.options:
            row["one_bit"] = self.cache.spec.options["one_bit"]
        layers = []
        for index, (sums, bits) in enumerate(zip(self.sums, self.layer_bits)):
            if not sums["k"]:
                continue
            entry = {"layer": index}
            if bits is not None:
                entry.update(key_bits=bits[0], value_bits=bits[1], key_shared=bits[2], value_shared=bits[3])
            entry.update({f"{name}_rel": math.sqrt(sums[name + " err"] / sums[name]) for name in ERRORS})
            # Of this layer's own codes, the share equal to the previous layer's (None: their bits differ).
            entry.update({f"{side}_code_match": sums[side + " match"] / sums[side + " codes"]
                          if sums[side + " codes"] else None for side in ("k", "v")})
            layers.append(entry)
        if layers:
            row["layers"] = layers
        return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=str(DATASET), help="text file (default: WikiText-2 test)")
    parser.add_argument("--model", default=None, help="model path (default: xqinfer's default model)")
    parser.add_argument("--preset", default=None, help="an architecture preset with seeded random weights (tests)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--limit", type=int, default=8, help="windows scored (default 8)")
    parser.add_argument("--cache", action="append", default=None,
                        help=f"method to probe, repeatable; 'none': only --scan (default: {' '.join(DEFAULT_CACHES)})")
    parser.add_argument("--scan", choices=("keys", "values", "both"), default=None,
                        help="also PPL/KLD with one layer's keys (or values) at 1 bit, every other K and V at 2")
    parser.add_argument("--scan-base", default="xquant-kv", help="the XQuant-KV options of the scan (eta1, eta2, "
                                                                  "group)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.ctx < 2 or args.limit < 1:
        parser.error("--ctx must be at least 2 and --limit at least 1")
    caches = [c for c in (args.cache or DEFAULT_CACHES) if c != "none"]
    try:
        specs = [parse_spec(text) for text in caches]
        scan_base = parse_spec(args.scan_base)
    except xqinfer.XQInferError as exc:
        parser.error(str(exc))
    for spec in specs:
        if not issubclass(REGISTRY[spec.method], KVQuantCache):
            parser.error(f"{spec.method} stores no K and V to compare (accepted: kivi, asymkv, xquant-kv)")
    if scan_base.method != "xquant-kv":
        parser.error("--scan-base must be an xquant-kv spec")
    if args.json and Path(args.json).exists():
        parser.error(f"{args.json} exists; not overwriting it")
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        llm = xqinfer.load(args.model, preset=args.preset)
    except xqinfer.XQInferError as exc:
        parser.error(str(exc))
    config = llm.config
    windows = make_windows(llm.tokenizer.encode(read_text(args.dataset), add_bos=True), args.ctx, args.limit)
    reference: list = []
    runs = [Run(llm, make_cache(BASELINE, llm.model, args.ctx), reference, False, True)]
    runs += [Run(llm, make_cache(spec, llm.model, args.ctx), reference, True, False) for spec in specs]
    if args.scan:
        for side in ("keys", "values") if args.scan == "both" else (args.scan,):
            for index in range(config.num_layers):
                spec = CacheSpec("xquant-kv", {**scan_base.options, "one_bit": f"{side}:{index}"})
                cache = OneLayerAtOneBit(spec, config, llm.model.kv_projections(), args.ctx)
                runs.append(Run(llm, cache, reference, False, False))
        # The scan's own baseline: every K and V at 2 bits.
        spec = CacheSpec("xquant-kv", {**scan_base.options, "one_bit": "none"})
        runs.append(Run(llm, OneLayerAtOneBit(spec, config, llm.model.kv_projections(), args.ctx), reference,
                        False, False))
    print(f"{llm.name}: {len(windows)} windows of {args.ctx} tokens, {len(runs)} runs", file=sys.stderr)
    for number, window in enumerate(windows, 1):
        tokens = torch.tensor([window], device=llm.device)
        reference.clear()
        baseline = runs[0].score_window(llm, tokens, None)
        for run in runs[1:]:
            run.score_window(llm, tokens, baseline)
        print(f"  window {number}/{len(windows)}", file=sys.stderr)

    results = [run.summary() for run in runs]
    report(results[: 1 + len(specs)], results[1 + len(specs):])
    if args.json:
        payload = {"model": llm.name, "dataset": str(args.dataset), "protocol": "sim", "ctx": args.ctx,
                   "windows": len(windows), "methods": results[: 1 + len(specs)],
                   "scan": results[1 + len(specs):], "scan_base": str(scan_base)}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


def report(methods: list[dict], scan: list[dict]) -> None:
    print(f"{'method':<40} {'bits':>6} {'PPL':>10} {'± se':>7} {'KLD':>7}")
    for row in methods:
        bits = "16" if row["code_bits"] is None else f"{row['code_bits']:g}"
        print(f"{row['spec']:<40} {bits:>6} {row['ppl']:>10.2f} {row['ppl_stderr']:>7.2f} {row['kld']:>7.3f}")
    for row in methods[1:]:
        print(f"\n{row['spec']}  (relative error, root of summed squares over the windows)")
        print(f"{'layer':>5} {'K bits':>7} {'V bits':>7} {'K err':>7} {'V err':>7} {'out local':>10} "
              f"{'out vs fp16':>12} {'K match':>8} {'V match':>8}")
        for layer in row["layers"]:
            print(f"{layer['layer']:>5} {layer['key_bits']:>6}{_shared(layer['key_shared'])} "
                  f"{layer['value_bits']:>6}{_shared(layer['value_shared'])} {layer['k_rel']:>7.3f} "
                  f"{layer['v_rel']:>7.3f} {layer['local_rel']:>10.3f} {layer['fp16_rel']:>12.3f} "
                  f"{_share(layer['k_code_match']):>8} {_share(layer['v_code_match']):>8}")
        print("s: the layer reads its partner's codes. match: share of the layer's own codes equal to those of the "
              "layer below (1-bit codes at random: 0.5)")
    if scan:
        base, scan = scan[-1], scan[:-1]
        print(f"\none layer at 1 bit, every other K and V at 2 bits ({base['spec']}; {base['windows']} windows)")
        print(f"every K and V at 2 bits: PPL {base['ppl']:.2f} ± {base['ppl_stderr']:.2f}, KLD {base['kld']:.3f}")
        print(f"{'1-bit':>10} {'PPL':>9} {'± se':>7} {'KLD':>7}")
        for row in scan:
            print(f"{row['one_bit']:>10} {row['ppl']:>9.2f} {row['ppl_stderr']:>7.2f} {row['kld']:>7.3f}")


def _shared(flag: bool) -> str:
    return "s" if flag else " "


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
