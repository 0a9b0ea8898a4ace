"""xqinfer beside llama.cpp and transformers on the same GGUF: prefill and decode tok/s, peak memory, in one run.

    python benchmarks/vs_peers.py                                    # the default model, depths 512, 2k, 8000
    python benchmarks/vs_peers.py --depth 512 --depth 2k --reps 3 --json vs_peers.json
    python benchmarks/vs_peers.py --model ~/models/x.gguf --cache fp16 --cache kivi:bits=2 --no-transformers

All three engines run the same weights in fp32. llama.cpp gets an F32 copy of the GGUF made by its own
`llama-quantize --allow-requantize` (cached beside its binaries), since it would otherwise compute on the file's
quantized weights while xqinfer and transformers dequantize them; the script checks that the copy's embedding equals
what xqinfer loads before timing anything. Each engine runs in its own process, so each peak is its own.

What is timed, for every depth D:
- prefill: a prompt of D tokens from an empty cache (llama-bench `-p D -n 0`; xqinfer `bench --context D`, its
  prefill figure; transformers one forward in chunks of 1024 tokens);
- decode: `--gen` tokens after a prompt of D tokens (llama-bench `-n GEN -d D`, its tg figure; xqinfer's decode
  figure, the gen - 1 steps after the first token; transformers the same steps, greedy, over its DynamicCache).
Peak memory is each process's peak resident size (for llama-bench, over all its repetitions and depths).

llama.cpp's K/V types (`-ctk/-ctv`, with `-fa on`, which quantized V needs) and xqinfer's methods are listed by bits
per element (codes plus scales and zeros), so rows of comparable size sit together. llama.cpp is skipped, with the
reason, where its binaries are absent: `bash ../shared/tools/build-llama-cpp.sh` builds them (about 11 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LLAMA_CPP = Path.home() / ".cache" / "xqinfer-peers" / "llama.cpp" / "build" / "bin"
# Bits per element of llama.cpp's K/V types: blocks of 32 codes with one fp16 scale.
LLAMA_KV_BITS = {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5}
DEFAULT_METHODS = ("fp16", "kivi:bits=4", "xquant:bits=4", "kivi:bits=2", "xquant-kv")
PREFILL_CHUNK = 1024


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a .gguf file (default: xqinfer's default model)")
    parser.add_argument("--depth", action="append", default=[], help="prompt tokens: 512, 2k (repeatable)")
    parser.add_argument("--gen", type=int, default=64, help="tokens decoded after the prompt")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", action="append", default=[], help="xqinfer cache specs (repeatable)")
    parser.add_argument("--kv-type", action="append", default=[], choices=sorted(LLAMA_KV_BITS),
                        help="llama.cpp K/V types (repeatable; default: all)")
    parser.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP, help="folder of llama-bench, llama-quantize")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON (a new file)")
    parser.add_argument("--worker", choices=["transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from xqinfer.bench import parse_context

    try:
        args.depths = [parse_context(d, "--depth") for d in args.depth] or [512, 2048, 8000]
    except Exception as exc:
        parser.error(str(exc))
    if args.gen < 2 or args.reps < 1 or args.threads < 1:
        parser.error("need --gen >= 2, --reps >= 1 and --threads >= 1")
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; choose a new file (results are never written over another)")
    return args


def run_measured(command: list[str], **kwargs) -> tuple[str, int]:
    """(stdout, peak resident bytes) of a child process, exiting with its last stderr line if it fails."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, **kwargs)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not every child's
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode:
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"{Path(command[0]).name} {' '.join(command[1:3])} exited with {process.returncode}: {tail}")
    return stdout, usage.ru_maxrss * 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------ llama.cpp


def f32_copy(model: Path, bin_dir: Path) -> Path:
    """The GGUF with every tensor in F32, made once by llama.cpp's own quantizer."""
    target = bin_dir.parent.parent / f"{model.stem}.F32.gguf"
    if not target.exists():
        partial = target.with_suffix(".partial")
        run_measured([str(bin_dir / "llama-quantize"), "--allow-requantize", str(model), str(partial), "F32"])
        partial.rename(target)
    return target


def check_same_weights(f32: Path, llm) -> None:
    """The F32 copy's token embedding equals the one xqinfer dequantized (the row order llama.cpp keeps)."""
    import numpy as np
    import torch
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(f32).tensors if t.name == "token_embd.weight")
    theirs = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(llm.config.vocab_size, -1))
    ours = llm.model.model.embed_tokens.weight.float()
    if not torch.equal(theirs, ours):
        raise SystemExit(f"{f32.name}: its embedding differs from xqinfer's by {(theirs - ours).abs().max():.3g}")


def llama_bench(bin_dir: Path, gguf: Path, kv_type: str, args) -> dict:
    """{depth: {prefill, prefill_std, decode, decode_std}} and the peak, for one K/V type."""
    common = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-r", str(args.reps), "-t", str(args.threads),
              "-fa", "on", "-ctk", kv_type, "-ctv", kv_type, "-o", "json"]
    depths = ",".join(map(str, args.depths))
    prefill_out, prefill_peak = run_measured(common + ["-p", depths, "-n", "0"])
    decode_out, decode_peak = run_measured(common + ["-p", "0", "-n", str(args.gen), "-d", depths])
    rows = {depth: {} for depth in args.depths}
    for test in json.loads(prefill_out):
        rows[test["n_prompt"]].update(prefill=test["avg_ts"], prefill_std=test["stddev_ts"])
    for test in json.loads(decode_out):
        rows[test["n_depth"]].update(decode=test["avg_ts"], decode_std=test["stddev_ts"])
    return {"rows": rows, "peak_memory_bytes": max(prefill_peak, decode_peak)}


# ------------------------------------------------------------------------------------------------ xqinfer


def xqinfer_bench(model: Path, methods: list[str], args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.json"
        command = [sys.executable, "-m", "xqinfer", "bench", "--model", str(model), "--gen", str(args.gen),
                   "--reps", str(args.reps), "--threads", str(args.threads), "--json", str(out)]
        command += [f"--context={depth}" for depth in args.depths] + [f"--cache={m}" for m in methods]
        run_measured(command, cwd=REPO)
        report = json.loads(out.read_text())
    return {"command": " ".join(command[1:]).replace(str(out), "FILE"), "results": report["results"],
            "failures": report["failures"]}


# ------------------------------------------------------------------------------------------------ transformers


def transformers_worker(args) -> None:
    """Runs in its own process: prints {depth: {...}} as JSON."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(args.threads)
    path = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.eval()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    @torch.inference_mode()
    def one(depth: int) -> tuple[float, float]:
        prompt = torch.randint(0, vocab, (1, depth), generator=generator)
        cache = DynamicCache()
        start = time.perf_counter()
        for begin in range(0, depth, PREFILL_CHUNK):
            logits = model(prompt[:, begin : begin + PREFILL_CHUNK], past_key_values=cache, use_cache=True).logits
        prefill = time.perf_counter() - start
        token = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(args.gen - 1):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return depth / prefill, (args.gen - 1) / (time.perf_counter() - start)

    one(min(args.depths))  # warm-up
    rows = {}
    for depth in args.depths:
        runs = [one(depth) for _ in range(args.reps)]
        prefill, decode = [r[0] for r in runs], [r[1] for r in runs]
        spread = statistics.stdev if args.reps > 1 else (lambda _: None)
        rows[depth] = dict(prefill=statistics.mean(prefill), prefill_std=spread(prefill),
                           decode=statistics.mean(decode), decode_std=spread(decode))
    import transformers

    print(json.dumps({"rows": rows, "version": transformers.__version__}))


def transformers_bench(model: Path, args) -> dict:
    command = [sys.executable, __file__, "--worker", "transformers", "--model", str(model), "--gen", str(args.gen),
               "--reps", str(args.reps), "--threads", str(args.threads)]
    command += [f"--depth={depth}" for depth in args.depths]
    stdout, peak = run_measured(command)
    report = json.loads(stdout.strip().splitlines()[-1])
    report["rows"] = {int(depth): row for depth, row in report["rows"].items()}
    return {**report, "peak_memory_bytes": peak}


# ------------------------------------------------------------------------------------------------ the table


def rows_of(xq: dict, llama: dict, hf: dict | None) -> list[dict]:
    """One row per (engine, cache, depth), each depth's rows ordered by bits per element, widest first."""
    rows = []
    for kv_type, run in llama.items():
        for depth, row in run["rows"].items():
            rows.append(dict(engine="llama.cpp", cache=f"{kv_type} K/V", bits=LLAMA_KV_BITS[kv_type], depth=depth,
                             peak_memory_bytes=run["peak_memory_bytes"], **row))
    if hf is not None:
        for depth, row in hf["rows"].items():
            rows.append(dict(engine="transformers", cache="DynamicCache fp32", bits=32.0, depth=depth,
                             peak_memory_bytes=hf["peak_memory_bytes"], **row))
    for result in xq["results"]:
        rows.append(dict(engine="xqinfer", cache=_named(result), bits=16 * result["normalized_size"],
                         depth=result["context"], peak_memory_bytes=result["peak_memory_bytes"],
                         prefill=result["prefill_tokens_per_s"], prefill_std=None,
                         decode=result["decode_tokens_per_s"], decode_std=result["decode_tokens_per_s_std"]))
    return sorted(rows, key=lambda r: (r["depth"], -r["bits"], r["engine"]))


def _named(result: dict) -> str:
    """The table's name of an xqinfer result: its label, with the bit width even where it is the default."""
    from xqinfer.cache import parse_spec

    spec, label = parse_spec(result["method"]), result["label"]
    bits = spec.options.get("bits")
    if bits is None or "bits=" in label:
        return label
    method, _, rest = label.partition(":")
    return f"{method}:bits={bits}" + (f",{rest}" if rest else "")


def markdown(rows: list[dict]) -> str:
    def rate(mean, std):
        if mean is None:
            return "-"
        return f"{mean:.1f}" + (f" ± {std:.1f}" if std else "")

    reference = {r["depth"]: r["decode"] for r in rows if r["engine"] == "llama.cpp" and r["cache"] == "f16 K/V"}
    header = "| depth | engine | cache | bits/elem | prefill tok/s | decode tok/s | decode vs llama.cpp f16 | peak MB |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = reference.get(r["depth"])
        ratio = f"{r['decode'] / base:.2f}x" if base and r["decode"] else "-"
        lines.append(f"| {r['depth']} | {r['engine']} | {r['cache']} | {r['bits']:.2f} | "
                     f"{rate(r['prefill'], r['prefill_std'])} | {rate(r['decode'], r['decode_std'])} | {ratio} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker == "transformers":
        transformers_worker(args)
        return
    import torch

    from xqinfer.api import default_model, load

    torch.set_num_threads(args.threads)
    model = Path(args.model).expanduser() if args.model else default_model()
    if model.suffix != ".gguf" or not model.is_file():
        raise SystemExit(f"{model}: need a .gguf file (every engine here reads the same one)")
    methods = args.cache or list(DEFAULT_METHODS)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = os.getloadavg()[0]
    llama, skipped = {}, {}
    bin_dir = args.llama_cpp.expanduser()
    if not (bin_dir / "llama-bench").exists() or not (bin_dir / "llama-quantize").exists():
        skipped["llama.cpp"] = (f"no llama-bench and llama-quantize in {bin_dir} "
                                "(bash ../shared/tools/build-llama-cpp.sh)")
    else:
        f32 = f32_copy(model, bin_dir)
        check_same_weights(f32, load(model))
        for kv_type in args.kv_type or list(LLAMA_KV_BITS):
            print(f"llama.cpp {kv_type} K/V ...", file=sys.stderr)
            llama[kv_type] = llama_bench(bin_dir, f32, kv_type, args)
    hf = None
    if args.no_transformers:
        skipped["transformers"] = "--no-transformers"
    else:
        try:
            import transformers  # noqa: F401
        except ImportError:
            skipped["transformers"] = "transformers is not installed (pip install -e '.[test]')"
        else:
            print("transformers ...", file=sys.stderr)
            hf = transformers_bench(model, args)
    print("xqinfer ...", file=sys.stderr)
    xq = xqinfer_bench(model, methods, args)
    rows = rows_of(xq, llama, hf)
    print(markdown(rows))
    for engine, reason in skipped.items():
        print(f"skipped {engine}: {reason}")
    report = {
        "started": started, "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
        "model": str(model), "threads": args.threads, "gen": args.gen, "reps": args.reps, "depths": args.depths,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/vs_peers.py", *(argv if argv is not None else sys.argv[1:])]),
        "xqinfer_command": xq["command"], "failures": xq["failures"], "skipped": skipped, "rows": rows,
        "transformers": hf and hf.get("version"),
    }
    if args.json is not None:
        with args.json.open("x") as file:  # never over another file (checked again here: the run took a while)
            json.dump(report, file, indent=2)
            file.write("\n")


if __name__ == "__main__":
    main()
