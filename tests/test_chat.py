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
from xqinfer.chat_input import KeptHistory
from xqinfer.engine import Engine
from xqinfer.errors import ContextError
from xqinfer.sampling import SamplingParams

from conftest import SHARED, default_sigint

STORIES = SHARED / "models" / "stories260K"
TURNS = ("Once upon a time", "The little dog")
MAX_TOKENS = 20
GREEDY = SamplingParams(temperature=0)
PROMPT = ">>> "
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]")
# A terminal narrower than the stats line gets it broken at a separator, so the two halves may be on two lines.
STATS = re.compile(r"generated (\d+) tok[^\n]*?\n?[^\n]*?"
                   r"cache holds (\d+)/(\d+) tokens, (\d+) reused from earlier turns")


def need_stories() -> Path:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"shared model {STORIES} is absent (tests expect ../shared beside the repository)")
    return STORIES


def child_env(home: Path | None = None) -> dict[str, str]:
    """The environment of an `xqinfer` child; with `home`, HOME and XDG_STATE_HOME (the chat history) are in it."""
    env = dict(os.environ)
    env.pop("XQINFER_DEBUG", None)
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", "TERM": "xterm"})
    # prompt_toolkit asks a terminal where its cursor is and waits for the answer, which no test terminal gives.
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    if home is not None:
        env.update({"HOME": str(home), "XDG_STATE_HOME": str(home / "state")})
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
    assert session.messages[-1] == {"role": "assistant", "content": partial, "interrupted": True}
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
                                                 "/set seed x", "/set temperature"])
    assert chat.sampling.temperature == 0.5 and chat.max_tokens == 7
    assert chat.sampling.top_p == GREEDY.top_p and chat.sampling.seed == GREEDY.seed
    assert "temperature = 0.5" in out and "max_tokens = 7" in out
    assert "cannot set top_p" in err and "cannot set seed" in err
    assert "usage: /set temperature VALUE (/set alone lists the settings)" in err


def test_set_lists_the_settings_and_takes_the_flags_names(stories, monkeypatch):
    """The chat command's flags name the settings too (--temp, --top-p, --repeat-penalty, -n...); an unknown key
    gets one line with the keys there are, and /set alone lists every setting with its value."""
    script = ["/set temp 0.5", "/set top-p 0.9", "/set --top-k 40", "/set min-p 0.05", "/set repeat-penalty 1.1",
              "/set repeat_penalty 1.2", "/set -n 7", "/set max-tokens 9", "/set --seed 3", "/set colour red", "/set"]
    chat, out, err = repl(stories, monkeypatch, script)
    assert chat.sampling == SamplingParams(temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.2,
                                           seed=3)
    assert chat.max_tokens == 9
    assert "max_tokens = 7" in out and "repetition_penalty = 1.1" in out  # reported under the setting's own name
    refusal = [line for line in err.splitlines() if "colour" in line]
    assert refusal == ["unknown setting 'colour'; the keys are temperature, top_k, top_p, min_p, repetition_penalty, "
                       "seed, max_tokens, and temp, repeat-penalty, n as the flags spell them (- and _ alike)"]
    shown = [line.replace(PROMPT, "") for line in out.splitlines()]  # the prompts go to stdout too, before the lines
    listing = dict(line.split() for line in shown if line.startswith("  "))
    assert listing == {"temperature": "0.5", "top_k": "40", "top_p": "0.9", "min_p": "0.05",
                       "repetition_penalty": "1.2", "seed": "3", "max_tokens": "9"}


def test_set_lists_a_random_seed_as_such(stories, monkeypatch):
    chat, out, err = repl(stories, monkeypatch, ["/set"], sampling=SamplingParams())
    assert "  seed                 random (a new seed each reply)\n" in out and "error" not in err


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




def test_a_block_in_triple_quotes_is_one_message(stories, monkeypatch):
    """Through a pipe as on a terminal: \"\"\" begins a message of several lines, a line ending with \"\"\" ends it,
    and the end of input ends an open one (what it holds is still sent)."""
    script = ['"""', "first", 'second"""', '"""one line"""', '  """  ', "/stats is text here", "", '"""',
              '"""', "unclosed"]
    chat, out, err = repl(stories, monkeypatch, script, max_tokens=2)
    assert [m["content"] for m in chat.session.messages if m["role"] == "user"] == [
        "first\nsecond", "one line", "/stats is text here", "unclosed"]
    assert out.count("... ") == 2 + 3 + 2 and "cache holds" not in out  # a continuation prompt for each line


def test_history_file_is_private_and_a_later_failure_is_said_once(tmp_path):
    said: list[str] = []
    path = tmp_path / "state" / "xqinfer" / "chat_history"
    history = KeptHistory(path, said.append)
    assert path.is_file() and path.stat().st_mode & 0o777 == 0o600 and said == []
    history.append_string("one")
    assert list(KeptHistory(path, said.append).load_history_strings()) == ["one"]  # the next chat's history
    path.unlink()
    path.mkdir()  # the file cannot be appended to from now on
    for text in ("two", "three"):
        history.append_string(text)
        history.say_failure()
    assert said == [f"cannot keep the chat history in {path}: Is a directory; it lasts for this session only"]
    assert history.get_strings() == ["one", "two", "three"]  # kept in memory all the same

# --- /save and /load ------------------------------------------------------------------------------------------------


def test_save_writes_the_conversation_and_its_settings(stories, tmp_path, monkeypatch):
    saved = tmp_path / "chat.json"
    sampling = SamplingParams(temperature=0, top_k=5, seed=7)
    chat, out, err = repl(stories, monkeypatch, [TURNS[0], f"/save {saved}"], ctx=256, system="Be kind.",
                          sampling=sampling, max_tokens=12)
    assert json.loads(saved.read_text(encoding="utf-8")) == {
        "model": str(STORIES), "cache": "fp16", "context": 256, "max_tokens": 12,
        "sampling": {"temperature": 0, "top_k": 5, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "seed": 7},
        "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": TURNS[0]},
                     {"role": "assistant", "content": chat.session.messages[-1]["content"]}],
    }
    assert chat.session.messages[-1]["content"] and "interrupted" not in chat.session.messages[-1]


def test_load_resumes_a_saved_chat(stories, tmp_path, monkeypatch, single_thread):
    """A chat saved after one turn, loaded into a chat started with other settings, answers the next turn as the
    first chat did: the settings came back, and the cache was refilled (the turn reuses it)."""
    first, again, after = tmp_path / "first.json", tmp_path / "again.json", tmp_path / "after.json"
    settings = {"sampling": SamplingParams(temperature=0, top_k=5, seed=7), "max_tokens": 12, "system": "Be kind."}
    original, _, _ = repl(stories, monkeypatch, [TURNS[0], f"/save {first}", TURNS[1], f"/save {after}"], **settings)
    resumed, out, err = repl(stories, monkeypatch, [f"/load {first}", f"/save {again}", TURNS[1]],
                             sampling=SamplingParams(temperature=1.0, seed=1), max_tokens=30, system="Be rude.")
    assert again.read_text(encoding="utf-8") == first.read_text(encoding="utf-8")
    assert f"loaded 3 messages from {first}" in out and "warning" not in err
    assert resumed.sampling == settings["sampling"] and resumed.max_tokens == 12
    assert resumed.session.messages == original.session.messages
    assert resumed.session.last.stats.reused_tokens > 0
    assert resumed.session.last.tokens == original.session.last.tokens


def test_load_refuses_a_bad_file_in_one_line_and_the_chat_goes_on(stories, tmp_path, monkeypatch):
    def saved(name: str, content: object) -> Path:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        return path

    long_chat = [{"role": "user", "content": "Once upon a time " * 40}]
    cases = [
        (tmp_path / "missing.json", "missing.json does not exist"),
        (tmp_path, f"cannot read {tmp_path}: Is a directory"),
        (saved("latin1.json", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'), "is not UTF-8 text"),
        (saved("broken.json", b"{oops"), "is not JSON (Expecting property name enclosed in double quotes at line 1 "
                                         "column 2)"),
        (saved("list.json", []), "is not a chat saved by /save: it holds a JSON list, not an object"),
        (saved("none.json", {"model": "x"}), "'messages' must be a list of messages"),
        (saved("key.json", {"messages": [], "colour": 1}), "unknown key 'colour' (accepted: model, cache, context,"),
        (saved("role.json", {"messages": [{"role": "robot", "content": "hi"}]}),
         "message 1: role 'robot' is none of system, user, assistant"),
        (saved("content.json", {"messages": [{"role": "user", "content": 5}]}),
         "message 1: 'content' must be a string"),
        (saved("surrogate.json", {"messages": [{"role": "user", "content": "\ud800"}]}),
         "message 1: 'content' is not valid UTF-8 text"),
        (saved("system.json", {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]}),
         "message 2: a system prompt comes first only"),
        (saved("mark.json", {"messages": [{"role": "assistant", "content": "hi", "interrupted": "yes"}]}),
         "message 1: 'interrupted' must be true or false"),
        (saved("sampling.json", {"messages": [], "sampling": {"temperature": -1}}),
         "sampling: temperature must be >= 0"),
        (saved("setting.json", {"messages": [], "sampling": {"temp": 1}}), "unknown sampling setting 'temp'"),
        (saved("tokens.json", {"messages": [], "max_tokens": 0}), "'max_tokens' must be a whole number of at least 1"),
        (saved("long.json", {"messages": long_chat}), "and the context holds 64; the current chat goes on"),
    ]
    script = [TURNS[0]] + [f"/load {path}" for path, _ in cases] + [TURNS[1]]
    chat, out, err = repl(stories, monkeypatch, script, ctx=64, max_tokens=5)
    # After the banner's two lines, one line for each refused file, and the two turns' stats lines.
    lines = [line for line in err.splitlines()[2:] if "cache holds" not in line]
    assert len(lines) == len(cases)
    for (path, fragment), line in zip(cases, lines):
        assert line.startswith((str(path), f"cannot read {path}", f"cannot load {path}")) and fragment in line
    assert "loaded" not in out and "Traceback" not in err
    assert chat.sampling == GREEDY and chat.max_tokens == 5
    assert [m["content"] for m in chat.session.messages if m["role"] == "user"] == list(TURNS)
    assert chat.session.last.stats.reused_tokens > 0  # the cache the refused loads left alone


def test_load_warns_of_another_model_or_cache_and_keeps_the_running_one(stories, tmp_path, monkeypatch):
    other = tmp_path / "other.json"
    messages = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": " there was"}]
    other.write_text(json.dumps({"model": "llama-3.1-8b", "cache": "kivi:bits=2", "messages": messages}))
    old_style = tmp_path / "old.json"  # as /save wrote before it kept the settings
    old_style.write_text(json.dumps({"model": str(STORIES), "messages": messages}))
    chat, out, err = repl(stories, monkeypatch, [f"/load {other}", f"/load {old_style}", "/stats"])
    warnings = [line for line in err.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: {other} was saved with model llama-3.1-8b and cache kivi:bits=2; this chat keeps "
                        f"model {STORIES} and cache fp16"]
    assert out.count("loaded 2 messages") == 2 and chat.session.messages == messages
    assert str(chat.session.engine.spec) == "fp16" and chat.sampling == GREEDY and chat.max_tokens == MAX_TOKENS
    held = len(stories.tokenizer.encode_chat(messages, add_generation_prompt=False))
    assert f"cache holds {held}/512 tokens" in out

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

    def __init__(self, *args: object, env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.process = subprocess.Popen(
            [sys.executable, "-c", BOOT, *map(str, args)],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=env, preexec_fn=default_sigint,
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
        data = keys.encode()
        while data:  # in pieces, reading between them, so neither side blocks on a full terminal buffer
            _, writable, _ = select.select([], [self.master], [], 0.1)
            if writable:
                data = data[os.write(self.master, data[:1024]):]
            self._read(0)

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
def terminal(tmp_path):
    """Starts `xqinfer ARGS` on a terminal, its HOME and state dir under tmp_path (`env` replaces that setting)."""
    opened: list[Terminal] = []

    def start(*args: object, env: dict[str, str] | None = None) -> Terminal:
        opened.append(Terminal(*args, env=env or child_env(tmp_path / "home")))
        return opened[-1]

    yield start
    for term in opened:
        term.close()



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
    term.expect(r"/save FILE +write the conversation and its settings as JSON \(never overwrites a file\)")
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


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(terminal, tmp_path):
    """A long reply from the random-weight preset (4096 positions make each step slow enough), Ctrl-C once the
    first text shows: the reply stops, the process lives on, takes commands, saves the reply marked as interrupted
    (and loads it back as it was), and leaves with status 0."""
    saved, again = tmp_path / "chat.json", tmp_path / "again.json"
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
    for command in (f"/save {saved}", f"/load {saved}", f"/save {again}"):
        term.expect(PROMPT)
        term.send(command + "\r")
        term.expect(r"loaded 2 messages" if command.startswith("/load") else r"saved 2 messages")
    term.expect(PROMPT)
    term.send("/exit\r")
    assert term.wait() == 0
    assert "Traceback" not in term.text
    user, reply = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert user == {"role": "user", "content": "hello"}
    assert reply["interrupted"] is True and reply["content"]
    assert again.read_text(encoding="utf-8") == saved.read_text(encoding="utf-8")



def test_the_terminal_edits_recalls_and_pastes_messages(terminal, tmp_path, stories):
    """Through prompt_toolkit: arrow keys edit the line (no escape codes reach the model), Up recalls the last
    message, a bracketed paste is one message, a \"\"\" block spans lines (ended by its closing quotes, or sent by
    Esc-Enter), and every message lands in the history file under the state dir."""
    saved = tmp_path / "chat.json"
    term = terminal("chat", need_stories(), "--temperature", "0", "-n", "4")
    # Longer than the 4095 characters a terminal's line discipline holds: all of it arrives, and then cannot fit.
    long_text = "the " * 1250
    term.expect(PROMPT)
    term.send(f"\x1b[200~{long_text}\x1b[201~\r")
    match = term.expect(r"error: (\d+) tokens do not fit in the context of 512")
    prompt = stories.tokenizer.encode_chat([{"role": "user", "content": long_text.strip()}])
    assert int(match.group(1)) == len(prompt)
    keystrokes = [
        "Once upon a tme" + "\x1b[D" * 2 + "i\r",  # two steps left, then the missing letter
        "\x1b[A" + " again\r",  # Up: the previous message, to add to
        "\x1b[200~line one\nline two\x1b[201~" + "\r",  # a paste, then Enter
        '"""\r' + "first\r" + 'second"""\r',
        '"""\r' + "third\r" + "fourth" + "\x1b\r",  # Esc-Enter sends the block without its closing quotes
    ]
    for keys in keystrokes:
        term.expect(PROMPT)
        term.send(keys)
        term.expect(r"generated \d+ tok")
    term.expect(PROMPT)
    term.send(f"/save {saved}\r")
    term.expect("saved 10 messages")
    term.expect(PROMPT)
    term.send("\x04")  # Ctrl-D: leave
    assert term.wait() == 0
    assert "Traceback" not in term.text and "warning" not in term.text
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "Once upon a time", "Once upon a time again", "line one\nline two", "first\nsecond", "third\nfourth"]
    history = (tmp_path / "home" / "state" / "xqinfer" / "chat_history").read_text(encoding="utf-8")
    typed = [line[1:] for line in history.splitlines() if line.startswith("+")]
    assert typed == [long_text, "Once upon a time", "Once upon a time again", "line one", "line two", '"""', "first",
                     'second"""', '"""', "third", "fourth", f"/save {saved}"]


def test_a_history_file_that_cannot_be_written_is_warned_about_once(terminal, tmp_path):
    """The state dir is a file here: one warning, and Up still recalls what this chat was given."""
    home = tmp_path / "home"
    env = child_env(home)
    home.mkdir()
    (home / "state").write_text("not a folder\n")
    term = terminal("chat", need_stories(), env=env)
    term.expect(r"warning: cannot keep the chat history in .*/state/xqinfer/chat_history: .*; it lasts for this "
                r"session only")
    for keys in ("/stats\r", "\x1b[A\r"):  # the second time through the history
        term.expect(PROMPT)
        term.send(keys)
        term.expect(r"cache holds 0/512 tokens")
    term.expect(PROMPT)
    term.send("\x04")
    assert term.wait() == 0
    assert term.text.count("warning") == 1 and (home / "state").read_text() == "not a folder\n"
