"""Where the chat reads its messages: prompt_toolkit on a terminal, plain lines through a pipe.

Both read the same messages: one line, or a block that starts with \"\"\" and ends at a line ending with \"\"\" (as in
ollama and mlx-lm). On a terminal a bracketed paste is one message whatever newlines it holds, Enter inside an open
block starts a new line, and Esc-Enter (Alt-Enter) sends the buffer as it stands.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Protocol

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from rich.console import Console

from .chat_file import is_text

BLOCK = '"""'
PROMPT = ">>> "
CONTINUATION = "... "


class MessageReader(Protocol):
    def read(self) -> str:
        """The next message as typed (a block still holds its quotes); raises EOFError at the end, KeyboardInterrupt
        on Ctrl-C."""
        ...


def open_reader(out: Console, warn: Callable[[str], None]) -> MessageReader:
    """prompt_toolkit when stdin and stdout are a terminal, else lines from stdin as they come."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        return TerminalReader(warn)
    return PipeReader(out)


def is_open_block(text: str) -> bool:
    """Whether text starts a \"\"\" block that no closing \"\"\" has ended yet."""
    body = text.lstrip()
    return body.startswith(BLOCK) and not body[len(BLOCK):].rstrip().endswith(BLOCK)


def unwrap_block(text: str) -> str:
    """The message a block holds, without its quotes; any other text as it is."""
    body = text.strip()
    if not body.startswith(BLOCK):
        return text
    body = body[len(BLOCK):]
    return body[: -len(BLOCK)] if body.rstrip().endswith(BLOCK) else body


class PipeReader:
    def __init__(self, out: Console) -> None:
        self.out = out

    def read(self) -> str:
        text = self.out.input(f"[bold green]{PROMPT}[/bold green]")
        while is_open_block(text):
            try:
                text += "\n" + self.out.input(CONTINUATION)
            except EOFError:  # the end of input ends the block: what it holds is still sent
                break
        return text


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "xqinfer" / "chat_history"


class KeptHistory(FileHistory):
    """The history file (private to the user, as a shell's is); when it cannot be written, one warning and this
    session's history in memory only."""

    def __init__(self, path: Path, warn: Callable[[str], None]) -> None:
        super().__init__(str(path))
        self.warn = warn
        self.writable = True
        self.unsaid: str | None = None  # a failure while a prompt is on screen, said once the prompt is done
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Readable and appendable: found out now, before the first message is typed.
            os.close(os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600))
        except OSError as exc:
            self.writable = False
            warn(self.failure(exc))

    def failure(self, exc: OSError) -> str:
        return f"cannot keep the chat history in {self.filename}: {exc.strerror or exc}; it lasts for this session only"

    def load_history_strings(self) -> Iterable[str]:
        return super().load_history_strings() if self.writable else []

    def store_string(self, string: str) -> None:
        if not self.writable or not is_text(string):  # undecodable input, which the chat ignores too
            return
        try:
            super().store_string(string)
        except OSError as exc:
            self.writable = False
            self.unsaid = self.failure(exc)

    def say_failure(self) -> None:
        if self.unsaid is not None:
            self.warn(self.unsaid)
            self.unsaid = None


class TerminalReader:
    def __init__(self, warn: Callable[[str], None]) -> None:
        bindings = KeyBindings()

        @bindings.add("enter")
        def _enter(event: KeyPressEvent) -> None:
            buffer = event.current_buffer
            if is_open_block(buffer.text):
                buffer.newline(copy_margin=False)
            else:
                buffer.validate_and_handle()

        self.history = KeptHistory(history_path(), warn)
        # multiline: a pasted newline stays in the message; the Enter binding above decides where a message ends.
        self.session: PromptSession[str] = PromptSession(
            history=self.history, multiline=True, key_bindings=bindings, prompt_continuation=CONTINUATION)

    def read(self) -> str:
        try:
            return self.session.prompt([("bold ansigreen", PROMPT)])
        finally:
            self.history.say_failure()
