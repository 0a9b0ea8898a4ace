"""The chat REPL: streaming replies over a Session whose cache persists across turns."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from rich.console import Console

from . import api
from .errors import XQInferError
from .formatting import stats_line
from .sampling import SamplingParams

DEFAULT_CHAT_CONTEXT = 4096
HELP = """commands:
  /help              this list
  /reset             forget the conversation (keeps the system prompt) and empty the cache
  /set KEY VALUE     change a setting: temperature, top_p, top_k, min_p, repetition_penalty, seed, max_tokens
  /stats             speed and memory of the last reply, and what the cache holds
  /save FILE         write the conversation as JSON (never overwrites a file)
  /exit              leave (Ctrl-D too); Ctrl-C stops a reply and stays in the chat"""


class ChatREPL:
    def __init__(
        self,
        llm: api.LLM,
        out: Console,
        err: Console,
        *,
        cache: str,
        ctx: int | None,
        system: str | None,
        sampling: SamplingParams,
        max_tokens: int,
    ) -> None:
        self.llm = llm
        self.out = out
        self.err = err
        capacity = ctx or min(llm.config.max_position_embeddings, DEFAULT_CHAT_CONTEXT)
        self.session = api.Session(llm, cache, capacity=capacity, system=system)
        self.sampling = sampling
        self.max_tokens = max_tokens

    def run(self) -> None:
        if not self.llm.tokenizer.has_chat_template:
            self.err.print("[yellow]the model has no chat template: using a plain transcript[/yellow]")
        self.err.print(f"[dim]chatting with {self.llm.name} ({self.session.engine.spec} cache, "
                       f"{self.session.engine.capacity} tokens). /help for commands, Ctrl-D to leave.[/dim]")
        while True:
            try:
                line = self.out.input("[bold green]>>> [/bold green]")
            except EOFError:
                self.out.print()
                return
            except KeyboardInterrupt:
                self.out.print("\n[dim](Ctrl-D or /exit to leave)[/dim]")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.reply(line)

    def reply(self, text: str) -> None:
        try:
            for chunk in self.session.chat(text, max_tokens=self.max_tokens, sampling=self.sampling):
                self.out.print(chunk, end="", markup=False, highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            self.out.print("\n[dim][reply interrupted][/dim]", end="")
        except XQInferError as exc:
            # A full context ends this reply, not the chat: the user can /reset and go on.
            self.session.messages.pop()
            self.out.print()
            self.err.print(f"[red]error:[/red] {exc}; /reset starts over")
            return
        self.out.print()
        self.err.print(f"[dim]{stats_summary(self.session)}[/dim]")

    def command(self, line: str) -> bool:
        """Runs a /command; returns False when the chat should end."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            self.out.print(HELP, markup=False)
        elif name == "/reset":
            self.session.reset()
            self.out.print("[dim]conversation and cache cleared[/dim]")
        elif name == "/stats":
            self.out.print(stats_summary(self.session), markup=False)
        elif name == "/set":
            self.set_option(rest)
        elif name == "/save":
            self.save(rest)
        else:
            self.err.print(f"unknown command {name}; /help lists them")
        return True

    def set_option(self, text: str) -> None:
        key, _, value = text.partition(" ")
        key, value = key.strip(), value.strip()
        names = [f.name for f in fields(SamplingParams)] + ["max_tokens"]
        if key not in names or not value:
            self.err.print(f"usage: /set KEY VALUE with KEY one of {', '.join(names)}")
            return
        try:
            if key == "max_tokens":
                self.max_tokens = max(1, int(value))
            else:
                kind = int if key in ("top_k", "seed") else float
                self.sampling = self.sampling.updated(**{key: kind(value)})
        except ValueError as exc:
            self.err.print(f"cannot set {key} to {value!r}: {exc}")
            return
        self.out.print(f"[dim]{key} = {value}[/dim]")

    def save(self, name: str) -> None:
        if not name:
            self.err.print("usage: /save FILE")
            return
        path = Path(name).expanduser()
        if path.exists():
            self.err.print(f"{path} already exists: choose another name (xqinfer never overwrites a file)")
            return
        try:
            path.write_text(json.dumps({"model": self.llm.name, "messages": self.session.messages}, indent=2,
                                       ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            self.err.print(f"cannot write {path}: {exc.strerror}")
            return
        self.out.print(f"[dim]saved {len(self.session.messages)} messages to {path}[/dim]")


def stats_summary(session: api.Session) -> str:
    engine = session.engine
    held = f"cache holds {engine.length}/{engine.capacity} tokens"
    if session.last is None:
        return held
    reused = session.last.stats.reused_tokens
    return f"{stats_line(session.last)} | {held}, {reused} reused from earlier turns"
