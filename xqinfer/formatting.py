"""Human-readable sizes, the one-line speed/memory summary every command prints, and tables that fit the terminal."""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
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
        f"prompt {s.prompt_tokens} tok, {rate(s.prefill_tokens_per_s)} | "
        f"generated {s.generated_tokens} tok, {rate(s.decode_tokens_per_s)} | "
        f"peak memory {peak(s.peak_memory_bytes, s.peak_memory_increase_bytes)} | "
        f"cache {s.cache_label} {human_bytes(s.cache_bytes)} (normalized {s.cache_normalized_size:.4f})"
    )


def rate(tokens_per_s: float | None) -> str:
    return "- tok/s" if tokens_per_s is None else f"{tokens_per_s:.1f} tok/s"


def peak(total: int, increase: int | None) -> str:
    """A peak as what the run added over the process before loading (CPU), with the process's total beside it."""
    if increase is None:
        return human_bytes(total)
    return f"+{human_bytes(increase)} (process {human_bytes(total)})"


def figure(value: float | None, format_spec: str) -> str:
    """A number as `format_spec` writes it, or `-` where there is none to show (nothing measured or averaged)."""
    return "-" if value is None or not math.isfinite(value) else format(value, format_spec)


@dataclass(frozen=True)
class Column:
    """A table column: `priority` 0 is always shown; when the table is too wide, the highest numbers go first."""

    header: str
    priority: int = 0
    justify: str = "right"


def fitted_table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None) -> Table:
    """A table of the columns that fit in `width` characters (all of them with None), leaving out the least
    important first (the rightmost of equals) and naming them in the caption.

    No number is ever cut: cells wrap at spaces, and fold a word longer than their column, where even the
    priority-0 columns are wider than `width`.
    """
    shown = list(range(len(columns)))
    while True:
        table = _table(title, columns, rows, shown)
        droppable = [i for i in shown if columns[i].priority > 0]
        if width is None or natural_width(table) <= width or not droppable:
            # Broken at its separators to the table's width (rich would wrap it at any space).
            table.title = fit_line(title, natural_width(table) if width is None else min(width, natural_width(table)))
            return table
        shown.remove(max(droppable, key=lambda i: (columns[i].priority, i)))


def _table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], shown: list[int]) -> Table:
    hidden = [column.header for i, column in enumerate(columns) if i not in shown]
    caption = f"not shown at this width: {', '.join(hidden)} (--wide or --json has them)" if hidden else None
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i in shown:
        table.add_column(columns[i].header, justify=columns[i].justify, overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table


def natural_width(table: Table) -> int:
    """The width a table takes when nothing is wrapped."""
    console = Console(file=io.StringIO(), width=1 << 20)
    return console.measure(table).maximum


def terminal_width(console: Console) -> int | None:
    """The width to fit a line to: the terminal's; None in a pipe or a file, where a line is never broken."""
    return console.width if console.is_terminal else None


def fit_line(text: str, width: int | None, separator: str = " | ") -> str:
    """`text` broken into lines of at most `width` characters at its separators (at spaces inside a part longer
    than that), never inside a word; unchanged with no width."""
    if width is None or len(text) <= width:
        return text
    lines: list[str] = []
    for part in text.split(separator):
        candidate = f"{lines[-1]}{separator}{part}" if lines else part
        if lines and len(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.extend(textwrap.wrap(part, width, break_long_words=False, break_on_hyphens=False) or [part])
    return "\n".join(lines)


def perplexity_table(report, width: int | None = None) -> Table:
    """One row per method, in the order they ran (fp16 first)."""
    title = (f"{report.model} | {report.dataset} | protocol {report.protocol} | ctx {report.ctx}"
             + (f" | chunk {report.chunk}" if report.protocol == "stream" else ""))
    columns = [Column("method", 0, "left"), Column("bits", 2), Column("normalized", 1), Column("compression", 3),
               Column("PPL"), Column("ΔPPL")]
    columns += [Column("KLD", 1)] if report.with_kld else []
    columns += [Column("tokens", 4), Column("seconds", 4)]
    rows = []
    for row in report.rows():
        spread = figure(row["ppl_stderr"], ".4f")
        ppl = figure(row["ppl"], ".4f") + (f" ± {spread}" if spread != "-" else "")
        delta = figure(row["delta_ppl"], "+.4f")
        if row["delta_ppl_stderr"] and math.isfinite(row["delta_ppl_stderr"]):  # the baseline's is 0
            delta += f" ± {figure(row['delta_ppl_stderr'], '.4f')}"
        cells = [row["label"], row["bits"], f"{row['normalized_size']:.4f}", f"{row['compression']:.2f}x",
                 ppl, delta]
        cells += [figure(row["kld"], ".5f")] if report.with_kld else []
        cells += [str(row["tokens"]), f"{row['seconds']:.1f}"]
        rows.append(cells)
    return fitted_table(title, columns, rows, width)


def bench_table(results, env: dict, width: int | None = None) -> Table:
    """llama-bench's layout: one row per (method, context), speeds as mean ± std; what every row shares (batch,
    tokens decoded, repetitions, CUDA graphs) is in the title.

    Columns that only sometimes say something appear only then: the decode floor (with measured peaks) and the
    decode path (where a fused kernel ran).
    """
    first = results[0]
    title = (f"{env['model']} | {env['device']} | {env['dtype']} | batch {first.batch} | gen {first.gen} | "
             f"reps {first.reps}" + (" | CUDA graphs" if first.cuda_graph else ""))
    floors = any(r.decode_floor_tokens_per_s is not None for r in results)
    paths = any(r.decode_path != "torch" for r in results)
    # On the CPU the peak is what the run added to the process (torch's runtime aside); its total is beside it.
    process = any(r.peak_memory_increase_bytes is not None for r in results)
    columns = [Column("method", 0, "left"), Column("ctx"), Column("prefill t/s", 1), Column("decode t/s"),
               Column("TTFT s", 3)]
    columns += [Column("floor t/s", 1), Column("of floor", 1)] if floors else []
    columns += [Column("peak", 2)] + ([Column("process", 5)] if process else [])
    columns += [Column("weights", 4), Column("cache", 1), Column("workspace", 4), Column("B/token", 5),
                Column("normalized", 3)]
    columns += [Column("kernels", 2)] if paths else []
    rows = []
    for r in results:
        spread = "" if r.decode_tokens_per_s_std is None else f" ± {r.decode_tokens_per_s_std:.2f}"
        cells = [r.label, str(r.context), f"{r.prefill_tokens_per_s:.1f}",
                 figure(r.decode_tokens_per_s, ".2f") + (spread if r.decode_tokens_per_s is not None else ""),
                 f"{r.time_to_first_token_s:.3f}"]
        if floors:
            fraction = r.fraction_of_floor
            cells += [f"{r.decode_floor_tokens_per_s:.1f} ({r.decode_floor_bound})",
                      "-" if fraction is None else f"{100 * fraction:.0f}%"]
        if r.peak_memory_increase_bytes is None:
            cells += [human_bytes(r.peak_memory_bytes)] + (["-"] if process else [])
        else:
            cells += [f"+{human_bytes(r.peak_memory_increase_bytes)}", human_bytes(r.peak_memory_bytes)]
        cells += [human_bytes(r.weights_bytes), human_bytes(r.cache_bytes), human_bytes(r.workspace_bytes),
                  f"{r.cache_bytes_per_token:.0f}", f"{r.normalized_size:.4f}"]
        cells += [r.decode_path] if paths else []
        rows.append(cells)
    return fitted_table(title, columns, rows, width)


def plan_table(rows, model: str, memory: int, context: int, batch: int, dtype: str,
               width: int | None = None) -> Table:
    title = f"{model} | {dtype} | budget {human_bytes(memory)} | context {context} | batch {batch}"
    floors = any(r.decode_floor_tokens_per_s is not None for r in rows)
    columns = [Column("method", 0, "left"), Column("normalized", 2), Column("equiv. bits", 3), Column("B/token", 2),
               Column("cache @ ctx"), Column("weights", 3), Column("workspace", 4), Column("fits"),
               Column("max ctx b=1"), Column("max batch", 1)]
    columns += [Column("decode floor t/s", 1)] if floors else []
    cells = []
    for r in rows:
        bits = "-" if r.equivalent_bits is None else f"{r.equivalent_bits:g}"
        row = [r.label, f"{r.normalized_size:.4f}", bits, f"{r.bytes_per_token:.0f}",
               human_bytes(r.cache_bytes_at_context), human_bytes(r.weights_bytes),
               human_bytes(r.workspace_bytes), "yes" if r.fits_at_context else "no",
               str(r.max_context_batch_1), str(r.max_batch_at_context)]
        row += [f"{r.decode_floor_tokens_per_s:.1f} ({r.decode_floor_bound})"] if floors else []
        cells.append(row)
    return fitted_table(title, columns, cells, width)


def passkey_table(report, dtype, width: int | None = None) -> Table:
    """One row per method (fp16 first): its hit rate at each prompt length, then over every prompt."""
    depths = ", ".join(f"{depth:g}" for depth in report.depths)
    title = f"{report.model} | pass key | {report.trials} trial(s) at depths {depths}"
    columns = [Column("method", justify="left"), Column("bits", 2), Column("normalized", 1),
               *[Column(f"{length} tok") for length in report.lengths], Column("all")]

    def cell(counts: dict) -> str:
        return "-" if not counts["trials"] else f"{100 * counts['hit_rate']:.0f}% ({counts['hits']}/{counts['trials']})"

    rows = [[method.spec.display_name(dtype), method.bits, f"{method.normalized_size:.4f}",
             *[cell(report.hits(method, length)) for length in report.lengths], cell(report.hits(method))]
            for method in report.methods]
    return fitted_table(title, columns, rows, width)
