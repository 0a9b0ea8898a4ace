"""Prefill and the static decode step over one cache, token-level generation with stop ids, timing and memory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from . import accounting
from .arch import CausalLM
from .cache import Cache, CacheSpec, make_cache, parse_spec
from .device import peak_memory, reset_peak_memory
from .errors import ContextError
from .memory import CACHE_HINT, cache_needs, check_memory
from .sampling import Sampler, SamplingParams

PREFILL_CHUNK = 1024
SPAN_MIN = 256
UNKNOWN_TOKEN = -1


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    peak_memory_bytes: int = 0
    cache_bytes: int = 0
    cache_normalized_size: float = 0.0
    cache_layer_bytes: list[int] = field(default_factory=list)
    cache_layer_normalized_sizes: list[float] = field(default_factory=list)
    reused_tokens: int = 0
    memory_before_load_bytes: int | None = None  # CPU: the process's resident size before the model was loaded
    cache_method: str = ""  # the full spec
    cache_label: str = ""  # what the stats line calls it (CacheSpec.display_name): `kv fp32` for fp16 in fp32

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """None when nothing was timed (a Ctrl-C during the prefill)."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode steps after the first token per second; None without any (a single token)."""
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else None

    @property
    def peak_memory_increase_bytes(self) -> int | None:
        """CPU: the peak over the resident size before the model was loaded (the model and its run, without the
        torch runtime); None where that size is not known (CUDA's peak already counts only tensors)."""
        if self.memory_before_load_bytes is None:
            return None
        return max(self.peak_memory_bytes - self.memory_before_load_bytes, 0)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_increase_bytes": self.peak_memory_increase_bytes,
            "cache_method": self.cache_method,
            "cache_label": self.cache_label,
            "cache_bytes": self.cache_bytes,
            "cache_normalized_size": self.cache_normalized_size,
            "cache_layer_bytes": self.cache_layer_bytes,
            "cache_layer_normalized_sizes": self.cache_layer_normalized_sizes,
        }


def check_capacity(capacity: int | None, trained: int, allow_extrapolation: bool) -> None:
    """Refuses a capacity that is not a positive token count, or (without extrapolation) beyond the model's
    positions: clamping it silently would leave the caller with less room than asked for."""
    if capacity is None:
        return
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise ContextError(f"capacity must be a whole number of tokens, got {type(capacity).__name__} {capacity!r}")
    if capacity < 1:
        raise ContextError(f"capacity must be at least 1 token, got {capacity}")
    if capacity > trained and not allow_extrapolation:
        raise ContextError(f"a capacity of {capacity} tokens is beyond the model's {trained} positions")


class Engine:
    """One model and one preallocated cache; keeps the cached token history so a chat can extend it turn by turn."""

    def __init__(
        self,
        model: CausalLM,
        cache: str | CacheSpec = "fp16",
        capacity: int | None = None,
        batch_size: int = 1,
        prefill_chunk: int = PREFILL_CHUNK,
        allow_extrapolation: bool = False,
        cuda_graph: bool = True,
    ) -> None:
        config = model.config
        self.model = model
        self.device = model.output_weight().device
        # Beyond the trained positions quality degrades (unless dynamic RoPE stretches them): opt-in only.
        trained = config.max_position_embeddings
        check_capacity(capacity, trained, allow_extrapolation)
        self.max_positions = (capacity or trained) if allow_extrapolation else trained
        self.capacity = capacity or self.max_positions
        self.spec = parse_spec(cache) if isinstance(cache, str) else cache
        sequences = f" x {batch_size} sequences" if batch_size > 1 else ""
        dtype = model.output_weight().dtype
        check_memory(cache_needs([self.spec], config, self.capacity, batch_size, dtype), self.device,
                     lambda: f"a {self.spec.display_name(dtype)} cache of {self.capacity} tokens{sequences}",
                     CACHE_HINT)
        self.cache: Cache = make_cache(self.spec, model, self.capacity, batch_size)
        self.batch_size = batch_size
        self.prefill_chunk = prefill_chunk
        self.tokens: list[int] = []
        # Static inputs of the decode step: overwritten in place each step so the step's tensors never move.
        self._step_tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=self.device)
        self._step_positions = torch.zeros((1,), dtype=torch.long, device=self.device)
        # On CUDA the step is captured once per span bucket and replayed; elsewhere it runs eagerly, unchanged.
        self.graphs = DecodeGraphs(self) if cuda_graph and self.device.type == "cuda" else None

    def span_for(self, end: int) -> int:
        """Cache slots a forward ending at position `end` reads: the length rounded up to a bucket.

        Rebuilding (and attending over) the history then costs what the sequence holds, not the capacity. Buckets
        grow by doubling from SPAN_MIN, so a captured decode graph per bucket stays few; the cache rounds them
        to whole quantization groups and caps them at its capacity.
        """
        span = SPAN_MIN
        while span < end:
            span *= 2
        return span

    @property
    def length(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []

    @property
    def limit(self) -> int:
        """Most positions a sequence may reach: the model's, and the cache's capacity unless it is a ring."""
        return self.max_positions if self.cache.is_ring else self.capacity

    def check_room(self, needed: int, held: int | None = None) -> None:
        held = self.length if held is None else held
        if held + needed > self.limit:
            raise ContextError(
                f"{held + needed} tokens do not fit in the context of {self.limit} "
                f"({held} cached, {needed} more requested)"
            )

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> Tensor:
        """Feeds ids after what is cached, in chunks (never an [N, N] mask); returns the last logits [B, V]."""
        self.check_room(len(ids))
        logits = None
        step = min(self.prefill_chunk, self.cache.max_chunk)
        for start in range(0, len(ids), step):
            chunk = list(ids[start : start + step])
            tokens = torch.tensor([chunk] * self.batch_size, dtype=torch.long, device=self.device)
            positions = torch.arange(self.length, self.length + len(chunk), device=self.device)
            span = self.span_for(self.length + len(chunk))
            logits = self.model(tokens, positions, self.cache, last_only=True, span=span)[:, -1]
            self.tokens.extend(chunk)
        return logits

    @torch.inference_mode()
    def decode(self, tokens: Tensor, token_id: int | None = None) -> Tensor:
        """One static-shape step: tokens [B] at the next position -> logits [B, V].

        `token_id` is tokens[0] as a Python int when the caller already has it (else it is read, a host sync);
        a caller that must not synchronize passes UNKNOWN_TOKEN, which only means a later prompt cannot reuse
        the cache past that point.
        """
        self.check_room(1)
        self._step_tokens.copy_(tokens.view(self.batch_size, 1))
        self._step_positions.fill_(self.length)
        span = self.span_for(self.length + 1)
        logits = self.graphs.run(span) if self.graphs is not None else self.static_step(span)
        self.tokens.append(int(tokens[0]) if token_id is None else token_id)
        return logits

    def static_step(self, span: int) -> Tensor:
        """The decode step as a graph captures it: fixed input buffers in, logits out, nothing read on the host."""
        return self.model(self._step_tokens, self._step_positions, self.cache, span=span)[:, -1]

    def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        stats: GenerationStats | None = None,
    ) -> Iterator[int]:
        """Yields sampled ids. Reuses the cached prefix when `prompt` extends what the cache holds.

        The last sampled token is not fed back: the cache always ends with the prompt plus all but the final token,
        which a following turn then prefills along with its own text.
        """
        stats = stats if stats is not None else GenerationStats()
        if not prompt:
            raise ContextError("the prompt is empty: there is nothing to continue")
        reused = self.length if self._extends_cache(prompt) else 0
        # Checked before anything is dropped, so a request that does not fit leaves the cache as it was.
        self.check_room(len(prompt) - reused + max(max_new_tokens - 1, 0), held=reused)
        if reused < self.length:
            self.reset()
        new_ids = list(prompt[reused:])
        sampler = Sampler(params, self.device)
        # The seen-token context only matters to the repetition penalty; without one it is not kept.
        penalized = params.repetition_penalty != 1.0
        context = torch.tensor([list(prompt)] * self.batch_size, device=self.device) if penalized else None
        stop = set(stop_ids)
        stats.prompt_tokens, stats.reused_tokens = len(new_ids), reused
        reset_peak_memory(self.device)
        try:
            start = time.perf_counter()
            token = sampler(self.prefill(new_ids), context)
            value = int(token[0])  # synchronizes the device
            stats.prefill_seconds = time.perf_counter() - start
            for produced in range(max_new_tokens):
                stats.generated_tokens += 1
                yield value
                if value in stop or produced + 1 == max_new_tokens:
                    break
                # Only the step itself is timed, not the consumer's work between tokens.
                start = time.perf_counter()
                if penalized:
                    context = torch.cat((context, token.view(-1, 1)), dim=1)
                token = sampler(self.decode(token, value), context)
                value = int(token[0])
                stats.decode_seconds += time.perf_counter() - start
                stats.decode_steps += 1
        finally:
            self._record_memory(stats)

    def _extends_cache(self, prompt: Sequence[int]) -> bool:
        # A cache cannot be rolled back, so it is reused only when the prompt strictly extends what it holds.
        return len(self.tokens) < len(prompt) and list(prompt[: len(self.tokens)]) == self.tokens

    def _record_memory(self, stats: GenerationStats) -> None:
        stats.peak_memory_bytes = max(stats.peak_memory_bytes, peak_memory(self.device))
        stats.cache_method = str(self.cache.spec)
        stats.cache_label = self.cache.spec.display_name(self.cache.dtype)
        stats.cache_bytes = self.cache.nbytes()
        stats.cache_normalized_size = accounting.normalized_size(self.cache.spec, self.cache.config, self.cache.dtype)
        stats.cache_layer_bytes = self.cache.layer_nbytes()
        stats.cache_layer_normalized_sizes = [
            bits / 16.0 for bits in accounting.layer_bits(self.cache.spec, self.cache.config, self.cache.dtype)]


class DecodeGraphs:
    """CUDA graphs of `Engine.static_step`, one per span bucket, captured on first use.

    Capture needs the step to be replayable: it reads only the engine's fixed input buffers and the cache's
    preallocated tensors, never the host. Running it more than once for the same token is harmless (every write is
    idempotent), which the warm-up before capture relies on.
    """

    WARMUP_RUNS = 2

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = None

    def run(self, span: int) -> Tensor:
        if span not in self.graphs:
            self.graphs[span] = self._capture(span)
        graph, logits = self.graphs[span]
        graph.replay()
        return logits

    def _capture(self, span: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        stream = torch.cuda.Stream(device=self.engine.device)
        stream.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP_RUNS):
                self.engine.static_step(span)
        torch.cuda.current_stream(self.engine.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # One memory pool for every bucket: they never run at the same time.
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.engine.static_step(span)
        self.pool = graph.pool()
        return graph, logits
