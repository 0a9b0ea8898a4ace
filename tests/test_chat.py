"""`xqinfer chat`: the REPL driven through a pipe and through a pseudo-terminal (turns, /commands, Ctrl-C during a
reply, Ctrl-D), and the Session API under it, whose cache reuse between turns must give what a fresh prefill gives.

stories260K has no chat template, so the REPL uses a plain transcript and warns about it once: that is expected.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

import xqinfer
from xqinfer.api import Session
from xqinfer.chat import ChatREPL
from xqinfer.engine import Engine
from xqinfer.errors import ContextError
from xqinfer.sampling import SamplingParams

from conftest import SHARED

STORIES = SHARED / "models" / "stories260K"
TURNS = ("Once upon a time", "The little dog")
MAX_TOKENS = 20
GREEDY = SamplingParams(temperature=0)
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]")
# [\s\S]: on a terminal the stats line breaks at its separators to the terminal's width.
STATS = re.compile(r"generated (\d+) tok[\s\S]*?cache holds (\d+)/(\d+) tokens, (\d+) reused from earlier turns")


def need_stories() -> Path:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"shared model {STORIES} is absent (tests expect ../shared beside the repository)")
    return STORIES


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XQINFER_DEBUG", None)
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", "TERM": "xterm"})
    return env


def clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


@pytest.fixture(scope="module")
def stories():
    return xqinfer.load(need_stories())


@pytest.fixture(scope="module")
def expected(stories):
    """What the REPL must show for TURNS: the Session API's greedy replies and stats, as the REPL sets it up."""
    session = Session(stories, "fp16", capacity=512)
    replies, stats = [], []
    for turn in TURNS:
        replies.append("".join(session.chat(turn, max_tokens=MAX_TOKENS, sampling=GREEDY)))
        stats.append(session.last.stats)
    return {"replies": replies, "stats": stats, "held": session.engine.length, "messages": list(session.messages)}


# --- the Session API ------------------------------------------------------------------------------------------------


def run_turn(session: Session, text: str, max_tokens: int = MAX_TOKENS) -> str:
    return "".join(session.chat(text, max_tokens=max_tokens, sampling=GREEDY))


def test_session_reuses_the_cache_and_matches_a_fresh_prefill(stories, single_thread):
    first, second = TURNS
    cached = Session(stories, "fp16", capacity=512)
    reply1 = run_turn(cached, first)
    first_prompt = stories.tokenizer.encode_chat(cached.messages[:1], add_generation_prompt=True)
    assert cached.last.stats.reused_tokens == 0 and cached.last.stats.prompt_tokens == len(first_prompt)
    reply2 = run_turn(cached, second)
    full_prompt = stories.tokenizer.encode_chat(cached.messages[:3], add_generation_prompt=True)
    reused = cached.last.stats.reused_tokens
    # The second turn reused at least the whole first prompt and prefilled only the rest.
    assert len(first_prompt) <= reused < len(full_prompt)
    assert cached.last.stats.prompt_tokens == len(full_prompt) - reused

    # A fresh session given the same history prefills everything at once, and must continue identically.
    fresh = Session(stories, "fp16", capacity=512, messages=[dict(m) for m in cached.messages[:2]])
    fresh_reply2 = run_turn(fresh, second)
    assert fresh.last.stats.reused_tokens == 0 and fresh.last.stats.prompt_tokens == len(full_prompt)
    assert fresh_reply2 == reply2 and fresh.last.tokens == cached.last.tokens
    assert cached.messages == fresh.messages == [
        {"role": "user", "content": first},
        {"role": "assistant", "content": reply1},
        {"role": "user", "content": second},
        {"role": "assistant", "content": reply2},
    ]

    # Same state, same numbers: the logits after a third turn's prompt, from the reused cache and from scratch.
    third = stories.tokenizer.encode_chat(cached.messages + [{"role": "user", "content": "And then?"}])
    held = list(cached.engine.tokens)
    assert third[: len(held)] == held
    from_cache = cached.engine.prefill(third[len(held):])
    from_scratch = Engine(stories.model, "fp16", capacity=512).prefill(third)
    torch.testing.assert_close(from_cache, from_scratch, rtol=1e-4, atol=1e-4)


def test_session_reset_and_an_interrupted_reply(stories, expected, single_thread):
    session = Session(stories, "fp16", capacity=512)
    run_turn(session, TURNS[0])
    session.reset()
    assert session.messages == [] and session.engine.length == 0
    assert run_turn(session, TURNS[0]) == expected["replies"][0]  # as if nothing had come before
    assert session.last.stats.reused_tokens == 0

    # Ctrl-C in the REPL closes the reply's generator: the partial reply is kept as the assistant turn, and the next
    # turn still reuses the cache and still matches a fresh session fed the same history.
    session = Session(stories, "fp16", capacity=512)
    chunks = session.chat(TURNS[0], max_tokens=MAX_TOKENS, sampling=GREEDY)
    partial = next(chunks) + next(chunks)
    chunks.close()
    assert session.messages[-1] == {"role": "assistant", "content": partial}
    assert session.last.finish_reason == "interrupted"
    reply = run_turn(session, TURNS[1])
    assert session.last.stats.reused_tokens > 0
    fresh = Session(stories, "fp16", capacity=512, messages=[dict(m) for m in session.messages[:2]])
    assert run_turn(fresh, TURNS[1]) == reply


# --- the REPL in-process (fast paths: full context, markup in user text) -------------------------------------------


def repl(llm, monkeypatch, lines: list[str], **options) -> tuple[ChatREPL, str, str]:
    out, err = io.StringIO(), io.StringIO()
    settings = {"cache": "fp16", "ctx": None, "system": None, "sampling": GREEDY, "max_tokens": MAX_TOKENS, **options}
    chat = ChatREPL(llm, Console(file=out, width=60, soft_wrap=True), Console(file=err, width=60, soft_wrap=True),
                    **settings)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    chat.run()  # returns at the end of stdin (Ctrl-D)
    return chat, out.getvalue(), err.getvalue()


def test_a_full_context_cuts_the_reply_then_refuses_the_turn(stories, tmp_path, monkeypatch, single_thread):
    """With 64 positions and -n 200 the first reply fills the context (instead of being refused up front); the next
    turn cannot fit, is refused on one line and forgotten, and the chat goes on."""
    saved = tmp_path / "chat.json"
    chat, out, err = repl(stories, monkeypatch, [TURNS[0], TURNS[1], f"/save {saved}", "/stats"], ctx=64,
                          max_tokens=200)
    assert chat.session.engine.length == 64
    assert "the context is full" in err
    refusals = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(refusals) == 1 and "do not fit" in refusals[0] and "/reset" in refusals[0]
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == TURNS[0]
    shown = STATS.search(out)  # /stats still describes the first reply, not the refused turn
    assert shown and int(shown.group(1)) == chat.session.last.stats.generated_tokens > 0
    assert shown.group(2, 3) == ("64", "64")


def test_user_text_is_never_read_as_markup(stories, tmp_path, monkeypatch):
    """Brackets in commands, values and file names are printed as typed (rich markup used to crash the REPL)."""
    monkeypatch.chdir(tmp_path)
    chat, out, err = repl(stories, monkeypatch, ["/[/x]", "/set temperature [/x]", "/set top_k [b]",
                                                 "/save [red]chat.json", "/save [/nope]/chat.json"])
    assert "unknown command /[/x]" in err
    assert "cannot set temperature to '[/x]'" in err and "cannot set top_k to '[b]'" in err
    assert "saved 0 messages to [red]chat.json" in out and (tmp_path / "[red]chat.json").is_file()
    assert "cannot write [/nope]/chat.json" in err


def test_set_changes_settings_and_rejects_bad_values(stories, monkeypatch):
    chat, out, err = repl(stories, monkeypatch, ["/set temperature 0.5", "/set max_tokens 7", "/set top_p 0",
                                                 "/set seed x", "/set colour red", "/set temperature"])
    assert chat.sampling.temperature == 0.5 and chat.max_tokens == 7
    assert chat.sampling.top_p == GREEDY.top_p and chat.sampling.seed == GREEDY.seed
    assert "temperature = 0.5" in out and "max_tokens = 7" in out
    assert "cannot set top_p" in err and "cannot set seed" in err
    assert err.count("usage: /set KEY VALUE") == 2


def test_a_bad_set_value_is_an_error_and_the_chat_goes_on(stories, monkeypatch):
    # A seed beyond 64 bits used to pass /set and then end the chat with an internal error at the next reply.
    chat, out, err = repl(stories, monkeypatch, ["/set seed 99999999999999999999999", "/set seed -1",
                                                 "/set max_tokens 0", "/set max_tokens -3", "Once upon a time"])
    assert chat.sampling.seed == GREEDY.seed and chat.max_tokens == MAX_TOKENS
    assert err.count("cannot set seed") == 2 and "seed must be in 0..18446744073709551615" in err
    assert err.count("cannot set max_tokens") == 2 and "max_tokens must be at least 1" in err
    assert [m["role"] for m in chat.session.messages] == ["user", "assistant"]  # the turn after them ran


@pytest.mark.parametrize("capacity, fragment", [
    (0, "capacity must be at least 1 token, got 0"),
    (-5, "capacity must be at least 1 token, got -5"),
    (10**6, "a capacity of 1000000 tokens is beyond the model's 512 positions"),
    (2.5, "capacity must be a whole number of tokens"),
])
def test_session_refuses_a_capacity_it_cannot_give(stories, capacity, fragment):
    with pytest.raises(ContextError) as info:
        Session(stories, "fp16", capacity=capacity)
    assert fragment in str(info.value)


def test_undecodable_input_is_ignored(stories, monkeypatch):
    # stdin keeps undecodable bytes as surrogates (surrogateescape): the tokenizer cannot take them.
    chat, out, err = repl(stories, monkeypatch, [b"caf\xe9".decode("utf-8", "surrogateescape"), "/stats"])
    assert "not UTF-8" in err and chat.session.messages == []


# --- the REPL through a pipe ----------------------------------------------------------------------------------------


def test_chat_through_stdin(expected, tmp_path):
    model = need_stories()
    saved, existing, after_exit = tmp_path / "chat.json", tmp_path / "keep.json", tmp_path / "after-exit.json"
    existing.write_bytes(b"the user's own file\n")
    script = [
        TURNS[0], TURNS[1], "/stats", "/set temperature 0.5", "/set temperature -1", "/help",
        f"/save {saved}", f"/save {existing}", "/reset", "/stats", "/bogus", "/exit", f"/save {after_exit}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "xqinfer", "chat", model, "--temperature", "0", "-n", str(MAX_TOKENS)],
        input="\n".join(script) + "\n", capture_output=True, text=True, timeout=120, env=child_env(),
    )
    out, err = clean(result.stdout), clean(result.stderr)
    assert result.returncode == 0, err
    assert "Traceback" not in out + err
    assert "no chat template" in err  # stories260K: plain transcript, announced once
    replies = expected["replies"]
    assert out.index(replies[0]) < out.index(replies[1])  # both greedy replies, as the API gives them, in order

    # One stats line per reply on stderr, then /stats on stdout: the second turn reused the first one's cache.
    turn_stats = [m.groups() for m in STATS.finditer(err)]
    assert [int(s[3]) for s in turn_stats] == [0, expected["stats"][1].reused_tokens]
    assert expected["stats"][1].reused_tokens > 0
    shown = [m.groups() for m in STATS.finditer(out)]
    assert shown[0] == turn_stats[1] and int(shown[0][1]) == expected["held"]
    assert "cache holds 0/512 tokens" in out  # /stats after /reset

    assert "temperature = 0.5" in out and "cannot set temperature" in err
    help_lines = [line for line in out.splitlines() if line.strip().startswith("/")]
    assert {line.split()[0] for line in help_lines} >= {"/help", "/reset", "/set", "/stats", "/save", "/exit"}
    assert any("Ctrl-C stops a reply" in line for line in help_lines)  # one line each, not wrapped

    assert json.loads(saved.read_text(encoding="utf-8"))["messages"] == expected["messages"]
    assert existing.read_bytes() == b"the user's own file\n"  # /save never overwrites
    assert "already exists" in err and "unknown command /bogus" in err
    assert not after_exit.exists()  # /exit left before reading it


# --- the REPL in a terminal -----------------------------------------------------------------------------------------

# Makes the pty this new session's controlling terminal, so that Ctrl-C typed there sends SIGINT, then runs the CLI.
BOOT = (
    "import fcntl, runpy, sys, termios\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "sys.argv[0] = 'xqinfer'\n"
    "runpy.run_module('xqinfer', run_name='__main__')\n"
)


class Terminal:
    """`xqinfer ARGS` on a pseudo-terminal: write keystrokes, wait for patterns in the (ANSI-stripped) screen text."""

    def __init__(self, *args: object) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.process = subprocess.Popen(
            [sys.executable, "-c", BOOT, *map(str, args)],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=child_env(),
        )
        os.close(slave)
        self.master = master
        self.raw = b""
        self.pos = 0  # expect() searches after the previous match
        self.eof = False

    @property
    def text(self) -> str:
        return clean(self.raw.decode("utf-8", errors="replace"))

    def _read(self, timeout: float) -> bool:
        if self.eof:
            return False
        ready, _, _ = select.select([self.master], [], [], max(timeout, 0))
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every slave end is closed, the process is gone
            data = b""
        if not data:
            self.eof = True
            return False
        self.raw += data
        return True

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                shown = self.text[self.pos :][-3000:]
                pytest.fail(f"no {pattern!r} on the terminal; it shows (from the last match on):\n{shown}")

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(0.1)  # keep draining, so the process never blocks on a full terminal
        if self.process.poll() is None:
            pytest.fail(f"xqinfer chat did not exit; the terminal shows:\n{self.text[-3000:]}")
        while self._read(0.1):
            pass
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def start(*args: object) -> Terminal:
        opened.append(Terminal(*args))
        return opened[-1]

    yield start
    for term in opened:
        term.close()


PROMPT = ">>> "


def test_chat_in_a_terminal(terminal, expected):
    term = terminal("chat", need_stories(), "--temperature", "0", "-n", str(MAX_TOKENS))
    term.expect("no chat template")
    term.expect(r"chatting with .*512 tokens")
    for turn, reply, stats in zip(TURNS, expected["replies"], expected["stats"]):
        term.expect(PROMPT)
        term.send(turn + "\r")
        term.expect(re.escape(turn) + r"\n")  # the terminal's echo of what was typed
        term.expect(re.escape(reply))
        match = term.expect(STATS.pattern)
        assert int(match.group(1)) == stats.generated_tokens and int(match.group(4)) == stats.reused_tokens
    assert expected["stats"][1].reused_tokens > 0

    term.expect(PROMPT)
    term.send("/stats\r")
    match = term.expect(STATS.pattern)
    assert int(match.group(2)) == expected["held"] and int(match.group(4)) == expected["stats"][1].reused_tokens
    term.expect(PROMPT)
    term.send("/help\r")
    term.expect(r"/save FILE +write the conversation as JSON \(never overwrites a file\)")
    term.expect(PROMPT)
    term.send("/reset\r")
    term.expect("conversation and cache cleared")
    term.expect(PROMPT)
    term.send("/stats\r")
    term.expect(r"cache holds 0/512 tokens")
    term.expect(PROMPT)
    term.send("\x04")  # Ctrl-D on an empty line: leave
    assert term.wait() == 0
    assert "Traceback" not in term.text


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(terminal):
    """A long reply from the random-weight preset (4096 positions make each step slow enough), Ctrl-C once the
    first text shows: the reply stops, the process lives on, takes commands, and leaves with status 0."""
    term = terminal("chat", "--preset", "llama-tiny", "-n", "3000", "--ctx", "4096", "--temperature", "0")
    term.expect(r"chatting with llama-tiny")
    term.expect(PROMPT)
    term.send("hello\r")
    term.expect(r"hello\n")
    term.expect(r"\S")  # the reply has begun
    term.send("\x03")
    term.expect(r"\[reply interrupted\]", timeout=30)
    match = term.expect(r"generated (\d+) tok")
    assert 0 < int(match.group(1)) < 3000
    assert term.process.poll() is None
    term.expect(PROMPT)
    term.send("\x03")  # Ctrl-C at the prompt: a hint, not an exit
    term.expect(r"Ctrl-D or /exit to leave")
    term.expect(PROMPT)
    term.send("/stats\r")
    match = term.expect(STATS.pattern)
    assert int(match.group(1)) < 3000 and int(match.group(3)) == 4096
    term.expect(PROMPT)
    term.send("/exit\r")
    assert term.wait() == 0
    assert "Traceback" not in term.text
