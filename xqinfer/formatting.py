"""Human-readable sizes and the one-line speed/memory summary every command prints."""

from __future__ import annotations

from .api import GenerationResult


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} TiB"


def stats_line(result: GenerationResult) -> str:
    s = result.stats
    return (
        f"prompt {s.prompt_tokens} tok, {s.prefill_tokens_per_s:.1f} tok/s | "
        f"generated {s.generated_tokens} tok, {s.decode_tokens_per_s:.1f} tok/s | "
        f"peak memory {human_bytes(s.peak_memory_bytes)} | "
        f"cache {human_bytes(s.cache_bytes)} (normalized {s.cache_normalized_size:.4f})"
    )
