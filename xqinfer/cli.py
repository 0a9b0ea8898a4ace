"""The `xqinfer` command: argument parsing and printing over the Python API, nothing more."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console

from . import api
from .errors import XQInferError
from .formatting import stats_line
from .sampling import SamplingParams

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Long-context LLM inference with compressed (XQuant, KIVI, ...) caches.",
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False)

ModelArg = typer.Argument(None, help="Model directory or Hugging Face hub id (default: the embedded random-weight preset).")
PresetOpt = typer.Option(None, "--preset", help="Architecture preset from models/ with seeded random weights.")
DtypeOpt = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU).")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present).")
CacheOpt = typer.Option("fp16", "--cache", help="Cache method spec, e.g. fp16, xquant:bits=4.")


def sampling_from(
    llm: api.LLM,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    repeat_penalty: float | None,
    seed: int | None,
) -> SamplingParams:
    try:
        return llm.sampling.updated(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repeat_penalty, seed=seed
        )
    except ValueError as exc:
        raise XQInferError(str(exc)) from None


def load_llm(model: str | None, preset: str | None, dtype: str | None, device: str | None) -> api.LLM:
    if model is None and preset is None:
        err.print(f"[dim]no MODEL given: using the embedded preset {api.DEFAULT_PRESET} (random weights, so the text is noise)[/dim]")
    return api.load(model, preset=preset, dtype=dtype, device=device)


@app.command()
def generate(
    model: Optional[str] = ModelArg,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "-f", help="Read the prompt from a file."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp", help="0 = greedy (default: the model's generation_config)."),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    min_p: Optional[float] = typer.Option(None, "--min-p"),
    repeat_penalty: Optional[float] = typer.Option(None, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (implies --chat)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Use the chat template (default: when the model has one)."),
    cache: str = CacheOpt,
    preset: Optional[str] = PresetOpt,
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
) -> None:
    """Continue a prompt, streaming the text, then print speed and memory."""
    text = read_prompt(prompt, prompt_file)
    llm = load_llm(model, preset, dtype, device)
    if not llm.tokenizer.has_chat_template and (chat or (chat is None and system is not None)):
        err.print("[yellow]the model has no chat template: using a plain transcript[/yellow]")
    sampling = sampling_from(llm, temperature, top_p, top_k, min_p, repeat_penalty, seed)
    ids = api.build_prompt(llm, text, chat=chat, system=system)
    session = api.Session(llm, cache, capacity=len(ids) + max_tokens)
    chunks = session.stream(ids, max_tokens=max_tokens, sampling=sampling, stop=stop)
    if as_json:
        for _ in chunks:
            pass
        print(json.dumps(session.last.as_dict()))
        return
    for chunk in chunks:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    err.print(f"[dim]{stats_line(session.last)}[/dim]")


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise XQInferError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            return prompt_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise XQInferError(f"prompt file {prompt_file} does not exist") from None
        except UnicodeDecodeError:
            raise XQInferError(f"prompt file {prompt_file} is not UTF-8 text") from None
    if prompt is None:
        raise XQInferError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    return prompt


@app.command()
def chat(
    model: Optional[str] = ModelArg,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Most tokens per reply."),
    ctx: Optional[int] = typer.Option(None, "--ctx", "-c", min=1, help="Context to allocate (default: min(model's, 4096))."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    min_p: Optional[float] = typer.Option(None, "--min-p"),
    repeat_penalty: Optional[float] = typer.Option(None, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    cache: str = CacheOpt,
    preset: Optional[str] = PresetOpt,
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Talk to a model; the cache is kept between turns, so each turn costs only its own tokens."""
    from .chat import ChatREPL

    llm = load_llm(model, preset, dtype, device)
    sampling = sampling_from(llm, temperature, top_p, top_k, min_p, repeat_penalty, seed)
    ChatREPL(llm, out, err, cache=cache, ctx=ctx, system=system, sampling=sampling, max_tokens=max_tokens).run()


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        app()
    except XQInferError as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(1)
    except (torch.OutOfMemoryError, MemoryError):
        err.print(
            "[red]error:[/red] out of memory: try a shorter context, a compressed --cache, a smaller --dtype, "
            "or another device",
            soft_wrap=True,
        )
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
