"""Tables and stats lines that fit the terminal: columns chosen by width (the most important kept), every number
shown in full (never `…`), every line within the width; `--wide` and `--json` keep everything."""

from __future__ import annotations

import dataclasses
import io
import re
import sys

import pytest
import torch
from rich.cells import cell_len
from rich.console import Console

import xqinfer
from xqinfer import cli
from xqinfer.bench import BenchResult
from xqinfer.cache import benchmarked_specs, parse_spec
from xqinfer.formatting import bench_table, fit_line, perplexity_table, plan_table, stats_line
from xqinfer.plan import plan
from xqinfer.ppl import MethodScore, PerplexityReport
from xqinfer.presets import preset_config

WIDTHS = (80, 120)


def rendered(table, width: int | None) -> str:
    console = Console(file=io.StringIO(), width=width or 1000, highlight=False)
    console.print(table)
    return console.file.getvalue()


def assert_fits(text: str, width: int) -> None:
    assert "…" not in text, text
    widest = max(cell_len(line.rstrip()) for line in text.splitlines())
    assert widest <= width, f"a line of {widest} columns at width {width}:\n{text}"


def bench_results() -> list[BenchResult]:
    # Distinct figures per row, so that each one can be looked for in full.
    return [BenchResult(str(parse_spec(method)), parse_spec(method).display_name(torch.bfloat16), 32768, 1, 128, 3,
                        True, "torch",
                        prefill_tokens_per_s=12000.5 + i, decode_tokens_per_s=1000.25 + 10 * i,
                        decode_tokens_per_s_std=1.5 + i, time_to_first_token_s=2.5 + i,
                        peak_memory_bytes=(17 + i) << 30, peak_memory_increase_bytes=None, weights_bytes=16 << 30,
                        cache_bytes=(i + 1) << 28, workspace_bytes=300 << 20, cache_bytes_per_token=131072 - i,
                        normalized_size=1 / (i + 1))
            for i, method in enumerate(benchmarked_specs())]


ENV = {"model": "llama-3.1-8b", "device": "cuda: NVIDIA H200", "dtype": "bfloat16"}


@pytest.mark.parametrize("width", WIDTHS)
def test_bench_table_fits_and_keeps_its_key_numbers_whole(width):
    results = bench_results()
    text = rendered(bench_table(results, ENV, width), width)
    assert_fits(text, width)
    for r in results:
        assert r.label in text
        assert f"{r.decode_tokens_per_s:.2f} ± {r.decode_tokens_per_s_std:.2f}" in text
        assert f"{r.prefill_tokens_per_s:.1f}" in text
    assert "32768" in text and "batch 1" in text and "CUDA graphs" in text  # what every row shares: the title
    assert "not shown at this width" in text and "--wide" in text  # what is left out is said
    if width >= 120:
        assert "TTFT s" in text and "peak" in text and "normalized" in text
        for r in results:
            assert f"{r.time_to_first_token_s:.3f}" in text


def test_wide_tables_have_every_column():
    text = rendered(bench_table(bench_results(), ENV, None), None)
    for header in ("ctx", "prefill t/s", "decode t/s", "TTFT s", "peak", "weights", "cache", "workspace", "B/token",
                   "normalized"):
        assert header in text
    assert "not shown" not in text and "…" not in text


def plan_rows():
    return plan(preset_config("llama-3.1-8b"), benchmarked_specs(), memory=80 * 10**9, context=131072,
                dtype=torch.bfloat16)


@pytest.mark.parametrize("width", WIDTHS)
def test_plan_table_fits_and_keeps_its_key_numbers_whole(width):
    rows = plan_rows()
    text = rendered(plan_table(rows, "llama-3.1-8b", 80 * 10**9, 131072, 1, "bf16", width), width)
    assert_fits(text, width)
    assert "fits" in text and "max ctx b=1" in text and "max batch" in text
    for row in rows:
        assert row.label in text
        assert str(row.max_batch_at_context) in text
    if width >= 120:
        assert "normalized" in text and "B/token" in text
        for row in rows:
            assert f"{row.normalized_size:.4f}" in text and f"{row.bytes_per_token:.0f}" in text


def perplexity_report() -> PerplexityReport:
    specs = ["fp16", "kivi:bits=2,group=128,prerope=1", "xquant-cl:bits=2", "xquant:bits=4"]
    scores = [MethodScore(parse_spec(spec), 1 / (i + 1), str(4 - i), parse_spec(spec).display_name(torch.float32),
                          nll_sum=1.7 * 1000 + i, nll_squares=3100.0 + i, delta_nll_sum=float(i),
                          delta_nll_squares=4.0 * i, kld_sum=float(i), tokens=1000, windows=2, seconds=12.5 + i)
              for i, spec in enumerate(specs)]
    return PerplexityReport("wikitext2-test.txt", "llama-3.1-8b", "stream", 512, 8, 2, scores, with_kld=True)


@pytest.mark.parametrize("width", WIDTHS)
def test_perplexity_table_fits_and_keeps_its_key_numbers_whole(width):
    report = perplexity_report()
    text = rendered(perplexity_table(report, width), width)
    assert_fits(text, width)
    for row in report.rows():
        assert row["label"] in text
        assert f"{row['ppl']:.4f} ± {row['ppl_stderr']:.4f}" in text and f"{row['delta_ppl']:+.4f}" in text
        if row["spec"] != "fp16":  # the baseline's ΔPPL is exact
            assert f"{row['delta_ppl']:+.4f} ± {row['delta_ppl_stderr']:.4f}" in text
    if width >= 120:
        for row in report.rows():
            assert f"{row['kld']:.5f}" in text and f"{row['normalized_size']:.4f}" in text


def test_a_single_scored_token_has_no_spread_to_show():
    report = perplexity_report()
    for score in report.scores:
        score.tokens, score.nll_sum, score.nll_squares = 1, 1.5, 2.25  # a standard error needs two
    text = rendered(perplexity_table(report, 120), 120)
    assert "nan" not in text and "±" not in text and f"{report.baseline.ppl:.4f}" in text


def test_figures_with_nothing_to_average_show_a_dash():
    report = perplexity_report()
    for score in report.scores:
        score.tokens = score.windows = 0  # Ctrl-C before the first window was complete
        score.nll_sum = score.nll_squares = score.kld_sum = 0.0
    text = rendered(perplexity_table(report, 120), 120)
    assert "nan" not in text.lower() and "inf" not in text.lower()
    header = row_cells(text, "method")
    for spec in ("kv fp32", "xquant-cl"):
        cells = dict(zip(header, row_cells(text, spec)))
        assert cells["PPL"] == cells["ΔPPL"] == cells["KLD"] == "-" and cells["tokens"] == "0"


def row_cells(text: str, first: str) -> list[str]:
    """The cells of the table row (or header) whose first cell is `first`."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").replace("┃", "│").split("│")]
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{text}")


def test_a_width_too_small_for_the_key_columns_wraps_rather_than_cuts():
    for table in (bench_table(bench_results(), ENV, 40), plan_table(plan_rows(), "m", 10**9, 4096, 1, "bf16", 40)):
        assert_fits(rendered(table, 40), 40)


# --- the command line: the terminal's width, $COLUMNS, 80 in a pipe, --wide ---------------------------------------


def run_plan(monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["xqinfer", "plan", "--memory", "80GB", "--context", "128k", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    assert exited.value.code in (0, None), err
    return out


def test_plan_in_a_pipe_fits_80_columns_unless_told_otherwise(monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert_fits(run_plan(monkeypatch, capsys), 80)
    monkeypatch.setenv("COLUMNS", "120")
    text = run_plan(monkeypatch, capsys)
    assert_fits(text, 120)
    assert max(cell_len(line.rstrip()) for line in text.splitlines()) > 80  # the room is used
    wide = run_plan(monkeypatch, capsys, "--wide")
    for header in ("normalized", "equiv. bits", "B/token", "cache @ ctx", "weights", "workspace", "fits",
                   "max ctx b=1", "max batch"):
        assert header in wide
    assert "not shown" not in wide and "…" not in wide


STATS = ("prompt 5 tok, 983.2 tok/s | generated 200 tok, 368.1 tok/s | peak memory +12.30 MiB (process 414.40 MiB) | "
         "cache kv fp32 257.85 KiB (normalized 2.0000) | cache holds 205/4096 tokens, 0 reused from earlier turns")


@pytest.mark.parametrize("width", [40, 80, 120])
def test_a_stats_line_breaks_at_its_separators_only(width):
    text = fit_line(STATS, width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), text
    if width >= 80:  # every part fits in a line: a line break replaces a separator
        assert len(lines) > 1 and " | ".join(lines) == STATS
    else:  # a part longer than the line wraps at its spaces, never inside a word
        words = [word for word in STATS.split() if word != "|"]
        assert [word for word in " ".join(lines).split() if word != "|"] == words


def test_a_stats_line_is_left_whole_without_a_width():
    assert fit_line(STATS, None) == STATS


@pytest.mark.parametrize("dtype,name", [(torch.float32, "kv fp32"), (torch.bfloat16, "kv bf16"),
                                        (torch.float16, "kv fp16")])
def test_the_baseline_is_named_for_the_dtype_it_stores(dtype, name):
    """`fp16` (still the spec's name) stores the run dtype; its normalized size stays against a 16-bit cache."""
    config = preset_config("llama-3.1-8b")
    assert parse_spec("fp16").display_name(dtype) == name
    assert parse_spec("kivi:bits=2,group=128").display_name(dtype) == "kivi:group=128"  # the others: their label
    (row,) = plan(config, ["fp16"], memory=80 * 10**9, context=4096, dtype=dtype)
    assert row.label == name and row.normalized_size == torch.finfo(dtype).bits / 16
    text = rendered(plan_table([row], "llama-3.1-8b", 80 * 10**9, 4096, 1, "x", 80), 80)
    assert name in text and "fp16" not in text.replace("kv fp16", "")


def test_one_repetition_shows_no_spread_and_the_cpu_peak_is_the_runs_increase():
    results = [dataclasses.replace(r, reps=1, decode_tokens_per_s_std=None, peak_memory_increase_bytes=(i + 1) << 20,
                                   peak_memory_bytes=((i + 1) << 20) + (400 << 20))
               for i, r in enumerate(bench_results())]
    text = rendered(bench_table(results, {**ENV, "device": "cpu: x86_64"}, None), None)
    assert "±" not in text and f"{results[0].decode_tokens_per_s:.2f}" in text
    header = row_cells(text, "method")
    cells = dict(zip(header, row_cells(text, results[1].label)))
    assert cells["peak"] == "+2.00 MiB" and cells["process"] == "402.00 MiB"


def test_rates_that_cannot_be_measured_show_a_dash():
    """One token: nothing decoded after it, so no decode rate (not `0.0 tok/s`); the JSON says null."""
    llm = xqinfer.load(preset="llama-tiny", device="cpu")
    result = xqinfer.generate(llm, "hi", max_tokens=1, sampling={"temperature": 0}, chat=False)
    assert result.stats.decode_tokens_per_s is None and result.as_dict()["decode_tokens_per_s"] is None
    line = stats_line(result)
    assert "generated 1 tok, - tok/s" in line and "0.0 tok/s" not in line
    assert re.search(r"prompt 3 tok, [\d.]+ tok/s", line)
    assert re.search(r"peak memory \+[\d.]+ [KMG]?i?B \(process [\d.]+ [KMG]iB\)", line)  # the CPU's two figures
