"""Human-readable sizes and the one-line speed/memory summary every command prints."""

from __future__ import annotations

from rich.table import Table

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


def perplexity_table(report) -> Table:
    """One row per method, in the order they ran (fp16 first)."""
    title = (f"{report.model} | {report.dataset} | protocol {report.protocol} | ctx {report.ctx}"
             + (f" | chunk {report.chunk}" if report.protocol == "stream" else ""))
    table = Table(title=title, title_justify="left")
    headers = ["method", "bits", "normalized", "compression", "PPL", "ΔPPL"]
    headers += ["KLD"] if report.with_kld else []
    headers += ["tokens", "seconds"]
    for header in headers:
        table.add_column(header, justify="left" if header == "method" else "right", no_wrap=True)
    for row in report.rows():
        cells = [row["spec"], row["bits"], f"{row['normalized_size']:.4f}", f"{row['compression']:.2f}x",
                 f"{row['ppl']:.4f} ± {row['ppl_stderr']:.4f}", f"{row['delta_ppl']:+.4f}"]
        cells += [f"{row['kld']:.5f}"] if report.with_kld else []
        cells += [str(row["tokens"]), f"{row['seconds']:.1f}"]
        table.add_row(*cells)
    return table
