"""The chat REPL: streaming replies over a Session whose cache persists across turns."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from . import api
from .errors import XQInferError
from .formatting import fit_line, stats_line, terminal_width
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
        cache = self.session.engine.spec.display_name(self.llm.dtype)
        self.err.print(f"[dim]chatting with {escape(self.llm.name)} ({escape(cache)} cache, "
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
            except UnicodeDecodeError:
                self.err.print("that line is not UTF-8 text: ignored")
                continue
            if not is_text(line):  # undecodable bytes that stdin kept as surrogates
                self.err.print("that line is not UTF-8 text: ignored")
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
        before, previous = len(self.session.messages), self.session.last
        budget = self.max_tokens
        try:
            budget = self.reply_budget(text)
            for chunk in self.session.chat(text, max_tokens=budget, sampling=self.sampling):
                self.out.print(chunk, end="", markup=False, highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            self.out.print("\n[dim]\\[reply interrupted][/dim]", end="")
        except XQInferError as exc:
            # A full context ends this turn, not the chat: the turn is forgotten (Session.chat recorded the user's
            # message and an empty reply), and the user can /reset and go on.
            del self.session.messages[before:]
            self.session.last = previous  # /stats keeps showing the last reply, not the refused one's zeros
            self.out.print()
            self.err.print(f"[red]error:[/red] {escape(one_line(exc))}; /reset starts over")
            return
        self.out.print()
        last = self.session.last
        if last is not None and budget < self.max_tokens and last.finish_reason == "length":
            self.err.print("[yellow]the context is full: /reset starts over[/yellow]")
        self.err.print(f"[dim]{escape(fit_line(stats_summary(self.session), terminal_width(self.err)))}[/dim]")

    def reply_budget(self, text: str) -> int:
        """max_tokens, cut to the room the context has left: a long conversation's last reply ends at the limit
        instead of being refused outright."""
        engine = self.session.engine
        messages = self.session.messages + [{"role": "user", "content": text}]
        prompt = self.llm.tokenizer.encode_chat(messages, add_generation_prompt=True)
        limit = engine.max_positions if engine.cache.is_ring else engine.capacity
        # The engine needs room for the prompt and every generated token but the last (which is never fed back).
        room = limit - len(prompt) + 1
        # With no room at all, asking for one token lets the session raise its "does not fit" error.
        return max(1, min(self.max_tokens, room))

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
            self.out.print(fit_line(stats_summary(self.session), terminal_width(self.out)), markup=False)
        elif name == "/set":
            self.set_option(rest)
        elif name == "/save":
            self.save(rest)
        else:
            self.err.print(f"unknown command {escape(name)}; /help lists them")
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
                tokens = int(value)
                if tokens < 1:
                    raise ValueError("max_tokens must be at least 1")
                self.max_tokens = tokens
            else:
                kind = int if key in ("top_k", "seed") else float
                self.sampling = self.sampling.updated(**{key: kind(value)})
        except ValueError as exc:
            self.err.print(f"cannot set {key} to {escape(repr(value))}: {escape(one_line(exc))}")
            return
        self.out.print(f"[dim]{key} = {escape(value)}[/dim]")

    def save(self, name: str) -> None:
        if not name:
            self.err.print("usage: /save FILE")
            return
        path = Path(name).expanduser()
        text = json.dumps({"model": self.llm.name, "messages": self.session.messages}, indent=2, ensure_ascii=False)
        try:
            # Mode "x" creates the file or fails: an existing file is never touched, even one made a moment ago.
            handle = path.open("x", encoding="utf-8")
        except FileExistsError:
            self.err.print(f"{escape(str(path))} already exists: choose another name (xqinfer never overwrites a file)")
            return
        except OSError as exc:
            self.err.print(f"cannot write {escape(str(path))}: {escape(exc.strerror or str(exc))}")
            return
        try:
            with handle:
                handle.write(text + "\n")
        except OSError as exc:
            path.unlink(missing_ok=True)  # the half-written file is the one just created here, never the user's
            self.err.print(f"cannot write {escape(str(path))}: {escape(exc.strerror or str(exc))}")
            return
        self.out.print(f"[dim]saved {len(self.session.messages)} messages to {escape(str(path))}[/dim]")


def is_text(line: str) -> bool:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def one_line(text: object) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def stats_summary(session: api.Session) -> str:
    engine = session.engine
    held = f"cache holds {engine.length}/{engine.capacity} tokens"
    if session.last is None:
        return held
    reused = session.last.stats.reused_tokens
    return f"{stats_line(session.last)} | {held}, {reused} reused from earlier turns"
