"""The chat REPL: streaming replies over a Session whose cache persists across turns."""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from . import api
from .cache import CacheSpec, parse_spec
from .chat_file import SavedChat, is_text, read_saved_chat
from .chat_input import open_reader, unwrap_block
from .errors import XQInferError, one_line
from .files import write_new_file
from .formatting import fit_line, stats_line, terminal_width
from .sampling import SamplingParams

DEFAULT_CHAT_CONTEXT = 4096
HELP = '''commands:
  /help              this list
  /reset             forget the conversation (keeps the system prompt) and empty the cache
  /set               list the settings; /set KEY VALUE changes one (KEY as the flags spell it too: temp, top-p, -n)
  /stats             speed and memory of the last reply, and what the cache holds
  /save FILE         write the conversation and its settings as JSON (never overwrites a file)
  /load FILE         resume a chat that /save wrote: its conversation, sampling settings and max_tokens
  /exit              leave (Ctrl-D too); Ctrl-C stops a reply and stays in the chat
input:
  """                begins a message of several lines; a line ending with """ ends it
  Esc-Enter          (or Alt-Enter) sends a message of several lines as it stands; a paste is always one message
  Up, Down           earlier messages, kept from one chat to the next in the history file'''
SETTINGS = [item.name for item in fields(SamplingParams)] + ["max_tokens"]
# The other names chat's command-line flags give the settings; dashes and underscores are alike in every key.
SETTING_ALIASES = {"temp": "temperature", "repeat_penalty": "repetition_penalty", "n": "max_tokens"}


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
        reader = open_reader(self.out, lambda text: self.err.print(f"[yellow]warning:[/yellow] {escape(text)}"))
        while True:
            try:
                text = reader.read()
            except EOFError:
                self.out.print()
                return
            except KeyboardInterrupt:
                self.out.print("\n[dim](Ctrl-D or /exit to leave)[/dim]")
                continue
            except UnicodeDecodeError:
                self.err.print("that line is not UTF-8 text: ignored")
                continue
            if not is_text(text):  # undecodable bytes that stdin kept as surrogates
                self.err.print("that line is not UTF-8 text: ignored")
                continue
            text = text.strip()
            if text.startswith("/") and "\n" not in text:  # a pasted text of several lines is a message
                if not self.command(text):
                    return
                continue
            text = unwrap_block(text).strip()
            if text:
                self.reply(text)

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
        # The engine needs room for the prompt and every generated token but the last (which is never fed back).
        room = engine.limit - len(prompt) + 1
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
        elif name == "/load":
            self.load(rest)
        else:
            self.err.print(f"unknown command {escape(name)}; /help lists them")
        return True

    def set_option(self, text: str) -> None:
        if not text:
            for key, value in {**asdict(self.sampling), "max_tokens": self.max_tokens}.items():
                shown = "random (a new seed each reply)" if key == "seed" and value is None else value
                self.out.print(f"  {key:<20} {shown}", markup=False)
            return
        given, _, value = text.partition(" ")
        value = value.strip()
        spelled = given.lstrip("-").replace("-", "_")
        key = SETTING_ALIASES.get(spelled, spelled)
        if key not in SETTINGS:
            others = ", ".join(alias.replace("_", "-") for alias in SETTING_ALIASES)
            self.err.print(f"unknown setting {given!r}; the keys are {', '.join(SETTINGS)}, and {others} as the flags "
                           f"spell them (- and _ alike)", markup=False)
            return
        if not value:
            self.err.print(f"usage: /set {key} VALUE (/set alone lists the settings)")
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
        engine = self.session.engine
        saved = SavedChat(model=self.llm.name, cache=str(engine.spec), context=engine.capacity,
                          max_tokens=self.max_tokens, sampling=asdict(self.sampling), messages=self.session.messages)
        try:
            write_new_file(path, lambda handle: handle.write(saved.to_json().encode("utf-8")))
        except XQInferError as exc:
            self.err.print(escape(one_line(exc)))
            return
        self.out.print(f"[dim]saved {len(self.session.messages)} messages to {escape(str(path))}[/dim]")

    def load(self, name: str) -> None:
        """Resumes a saved chat. A bad file, or a conversation the cache cannot hold, leaves the current chat as it
        is; a different model or cache is warned about, and the running one kept."""
        if not name:
            self.err.print("usage: /load FILE")
            return
        path = Path(name).expanduser()
        try:
            saved = read_saved_chat(path)
        except XQInferError as exc:
            self.err.print(escape(one_line(exc)))
            return
        refilled = True
        try:
            self.session.resume(saved.messages)
        except XQInferError as exc:
            self.err.print(f"cannot load {escape(str(path))}: {escape(one_line(exc))}; the current chat goes on")
            return
        except KeyboardInterrupt:
            refilled = False
        self.sampling = replace(self.sampling, **(saved.sampling or {}))
        self.max_tokens = saved.max_tokens or self.max_tokens
        engine = self.session.engine
        others = []  # what the file ran with, where this chat runs something else
        if saved.model is not None and saved.model != self.llm.name:
            others.append(("model", saved.model, self.llm.name))
        if saved.cache is not None and not same_cache(saved.cache, engine.spec):
            others.append(("cache", saved.cache, str(engine.spec)))
        if others:
            theirs = " and ".join(f"{what} {escape(value)}" for what, value, _ in others)
            ours = " and ".join(f"{what} {escape(value)}" for what, _, value in others)
            self.err.print(f"[yellow]warning:[/yellow] {escape(str(path))} was saved with {theirs}; "
                           f"this chat keeps {ours}")
        held = f"{engine.length}/{engine.capacity} tokens in the cache" if refilled else \
            "refilling the cache interrupted: the next turn prefills it all"
        self.out.print(f"[dim]loaded {len(saved.messages)} messages from {escape(str(path))} ({held})[/dim]")


def same_cache(saved: str, running: CacheSpec) -> bool:
    try:  # parsed, so that a spec that leaves the defaults out is the same cache as one written in full
        return parse_spec(saved) == running
    except XQInferError:
        return False


def stats_summary(session: api.Session) -> str:
    engine = session.engine
    held = f"cache holds {engine.length}/{engine.capacity} tokens"
    if session.last is None:
        return held
    reused = session.last.stats.reused_tokens
    return f"{stats_line(session.last)} | {held}, {reused} reused from earlier turns"
