"""The `xqinfer` command: argument parsing and printing over the Python API, nothing more."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape

from . import api
from .cache import CacheSpec, benchmarked_specs, parse_spec
from .device import is_out_of_memory, pick_device, set_default_threads, set_threads
from .errors import XQInferError, XQInferWarning, one_line
from .formatting import fit_line, stats_line, terminal_width
from .sampling import SamplingParams

try:  # typer >= 0.16 vendors click; older releases use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions
# click < 8.2 has no such error: `xqinfer` alone prints the help and exits through Exit there.
NoArgsIsHelpError = getattr(click_exceptions, "NoArgsIsHelpError", ())

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Long-context LLM inference with compressed (XQuant, KIVI, ...) caches.",
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
# soft_wrap: rich must not break long lines (stats, /help, errors) when the output is a pipe or a file.
out = Console(highlight=False, soft_wrap=True)

ModelArg = typer.Argument(
    None, help="A .gguf file, a model directory or a Hugging Face hub id (default: SmolLM2-135M-Instruct).")
PresetOpt = typer.Option(None, "--preset", help="Architecture preset from models/ with seeded random weights.")
DtypeOpt = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU).")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present).")
# A list, so that a second --cache is seen and refused (a plain option would keep the last one silently).
CacheOpt = typer.Option([], "--cache", help="Cache method spec, e.g. fp16, xquant:bits=4 (default: fp16).")
ThreadsOpt = typer.Option(
    None, "--threads", min=1,
    help="CPU threads for torch (default: every core; one for a model with hidden size under 512).")
WideOpt = typer.Option(
    False, "--wide", help="Show every column of the table (default: those that fit the terminal; 80 in a pipe).")


def one_cache(caches: Sequence[str]) -> CacheSpec:
    """The one --cache of a command that runs one (parsed now, before any model is loaded), fp16 by default."""
    if len(caches) > 1:
        raise XQInferError(f"--cache is given {len(caches)} times; this command runs one cache "
                           f"(ppl and bench compare several)")
    return parse_spec(caches[0] if caches else "fp16")


def parse_specs(caches: Sequence[str]) -> list[CacheSpec]:
    """Every --cache of a command that compares several, parsed before any model is loaded (a typo costs nothing)."""
    return [parse_spec(text) for text in caches]


def sampling_from(
    llm: api.LLM,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    repeat_penalty: float | None,
    seed: int | None,
) -> SamplingParams:
    return llm.sampling.updated(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repeat_penalty, seed=seed
    )


def load_llm(
    model: str | None, preset: str | None, dtype: str | None, device: str | None, threads: int | None
) -> api.LLM:
    if threads is not None:
        set_threads(threads)  # before loading: building the weights uses them too
    if model is None and preset is None:
        err.print(f"[dim]no MODEL given: using the default model {api.DEFAULT_MODEL_NAME} "
                  f"({escape(str(api.default_model()))})[/dim]")
    llm = api.load(model, preset=preset, dtype=dtype, device=device)
    if threads is None:
        set_default_threads(llm.config)
    return llm


@app.command()
def generate(
    model: Optional[str] = ModelArg,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "-f", help="Read the prompt from a file."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", "--temp", help="0 = greedy (default: the model's generation_config)."),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    min_p: Optional[float] = typer.Option(None, "--min-p"),
    repeat_penalty: Optional[float] = typer.Option(None, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (implies --chat)."),
    chat: Optional[bool] = typer.Option(
        None, "--chat/--no-chat", help="Use the chat template (default: when the model has one)."),
    caches: list[str] = CacheOpt,
    threads: Optional[int] = ThreadsOpt,
    preset: Optional[str] = PresetOpt,
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
) -> None:
    """Continue a prompt, streaming the text, then print speed and memory."""
    text = read_prompt(prompt, prompt_file)
    check_text(system, "--system")
    if chat is False and system is not None:
        raise XQInferError("--system needs the chat template: drop --no-chat, or put the text in the prompt")
    cache = one_cache(caches)
    llm = load_llm(model, preset, dtype, device, threads)
    if not llm.tokenizer.has_chat_template and (chat or (chat is None and system is not None)):
        err.print("[yellow]the model has no chat template: using a plain transcript[/yellow]")
    sampling = sampling_from(llm, temperature, top_p, top_k, min_p, repeat_penalty, seed)
    ids = api.build_prompt(llm, text, chat=chat, system=system)
    session = api.one_shot_session(llm, cache, ids, max_tokens)
    chunks = session.stream(ids, max_tokens=max_tokens, sampling=sampling, stop=stop)
    interrupted = False
    try:
        for chunk in chunks:
            if not as_json:
                sys.stdout.write(chunk)
                sys.stdout.flush()
    except KeyboardInterrupt:
        # Closing the stream ends the engine's loop too, which records the stats of what was generated.
        chunks.close()
        interrupted = True
    result = session.last  # None only after a Ctrl-C before the stream began
    if as_json:
        if result is not None:
            print(json.dumps(result.as_dict()))
    else:
        sys.stdout.write("\n")
        if interrupted:
            err.print("[yellow]\\[interrupted][/yellow]")
        if result is not None:
            err.print(f"[dim]{fit_line(stats_line(result), terminal_width(err))}[/dim]")
    if interrupted:
        sys.exit(130)


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise XQInferError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            # utf-8-sig: a BOM (which some editors write) is not text; read as a character, it changes the prompt.
            return prompt_file.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise XQInferError(f"prompt file {prompt_file} does not exist") from None
        except UnicodeDecodeError:
            raise XQInferError(f"prompt file {prompt_file} is not UTF-8 text") from None
        except OSError as exc:  # a directory, no permission, ...
            raise XQInferError(f"cannot read prompt file {prompt_file}: {exc.strerror or exc}") from None
    if prompt is None:
        raise XQInferError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    check_text(prompt, "--prompt")
    return prompt


def check_text(text: str | None, what: str) -> None:
    """Arguments that are not valid UTF-8 reach Python as lone surrogates, which no tokenizer takes."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise XQInferError(f"{what} is not valid UTF-8 text") from None


@app.command()
def chat(
    model: Optional[str] = ModelArg,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Most tokens per reply."),
    ctx: Optional[int] = typer.Option(
        None, "--ctx", "-c", min=1, help="Context to allocate (default: min(model's, 4096))."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    min_p: Optional[float] = typer.Option(None, "--min-p"),
    repeat_penalty: Optional[float] = typer.Option(None, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    caches: list[str] = CacheOpt,
    threads: Optional[int] = ThreadsOpt,
    preset: Optional[str] = PresetOpt,
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Talk to a model; the cache is kept between turns, so each turn costs only its own tokens."""
    from .chat import ChatREPL

    check_text(system, "--system")
    cache = one_cache(caches)
    llm = load_llm(model, preset, dtype, device, threads)
    sampling = sampling_from(llm, temperature, top_p, top_k, min_p, repeat_penalty, seed)
    ChatREPL(llm, out, err, cache=cache, ctx=ctx, system=system, sampling=sampling, max_tokens=max_tokens).run()


@app.command()
def ppl(
    dataset: Path = typer.Argument(..., help="UTF-8 text file to score."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="A .gguf file, model directory or hub id (default: SmolLM2-135M-Instruct)."),
    caches: list[str] = typer.Option(
        [], "--cache", help="Cache method spec (repeatable); fp16 always runs as the baseline."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Window length in tokens."),
    protocol: str = typer.Option(
        "sim", "--protocol",
        help="sim (the papers': every K/V quantized, one pass per window) or stream (the real cache, in chunks)."),
    chunk: int = typer.Option(1, "--chunk", help="stream: tokens per forward (1 = token-by-token decode)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Score at most this many windows."),
    kld: bool = typer.Option(False, "--kld", help="Also report the KL divergence to fp16 per token."),
    scoring: str = typer.Option(
        "gptq", "--scoring",
        help="gptq (every position of every window) or llama.cpp (BOS per window, its second half scored)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    wide: bool = WideOpt,
    threads: Optional[int] = ThreadsOpt,
    plot_path: Optional[Path] = typer.Option(
        None, "--plot", help="Draw KLD against normalized size to this new PNG file (implies --kld)."),
    preset: Optional[str] = PresetOpt,
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Perplexity of each cache method on the same windows, with its size and its distance from fp16."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .formatting import perplexity_table
    from .ppl import check_options, perplexity, read_text

    check_options(ctx, protocol, scoring, chunk)
    read_text(dataset)  # refuse a bad dataset before spending time on the model
    if json_path is not None and json_path.resolve() == dataset.resolve():
        raise XQInferError("--json would overwrite the dataset; choose another file")
    specs = parse_specs(caches)
    check_writable(json_path)
    check_plot(plot_path)
    kld = kld or plot_path is not None
    llm = load_llm(model, preset, dtype, device, threads)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(f"ppl {protocol}", total=None)
        report = perplexity(llm, dataset, specs, ctx=ctx, protocol=protocol, chunk=chunk, limit=limit, kld=kld,
                            scoring=scoring, progress=lambda done, total: bar.update(task, completed=done, total=total))
    if report.interrupted:
        err.print(f"[yellow]interrupted: the table covers the {report.baseline.windows} complete window(s)[/yellow]")
    width = table_width(wide)
    print_table(perplexity_table(report, width), width)
    for row in report.rows():
        out.print(f"[{escape(row['spec'])}] Final estimate: PPL = {row['ppl']:.4f} +/- {row['ppl_stderr']:.5f}",
                  markup=False)
    if json_path is not None:
        write_json(json_path, report.as_dict())
    if plot_path is not None:
        from .plots import kld_plot

        if report.baseline.windows:
            kld_plot(report, plot_path)
        else:
            err.print(f"[yellow]no complete window: {escape(str(plot_path))} not drawn[/yellow]")
    if report.interrupted:
        sys.exit(130)


@app.command()
def bench(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="A .gguf file, model directory or hub id (default: SmolLM2-135M-Instruct)."),
    contexts: list[str] = typer.Option([], "--context", "-c", help="Prompt length: 4096, 4k, 32K (repeatable)."),
    caches: list[str] = typer.Option(
        [], "--cache", help="Cache method spec (repeatable; default: every method at a typical setting)."),
    gen: int = typer.Option(128, "--gen", "-g", min=1, help="Tokens to decode after the prompt."),
    batch: int = typer.Option(1, "--batch", "-b", min=1, help="Sequences decoded together."),
    reps: int = typer.Option(3, "--reps", "-r", min=1, help="Repetitions after the warm-up."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph", help="Run the decode step eagerly on CUDA too."),
    allow_extrapolation: bool = typer.Option(
        False, "--allow-extrapolation", help="Allow contexts beyond the model's positions."),
    floors: bool = typer.Option(
        False, "--floors",
        help="Measure copy bandwidth and matmul rate first; show each decode speed against its floor."),
    wide: bool = WideOpt,
    threads: Optional[int] = ThreadsOpt,
    preset: Optional[str] = PresetOpt,
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Prefill and decode speed, time to first token and memory of each cache method at long contexts."""
    from .bench import bench as run_bench
    from .bench import environment, parse_context
    from .formatting import bench_table
    from .roofline import measure_peaks

    target = pick_device(device)
    context_values = [parse_context(c) for c in contexts] or [DEFAULT_CONTEXT[target.type]]
    specs = parse_specs(caches or benchmarked_specs())
    check_writable(json_path)
    llm = load_llm(model, preset, dtype, str(target), threads)
    env = environment(llm)
    err.print(f"[dim]{env['model']} | {env['device']} | {env['dtype']} | {env['threads']} threads | "
              f"torch {env['torch']}[/dim]")
    peaks = measure_peaks(llm.device, llm.dtype) if floors else None
    if peaks is not None:
        err.print(f"[dim]peaks: copy {peaks.bandwidth / 1e9:.1f} GB/s (read + write), {peaks.dtype} matmul "
                  f"{peaks.matmul / 1e12:.2f} TFLOP/s[/dim]")
    failures: list[dict] = []

    def failed(spec, context: int, reason: str) -> None:
        failures.append({"method": str(spec), "context": context, "error": one_line(reason)})
        err.print(f"[yellow]  failed: {escape(str(spec))} at {context} tokens: {escape(one_line(reason))}[/yellow]")

    run = run_bench(llm, context_values, specs, gen=gen, batch=batch, reps=reps,
                    cuda_graph=not no_cuda_graph, allow_extrapolation=allow_extrapolation, peaks=peaks,
                    report=lambda r: err.print(f"[dim]  done: {r.method} at {r.context} tokens[/dim]"),
                    failed=failed)
    results = run.results
    if run.interrupted:
        err.print(f"[yellow]interrupted: the table shows the {len(results)} finished run(s)[/yellow]")
    if results:
        width = table_width(wide)
        print_table(bench_table(results, env, width), width)
    if json_path is not None:
        write_json(json_path, {**env, "peaks": peaks.as_dict() if peaks else None, "interrupted": run.interrupted,
                               "results": [r.as_dict() for r in results], "failures": failures})
    if run.interrupted:
        sys.exit(130)
    if failures:
        fail(f"{len(failures)} of {len(failures) + len(results)} runs failed: "
             + "; ".join(f"{f['method']} at {f['context']}: {f['error']}" for f in failures))


DEFAULT_CONTEXT = {"cuda": 4096, "cpu": 1024}


@app.command()
def plan(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="A .gguf file, model directory or hub id (only the config is read)."),
    memory: str = typer.Option(..., "--memory", help="Memory budget: 80GB, 24GiB, ..."),
    context: str = typer.Option("32k", "--context", "-c", help="Context per sequence: 4096, 32k, ..."),
    caches: list[str] = typer.Option([], "--cache", help="Cache method spec (repeatable; default: every method)."),
    batch: int = typer.Option(1, "--batch", "-b", min=1, help="Sequences held together."),
    dtype: str = typer.Option("bf16", "--dtype", help="Dtype of weights and residual windows."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the plan as JSON to this file."),
    bandwidth: Optional[float] = typer.Option(
        None, "--bandwidth", min=0.001, help="Device copy bandwidth in GB/s (with --matmul: decode floors)."),
    matmul: Optional[float] = typer.Option(
        None, "--matmul", min=0.001, help="Device matmul rate in TFLOP/s in --dtype (with --bandwidth)."),
    wide: bool = WideOpt,
    threads: Optional[int] = ThreadsOpt,
    plot_path: Optional[Path] = typer.Option(
        None, "--plot", help="Draw each method's cache memory against context to this new PNG file."),
    preset: Optional[str] = PresetOpt,
) -> None:
    """How much each cache method stores per token, and the largest context and batch that fit in memory."""
    from .bench import parse_context
    from .config import torch_dtype
    from .formats import open_checkpoint
    from .formatting import plan_table
    from .plan import parse_memory
    from .plan import plan as make_plan
    from .presets import preset_config
    from .roofline import Peaks

    if model is not None and preset is not None:
        raise XQInferError("give --model or --preset, not both")
    if threads is not None:
        set_threads(threads)  # nothing here computes much, but the option means the same on every command
    specs = parse_specs(caches or benchmarked_specs())
    check_writable(json_path)
    check_plot(plot_path)
    config = open_checkpoint(model).config if model else preset_config(preset or "llama-3.1-8b")
    name = model or preset or "llama-3.1-8b"
    budget, tokens = parse_memory(memory), parse_context(context)
    if (bandwidth is None) != (matmul is None):
        raise XQInferError("decode floors need both --bandwidth (GB/s) and --matmul (TFLOP/s)")
    rates_dtype = str(torch_dtype(dtype)).removeprefix("torch.")
    peaks = Peaks(bandwidth * 1e9, matmul * 1e12, rates_dtype) if bandwidth is not None else None
    rows = make_plan(config, specs, memory=budget, context=tokens, batch=batch,
                     dtype=torch_dtype(dtype), peaks=peaks)
    width = table_width(wide)
    print_table(plan_table(rows, name, budget, tokens, batch, dtype, width), width)
    if json_path is not None:
        write_json(json_path, {"model": name, "memory_bytes": budget, "context": tokens, "batch": batch,
                               "dtype": dtype, "peaks": peaks.as_dict() if peaks else None,
                               "methods": [r.as_dict() for r in rows]})
    if plot_path is not None:
        from .plots import memory_plot

        memory_plot(config, specs, plot_path, memory=budget, batch=batch, dtype=torch_dtype(dtype), context=tokens,
                    title=f"{name} | {dtype} | budget {memory}")


def check_plot(path: Path | None) -> None:
    """--plot: matplotlib present and the file new and writable, checked before any work."""
    if path is None:
        return
    from .plots import check_plot_path, require_matplotlib

    require_matplotlib()
    check_plot_path(path)


eval_app = typer.Typer(no_args_is_help=True, help="Task evaluations of the cache methods (pass-key retrieval).")
app.add_typer(eval_app, name="eval")


@eval_app.command("passkey")
def eval_passkey(
    model: Optional[str] = ModelArg,
    lengths: list[str] = typer.Option(
        [], "--length", "-l", help="Prompt length in tokens: 512, 1k, 2k (repeatable; default 512, 1k, 2k)."),
    depths: list[float] = typer.Option(
        [], "--depth", "-d", help="Where the key sits in the filler, 0 to 1 (repeatable; default 0.1, 0.5, 0.9)."),
    trials: int = typer.Option(4, "--trials", "-t", help="Prompts (each with its own key) per length and depth."),
    caches: list[str] = typer.Option(
        [], "--cache", help="Cache method spec (repeatable); fp16 always runs as the baseline."),
    seed: int = typer.Option(0, "--seed", help="Seed of the keys: the same seed, the same prompts."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    preset: Optional[str] = PresetOpt,
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    wide: bool = WideOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Pass-key retrieval: can each method find a 5-digit key hidden in long filler text?"""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .bench import parse_context
    from .formatting import passkey_table
    from .passkey import DEFAULT_DEPTHS, DEFAULT_LENGTHS, check_settings, passkey

    length_values = [parse_context(text, "--length") for text in lengths] or list(DEFAULT_LENGTHS)
    depth_values = depths or list(DEFAULT_DEPTHS)
    check_settings(length_values, depth_values, trials, seed)
    specs = parse_specs(caches)
    check_writable(json_path)
    llm = load_llm(model, preset, dtype, device, threads)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("pass key", total=None)
        report = passkey(llm, specs, lengths=length_values, depths=depth_values, trials=trials, seed=seed,
                         progress=lambda done, total: bar.update(task, completed=done, total=total))
    if not llm.tokenizer.has_chat_template:
        err.print("[yellow]the model has no chat template: the prompts went through a plain transcript[/yellow]")
    if report.interrupted:
        err.print(f"[yellow]interrupted: the table covers the {len(report.prompts)} of {report.prompts_total} "
                  f"prompts every method answered[/yellow]")
    width = table_width(wide)
    print_table(passkey_table(report, llm.dtype, width), width)
    if json_path is not None:
        write_json(json_path, report.as_dict())
    if report.interrupted:
        sys.exit(130)


def table_width(wide: bool) -> int | None:
    """Columns a table may take: none with --wide; else $COLUMNS, the terminal's width, or 80 in a pipe (where the
    terminal a reader ends up in is unknown)."""
    if wide:
        return None
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return out.width if out.is_terminal else 80


def print_table(table, width: int | None) -> None:
    from .formatting import natural_width

    # Its own console: `out` would squeeze a --wide table to the terminal (and wraps nothing in a pipe).
    Console(highlight=False, width=width or natural_width(table)).print(table)


def json_temporary(path: Path) -> Path:
    """Where write_json writes before renaming: beside the destination, so the rename stays on one file system."""
    return path.with_name(f".{path.name}.tmp")


def check_writable(path: Path | None) -> None:
    """Refuses a --json destination that cannot be written, before the run rather than after it.

    Creates (and removes) the temporary file write_json will use, which tests the folder as the write will; the
    destination itself is neither created nor truncated until the results exist.
    """
    if path is None:
        return
    if path.is_dir():
        raise XQInferError(f"cannot write {path}: it is a directory")
    temporary = json_temporary(path)
    try:
        temporary.open("x").close()
    except FileExistsError:
        pass  # left by an interrupted run: write_json replaces it
    except OSError as exc:
        raise XQInferError(f"cannot write {path}: {exc.strerror or exc}") from None
    else:
        temporary.unlink()


def write_json(path: Path, data: dict) -> None:
    """Writes through a temporary file, so a failure never leaves a truncated file where an old one was."""
    temporary = json_temporary(path)
    try:
        temporary.write_text(json.dumps(finite(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise XQInferError(f"cannot write {path}: {exc.strerror}") from None


def finite(value):
    """NaN and infinities (a figure with nothing to average yet) become null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value


def fail(message: object, code: int = 1) -> NoReturn:
    # escape(): a message quotes user text (paths, specs) that rich must not read as markup.
    err.print(f"[red]error:[/red] {escape(one_line(message))}", soft_wrap=True)
    sys.exit(code)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the CLI: xqinfer's own warnings as one line, without the source location."""
    if issubclass(category, XQInferWarning):
        err.print(f"[yellow]warning:[/yellow] {escape(one_line(message))}", soft_wrap=True)
    else:
        default_showwarning(message, category, filename, lineno, file, line)


default_showwarning = warnings.showwarning


def quiet_stdout() -> None:
    """Points stdout at /dev/null: what it still buffers cannot be written, and Python would report that at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    warnings.showwarning = show_warning
    try:
        code = app(standalone_mode=False)
    except XQInferError as exc:
        fail(exc)
    except NoArgsIsHelpError as exc:
        # `xqinfer` alone: typer has printed the help (rich) or returns it as the message (plain click).
        if exc.format_message().strip():
            print(exc.format_message())
        sys.exit(exc.exit_code)
    except click_exceptions.UsageError as exc:
        # typer would draw a multi-line box; one line, with where to look, is the rule here.
        where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        fail(f"{exc.format_message()}{where}", exc.exit_code)
    except click_exceptions.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except typer.Abort:
        fail("aborted")
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if is_out_of_memory(exc):
            fail("out of memory: try a shorter context, a compressed --cache, a smaller --dtype, or another device")
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            quiet_stdout()
            where = f" writing {exc.filename}" if exc.filename else ""
            fail(f"no space left on the disk{where}: free some space, or write elsewhere")
        if os.environ.get("XQINFER_DEBUG"):
            raise
        # A bug, not the user's fault: still one line, with the way to the traceback.
        fail(f"internal error: {type(exc).__name__}: {exc} (XQINFER_DEBUG=1 shows the traceback; please report it)")
    # standalone_mode=False returns the exit code of an Exit (--help, Ctrl-C inside typer) or the command's None.
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
