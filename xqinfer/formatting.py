"""Human-readable sizes and the one-line speed/memory summary every command prints."""

from __future__ import annotations

from rich.table import Table

from .api import GenerationResult
from .cache import parse_spec


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


def label(spec: str) -> str:
    """A table's name for a method: its spec without the options left at their defaults (the JSON keeps them all)."""
    return parse_spec(spec).label()


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
        cells = [label(row["spec"]), row["bits"], f"{row['normalized_size']:.4f}", f"{row['compression']:.2f}x",
                 f"{row['ppl']:.4f} ± {row['ppl_stderr']:.4f}", f"{row['delta_ppl']:+.4f}"]
        cells += [f"{row['kld']:.5f}"] if report.with_kld else []
        cells += [str(row["tokens"]), f"{row['seconds']:.1f}"]
        table.add_row(*cells)
    return table


def bench_table(results, env: dict) -> Table:
    """llama-bench's layout: one row per (method, context), speeds as mean ± std.

    Columns that only sometimes say something appear only then: the decode floor (with measured peaks) and the
    decode path (where a fused kernel ran).
    """
    table = Table(title=f"{env['model']} | {env['device']} | {env['dtype']}", title_justify="left")
    floors = any(r.decode_floor_tokens_per_s is not None for r in results)
    paths = any(r.decode_path != "torch" for r in results)
    headers = ["method", "ctx", "batch", "prefill t/s", "decode t/s", "TTFT s", "peak", "weights", "cache",
               "workspace", "B/token", "normalized", "graph"]
    headers += ["floor t/s", "of floor"] if floors else []
    headers += ["kernels"] if paths else []
    for header in headers:
        table.add_column(header, justify="left" if header == "method" else "right", no_wrap=True)
    for r in results:
        cells = [label(r.method), str(r.context), str(r.batch), f"{r.prefill_tokens_per_s:.1f}",
                 "-" if r.decode_tokens_per_s is None
                 else f"{r.decode_tokens_per_s:.2f} ± {r.decode_tokens_per_s_std:.2f}",
                 f"{r.time_to_first_token_s:.3f}",
                 human_bytes(r.peak_memory_bytes), human_bytes(r.weights_bytes), human_bytes(r.cache_bytes),
                 human_bytes(r.workspace_bytes), f"{r.cache_bytes_per_token:.0f}", f"{r.normalized_size:.4f}",
                 "yes" if r.cuda_graph else "no"]
        if floors:
            fraction = r.fraction_of_floor
            cells += [f"{r.decode_floor_tokens_per_s:.1f} ({r.decode_floor_bound})",
                      "-" if fraction is None else f"{100 * fraction:.0f}%"]
        cells += [r.decode_path] if paths else []
        table.add_row(*cells)
    return table


def plan_table(rows, model: str, memory: int, context: int, batch: int) -> Table:
    table = Table(title=f"{model} | budget {human_bytes(memory)} | context {context} | batch {batch}",
                  title_justify="left")
    floors = any(r.decode_floor_tokens_per_s is not None for r in rows)
    headers = ["method", "normalized", "equiv. bits", "B/token", f"cache @ {context}", "weights", "workspace",
               "fits", "max context (b=1)", f"max batch @ {context}"]
    headers += ["decode floor t/s"] if floors else []
    for header in headers:
        table.add_column(header, justify="left" if header == "method" else "right", no_wrap=True)
    for r in rows:
        bits = "-" if r.equivalent_bits is None else f"{r.equivalent_bits:g}"
        cells = [label(r.method), f"{r.normalized_size:.4f}", bits, f"{r.bytes_per_token:.0f}",
                 human_bytes(r.cache_bytes_at_context), human_bytes(r.weights_bytes),
                 human_bytes(r.workspace_bytes), "yes" if r.fits_at_context else "no",
                 str(r.max_context_batch_1), str(r.max_batch_at_context)]
        cells += [f"{r.decode_floor_tokens_per_s:.1f} ({r.decode_floor_bound})"] if floors else []
        table.add_row(*cells)
    return table


def passkey_table(report) -> Table:
    """One row per method (fp16 first): its hit rate at each prompt length, then over every prompt."""
    depths = ", ".join(f"{depth:g}" for depth in report.depths)
    title = f"{report.model} | pass key | {report.trials} trial(s) at depths {depths}"
    table = Table(title=title, title_justify="left")
    headers = ["method", "bits", "normalized", *[f"{length} tok" for length in report.lengths], "all"]
    for header in headers:
        table.add_column(header, justify="left" if header == "method" else "right", no_wrap=True)

    def cell(counts: dict) -> str:
        return "-" if not counts["trials"] else f"{100 * counts['hit_rate']:.0f}% ({counts['hits']}/{counts['trials']})"

    for method in report.methods:
        table.add_row(label(str(method.spec)), method.bits, f"{method.normalized_size:.4f}",
                      *[cell(report.hits(method, length)) for length in report.lengths], cell(report.hits(method)))
    return table
