"""PNG plots of `ppl` and `plan` results. matplotlib is an optional extra, imported here only, and only to draw.

Figures are drawn on matplotlib's Agg canvas directly, never through pyplot, so that drawing one changes no global
state (backend, open figures) of a program that imports xqinfer. Every figure is WIDTH x HEIGHT pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from .accounting import cache_bytes, weights_bytes
from .cache import CacheSpec, parse_spec
from .config import ModelConfig
from .errors import XQInferError
from .files import write_new_file

INSTALL = "pip install 'xqinfer[plot]'"
DPI = 100
WIDTH, HEIGHT = 900, 600
GB = 1e9
SHORTEST_CONTEXT = 1024
CURVE_POINTS = 64


def require_matplotlib() -> None:
    """Refuses --plot, before any work, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise XQInferError(f"--plot needs matplotlib, which is not installed: {INSTALL}") from None


def check_plot_path(path: Path) -> None:
    """Refuses a destination that exists (a plot never replaces a file), is not a .png, or cannot be written."""
    if path.suffix.lower() != ".png":
        raise XQInferError(f"--plot writes a PNG image: name it *.png, not {path.name}")
    if path.exists() or path.is_symlink():
        raise XQInferError(f"{path} already exists: choose another name (xqinfer never overwrites a file)")
    try:
        path.open("xb").close()  # tests the folder as the write will; removed at once
    except OSError as exc:
        raise XQInferError(f"cannot write {path}: {exc.strerror or exc}") from None
    path.unlink()


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other beats on both size and error (lower is better on both), by growing size."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], math.inf
    for index in order:
        if points[index][1] < best:
            front.append(index)
            best = points[index][1]
    return front


def kld_plot(report, path: Path) -> None:
    """KL divergence to fp16 (log scale) against normalized size, one labelled point per method, the Pareto front
    joined; both axes are logarithmic. A method with KLD 0 (fp16 itself) has no place on a log axis: it is a triangle
    on the bottom edge at its size instead. `report` is a `ppl.PerplexityReport` scored with `kld=True`."""
    if not report.with_kld:
        raise XQInferError("the KLD plot needs the KL divergence: score with kld=True (--kld)")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure, axes = _figure()
    rows = [row for row in report.rows() if row["kld"] is not None and math.isfinite(row["kld"])]
    drawn = [row for row in rows if row["kld"] > 0]
    exact = [row for row in rows if row["kld"] <= 0]
    points = [(row["normalized_size"], row["kld"]) for row in drawn]
    front = pareto_front(points)
    if len(front) > 1:
        axes.plot(*zip(*(points[i] for i in front)), color="tab:gray", linewidth=1, zorder=1, label="Pareto front")
    for row, point in zip(drawn, points):
        axes.scatter(*point, zorder=2)
        axes.annotate(row["label"], point, textcoords="offset points", xytext=(6, 4), fontsize=8)
    axes.set_yscale("log")
    # Sizes span 0.07 to 1 (2 for an fp32 model's fp16): on a log axis the compressed methods are not crowded.
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    sizes = [row["normalized_size"] for row in rows]
    if sizes:
        axes.set_xlim(min(sizes) / 1.15, max(sizes) * 1.3)  # room for the labels right of the points
    if exact:
        # x in data units, y on the axes' bottom edge: the log axis has no 0 to put these at.
        edge = axes.get_xaxis_transform()
        for row in exact:
            axes.scatter(row["normalized_size"], 0, marker="^", s=80, color="black", transform=edge, clip_on=False,
                         zorder=3)
            axes.annotate(f"{row['label']} (KLD 0)", (row["normalized_size"], 0), xycoords=edge,
                          textcoords="offset points", xytext=(-8, 6), ha="right", fontsize=8)
    axes.set_xlabel("normalized size (bits per cached token / a 16-bit KV cache's, log scale)")
    axes.set_ylabel("KL divergence to fp16 (nats per token, log scale)")
    axes.set_title(f"{Path(report.model).name} | {Path(report.dataset).name} | {report.protocol}, ctx {report.ctx} | "
                   f"{report.baseline.tokens} tokens", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    if len(front) > 1:
        axes.legend(loc="upper right", fontsize=8)
    write_new_file(path, lambda handle: figure.savefig(handle, format="png", dpi=DPI))


def memory_plot(
    config: ModelConfig,
    specs: Sequence[str | CacheSpec],
    path: Path,
    *,
    memory: int,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    context: int | None = None,
    title: str = "",
) -> None:
    """Cache memory (GB) against context, one line per method, from SHORTEST_CONTEXT (a sixteenth of the positions
    for a model with fewer than 16k) to the model's positions on a log axis; the memory the weights leave of the
    budget is a horizontal line, and `context` (the one planned for) a vertical one."""
    longest = config.max_position_embeddings
    shortest = min(SHORTEST_CONTEXT, max(longest // 16, 1))
    contexts = sorted({round(shortest * (longest / shortest) ** (i / CURVE_POINTS)) for i in range(CURVE_POINTS + 1)})
    figure, axes = _figure()
    for spec in specs:
        spec = parse_spec(spec) if isinstance(spec, str) else spec
        sizes = [cache_bytes(spec, config, n, batch, dtype) / GB for n in contexts]
        axes.plot(contexts, sizes, label=spec.display_name(dtype))
    free = (memory - weights_bytes(config, dtype)) / GB
    axes.axhline(free, color="black", linestyle="--", linewidth=1,
                 label=f"budget {memory / GB:g} GB - weights = {free:.2f} GB")
    if context is not None and shortest <= context <= longest:
        axes.axvline(context, color="tab:gray", linestyle=":", linewidth=1, label=f"context {context}")
    axes.set_xscale("log", base=2)
    ticks = sorted({n for n in (2**k for k in range(40)) if shortest <= n <= longest} | {shortest, longest})
    axes.set_xticks(ticks, [_tokens(n) for n in ticks])
    axes.set_xlim(shortest, longest)
    axes.set_ylim(bottom=0)
    axes.set_xlabel("context (tokens per sequence, log scale)")
    axes.set_ylabel(f"cache memory, GB (10^9 bytes){f', batch {batch}' if batch > 1 else ''}")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    write_new_file(path, lambda handle: figure.savefig(handle, format="png", dpi=DPI))


def _tokens(count: int) -> str:
    return f"{count // 1024}k" if count % 1024 == 0 else str(count)


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()
