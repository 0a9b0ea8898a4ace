"""`--threads N` on every command: torch's intra-op threads, validated before any model loads, a warning beyond the
cores; by default every core, and one for a model small enough that threads cost more than they save."""

from __future__ import annotations

import json

import pytest
import torch

from xqinfer.device import default_threads, usable_cores
from xqinfer.presets import preset_config

from test_cli import ANSI, call_main, model_never_loads


@pytest.fixture
def threads_restored():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


COMMANDS = {"generate": ["generate", "-p", "hi"], "chat": ["chat"], "bench": ["bench"], "ppl": ["ppl", "{dataset}"],
            "plan": ["plan", "--memory", "80GB"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_threads_below_one_is_a_usage_error_before_loading(command, monkeypatch, capsys, tmp_path):
    dataset = tmp_path / "text.txt"
    dataset.write_text("Once upon a time.\n", encoding="utf-8")
    model_never_loads(monkeypatch)
    args = [arg.format(dataset=dataset) for arg in COMMANDS[command]]
    code, out, err = call_main(monkeypatch, capsys, *args, "--threads", "0")
    text = ANSI.sub("", err).strip()
    assert code == 2 and len(text.splitlines()) == 1 and "--threads" in text and "Traceback" not in text, text


def test_more_threads_than_cores_is_honoured_with_a_warning(monkeypatch, capsys, threads_restored):
    many = usable_cores() + 1
    code, out, err = call_main(monkeypatch, capsys, "plan", "--memory", "80GB", "--threads", many)
    assert code == 0, err
    warnings = [line for line in ANSI.sub("", err).splitlines() if line.strip()]
    assert warnings == [f"warning: --threads {many} is more than the {usable_cores()} cores this process may use: "
                        "the threads will share them, which is usually slower"]
    assert torch.get_num_threads() == many


def test_a_small_model_runs_on_one_thread_and_a_larger_one_on_every_core():
    assert default_threads(preset_config("llama-tiny")) == 1  # hidden size 256
    assert default_threads(preset_config("llama-100m")) == usable_cores()  # 768
    assert default_threads(preset_config("llama-3.1-8b")) == usable_cores()


def test_the_default_threads_follow_the_model_unless_omp_num_threads_is_set(monkeypatch, capsys, threads_restored):
    args = ["generate", "--preset", "llama-tiny", "--device", "cpu", "-p", "hi", "-n", "2", "--json"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    code, out, err = call_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert torch.get_num_threads() == 1  # llama-tiny is small
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own choice is kept
    torch.set_num_threads(2)
    code, out, err = call_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert torch.get_num_threads() == 2


def test_bench_records_the_threads_it_ran_with(monkeypatch, capsys, tmp_path, threads_restored):
    path = tmp_path / "bench.json"
    code, out, err = call_main(monkeypatch, capsys, "bench", "--preset", "llama-tiny", "--device", "cpu",
                               "--context", "16", "--gen", "2", "--reps", "1", "--cache", "fp16", "--threads", "2",
                               "--json", path)
    assert code == 0, err
    assert json.loads(path.read_text(encoding="utf-8"))["threads"] == 2
    assert "| 2 threads |" in ANSI.sub("", err)
