"""Long-context speed and memory of cache methods, side by side in one process on the same weights.

For each (method, context): a prompt of exactly `context` random tokens is prefilled (in chunks, never an
[N, N] mask), then `gen` tokens are decoded greedily without any host synchronization inside the loop. Each
measurement repeats `reps` times after a warm-up; decode is reported as mean ± std of tok/s.
"""

from __future__ import annotations

import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .accounting import bytes_per_token, normalized_size
from .api import LLM
from .cache import CacheSpec, parse_spec
from .device import is_out_of_memory, peak_memory, reset_peak_memory, synchronize
from .engine import UNKNOWN_TOKEN, Engine
from .errors import XQInferError
from .roofline import Peaks, decode_floor

WARMUP_TOKENS = 8


def parse_context(text: str, option: str = "--context") -> int:
    """`32k`, `32K` and `32768` are the same context; k means 1024 tokens (`option` names it in errors)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not match:
        raise XQInferError(f"{option} {text!r} is not a token count (examples: 4096, 4k, 32K)")
    value = int(match.group(1)) * (1024 if match.group(2) else 1)
    if value < 1:
        raise XQInferError(f"{option} {text!r} must be at least 1 token")
    return value


@dataclass
class BenchResult:
    method: str
    label: str  # what tables call it (CacheSpec.display_name): the baseline is named for the dtype it stores
    context: int
    batch: int
    gen: int
    reps: int
    cuda_graph: bool
    decode_path: str  # "triton" where fused kernels ran in every layer, "torch" otherwise ("mixed" if some)
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None  # None with --gen 1: nothing is decoded after the first token
    decode_tokens_per_s_std: float | None  # None with one repetition: no spread to measure
    time_to_first_token_s: float
    peak_memory_bytes: int  # CUDA: the allocator's peak; CPU: the process's peak resident size
    peak_memory_increase_bytes: int | None  # CPU: the peak over the resident size before loading; None on CUDA
    weights_bytes: int
    cache_bytes: int
    workspace_bytes: int
    cache_bytes_per_token: float
    normalized_size: float
    # With measured peaks (`--floors`): the least a decode step can take here (see roofline.py), as tok/s.
    decode_floor_tokens_per_s: float | None = None
    decode_floor_bound: str | None = None  # "memory" or "compute": which limit sets the floor

    @property
    def fraction_of_floor(self) -> float | None:
        if self.decode_floor_tokens_per_s is None or self.decode_tokens_per_s is None:
            return None
        return self.decode_tokens_per_s / self.decode_floor_tokens_per_s

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchRun:
    """The results of a bench, in the order they finished; `interrupted` after a Ctrl-C ended it early."""

    results: list[BenchResult]
    interrupted: bool = False


def weights_bytes(llm: LLM) -> int:
    return sum(p.nbytes for p in llm.model.parameters())


def bench(
    llm: LLM,
    contexts: Sequence[int],
    methods: Sequence[str | CacheSpec],
    *,
    gen: int = 128,
    batch: int = 1,
    reps: int = 3,
    cuda_graph: bool = True,
    allow_extrapolation: bool = False,
    seed: int = 0,
    peaks: Peaks | None = None,
    report: Callable[[BenchResult], None] | None = None,
    failed: Callable[[CacheSpec, int, str], None] | None = None,
) -> BenchRun:
    """Measures every (method, context) pair; `report` sees each result as soon as it is ready.

    A Ctrl-C (KeyboardInterrupt) ends the run with the results finished so far, marked `interrupted`.

    With `peaks` (the device's measured rates, `roofline.measure_peaks`), each result also carries its decode floor.
    With `failed`, a pair that the user's choices make fail (a spec this model refuses, memory) is handed to it with
    the reason and the run goes on with the next pair; without it, the error ends the run.
    """
    if gen < 1 or batch < 1 or reps < 1:
        raise XQInferError("--gen, --batch and --reps must be at least 1")
    specs = [parse_spec(m) if isinstance(m, str) else m for m in methods]
    limit = llm.config.max_position_embeddings
    for context in contexts:
        if context + gen > limit and not allow_extrapolation:
            raise XQInferError(f"--context {context} plus --gen {gen} exceeds the model's {limit} positions "
                               "(--allow-extrapolation runs it anyway)")
    generator = torch.Generator().manual_seed(seed)
    run = BenchRun([])
    try:
        for context in contexts:
            prompt = torch.randint(0, llm.config.vocab_size, (context,), generator=generator).tolist()
            for spec in specs:
                try:
                    result = _bench_one(llm, spec, prompt, gen, batch, reps, cuda_graph, allow_extrapolation)
                except Exception as exc:
                    if failed is None or not (isinstance(exc, XQInferError) or is_out_of_memory(exc)):
                        raise
                    failed(spec, context, str(exc) or type(exc).__name__)
                    continue
                if peaks is not None:
                    # Decode steps run over context .. context + gen - 1 cached tokens: the floor at the mean.
                    floor = decode_floor(llm.config, spec, context + gen // 2, batch, llm.dtype, peaks)
                    result.decode_floor_tokens_per_s = batch / floor.seconds
                    result.decode_floor_bound = floor.bound
                run.results.append(result)
                if report:
                    report(result)
    except KeyboardInterrupt:
        run.interrupted = True
    return run


def _bench_one(
    llm: LLM, spec: CacheSpec, prompt: list[int], gen: int, batch: int, reps: int, cuda_graph: bool, extrapolate: bool
) -> BenchResult:
    device = llm.device
    engine = Engine(llm.model, spec, capacity=len(prompt) + gen, batch_size=batch, cuda_graph=cuda_graph,
                    allow_extrapolation=extrapolate)
    # Warm-up: kernels, allocator and (on CUDA) the graph of the first decode bucket.
    warm = prompt[: min(len(prompt), 256)]
    _run(engine, warm, min(WARMUP_TOKENS, engine.limit - len(warm) + 1))
    prefill, decode, first_token, peaks = [], [], [], []
    for _ in range(reps):
        reset_peak_memory(device)
        prefill_s, decode_s = _run(engine, prompt, gen)
        peaks.append(peak_memory(device))
        prefill.append(len(prompt) * batch / prefill_s)
        first_token.append(prefill_s)
        if gen > 1:
            decode.append((gen - 1) * batch / decode_s)
    weights, cache_bytes = weights_bytes(llm), engine.cache.nbytes()
    peak = max(peaks)
    before = llm.memory_before_load
    increase = None if before is None else max(peak - before, 0)
    return BenchResult(
        method=str(engine.cache.spec),
        label=engine.cache.spec.display_name(llm.dtype),
        context=len(prompt),
        batch=batch,
        gen=gen,
        reps=reps,
        cuda_graph=engine.graphs is not None,
        decode_path=engine.cache.decode_path(),
        prefill_tokens_per_s=statistics.mean(prefill),
        decode_tokens_per_s=statistics.mean(decode) if decode else None,
        decode_tokens_per_s_std=statistics.stdev(decode) if len(decode) > 1 else None,
        time_to_first_token_s=statistics.mean(first_token),
        peak_memory_bytes=peak,
        peak_memory_increase_bytes=increase,
        weights_bytes=weights,
        cache_bytes=cache_bytes,
        workspace_bytes=max((peak if increase is None else increase) - weights - cache_bytes, 0),
        cache_bytes_per_token=bytes_per_token(spec, llm.config, llm.dtype),
        normalized_size=normalized_size(spec, llm.config, llm.dtype),
    )


@torch.inference_mode()
def _run(engine: Engine, prompt: list[int], gen: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the remaining gen - 1 tokens), greedy, batch-wide."""
    engine.reset()
    synchronize(engine.device)
    start = time.perf_counter()
    token = engine.prefill(prompt).argmax(dim=-1)
    synchronize(engine.device)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(gen - 1):
        token = engine.decode(token, UNKNOWN_TOKEN).argmax(dim=-1)
    synchronize(engine.device)
    return prefill_s, time.perf_counter() - start


def environment(llm: LLM) -> dict:
    """What a result depends on besides the workload: device, dtype, versions, command."""
    device = llm.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "model": llm.name,
        "random_weights": llm.random_weights,
        "device": f"{device.type}: {name}",
        "dtype": str(llm.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "xqinfer": _version(),
        "command": " ".join(["xqinfer", *sys.argv[1:]]),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xqinfer")
    except PackageNotFoundError:
        return "unknown"

