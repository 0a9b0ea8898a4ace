"""Memory is checked before it is allocated: weights (presets and checkpoints) when a model loads, each cache and its
workspace when an engine (or ppl's set of caches) is built, against the device's free memory, from plan.py's
accounting; what still runs out (the allocator's errors) and a full disk are one line each, never an internal
error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import xqinfer
import xqinfer.api
import xqinfer.formats
import xqinfer.memory
from xqinfer import cli
from xqinfer.cache import parse_spec
from xqinfer.device import free_memory, is_out_of_memory
from xqinfer.engine import Engine
from xqinfer.errors import MemoryLimitError
from xqinfer.formatting import human_bytes
from xqinfer.memory import CACHE_HINT, cache_needs, check_memory, weights_needs
from xqinfer.plan import bytes_per_token, workspace_bytes
from xqinfer.presets import preset_config

from test_cli import ANSI, assert_one_line_error, call_main, child_env, need_stories

GIB = 2**30


def test_free_memory_of_the_cpu_is_what_the_system_says_is_available():
    free = free_memory(torch.device("cpu"))
    if free is None:
        pytest.skip("no /proc/meminfo here")
    with open("/proc/meminfo") as handle:
        total = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemTotal:"))
    assert 0 < free <= total
    assert free_memory(torch.device("meta")) is None  # nothing to read: no check


def test_the_needs_are_the_accounting_of_plan():
    config = preset_config("llama-3.1-8b")
    needs = weights_needs(config, torch.bfloat16)
    assert needs["weights"] == config.num_parameters * 2
    assert needs["workspace"] == workspace_bytes(config, 1, 1, torch.bfloat16)
    specs = [parse_spec("fp16"), parse_spec("kivi:bits=2")]
    needs = cache_needs(specs, config, 32768, 2, torch.bfloat16)
    assert needs["cache"] == int(sum(32768 * 2 * bytes_per_token(s, config, torch.bfloat16) for s in specs))
    assert needs["workspace"] == workspace_bytes(config, 32768, 2, torch.bfloat16)
    # fp16 at 32k, batch 2: K and V, 32 layers x 1024 wide, 2 bytes each.
    assert cache_needs(specs[:1], config, 32768, 2, torch.bfloat16)["cache"] == 32768 * 2 * 2 * 32 * 1024 * 2


def test_a_cache_needs_no_more_than_it_allocates():
    """The check asks for at least what a cache takes: never more (a false refusal), whatever the method."""
    llm = xqinfer.load(preset="llama-tiny", device="cpu")
    for text in ("fp16", "kivi:bits=2", "asymkv", "xquant-kv", "xquant:bits=4", "xquant-cl:bits=2"):
        engine = Engine(llm.model, text, capacity=512)
        assert 0 < cache_needs([engine.spec], llm.config, 512, 1, llm.dtype)["cache"] <= engine.cache.nbytes()


def free_is(monkeypatch, size: int | None) -> None:
    monkeypatch.setattr(xqinfer.memory, "free_memory", lambda device: size)


def test_check_memory_names_what_is_needed_and_what_is_free(monkeypatch):
    free_is(monkeypatch, 3 * GIB)
    check_memory({"weights": 2 * GIB, "workspace": GIB}, torch.device("cpu"), lambda: "m", CACHE_HINT)  # fits
    with pytest.raises(MemoryLimitError) as refused:
        check_memory({"weights": 2 * GIB, "workspace": GIB + 1}, torch.device("cpu"), lambda: "model x", CACHE_HINT)
    message = str(refused.value)
    assert message.startswith("not enough memory: model x needs at least 3.00 GiB (weights 2.00 GiB, workspace ")
    assert "the CPU has 3.00 GiB free" in message and CACHE_HINT in message
    free_is(monkeypatch, None)  # unknown: run, and let the allocator say
    check_memory({"weights": 1 << 60}, torch.device("cpu"), lambda: "m", CACHE_HINT)


def test_an_engine_is_refused_before_its_cache_is_allocated(monkeypatch):
    llm = xqinfer.load(preset="llama-tiny", device="cpu")
    free_is(monkeypatch, 1 << 20)
    with pytest.raises(MemoryLimitError, match=r"a kivi cache of 4096 tokens x 2 sequences needs at least"):
        Engine(llm.model, "kivi:bits=2", capacity=4096, batch_size=2)


def never_built(monkeypatch) -> None:
    def build(*args, **kwargs):
        raise AssertionError("the weights were built although they do not fit")

    monkeypatch.setattr(xqinfer.api, "random_model", build)
    monkeypatch.setattr(xqinfer.api, "load_checkpoint", build)


def test_a_preset_beyond_the_free_memory_is_refused_before_any_weight_is_built(monkeypatch, capsys):
    """llama-2-13b in fp32 is 48.5 GiB: on a 24 GiB machine it is refused at once, not after a long build."""
    need = weights_needs(preset_config("llama-2-13b"), torch.float32)
    free = free_memory(torch.device("cpu"))
    if free is not None and free >= sum(need.values()):
        pytest.skip(f"this machine has {free / GIB:.0f} GiB free: llama-2-13b in fp32 fits")
    never_built(monkeypatch)
    code, out, err = call_main(monkeypatch, capsys, "generate", "--preset", "llama-2-13b", "--dtype", "fp32",
                               "--device", "cpu", "-p", "hi")
    assert code == 1
    assert_one_line_error(code, out, err, "not enough memory: llama-2-13b in fp32 needs at least 48.49 GiB",
                          "weights 48.49 GiB", "the CPU has", "free")


@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["chat"], ["bench", "--context", "16"],
                                     ["ppl", "{dataset}"]])
def test_every_command_refuses_weights_that_do_not_fit(command, monkeypatch, capsys, tmp_path):
    dataset = tmp_path / "text.txt"
    dataset.write_text("Once upon a time there was a cat.\n", encoding="utf-8")
    free_is(monkeypatch, 24 * GIB)
    never_built(monkeypatch)
    args = [arg.format(dataset=dataset) for arg in command]
    code, out, err = call_main(monkeypatch, capsys, *args, "--preset", "llama-3.1-8b", "--dtype", "fp32",
                               "--device", "cpu")
    assert_one_line_error(code, out, err, "llama-3.1-8b in fp32 needs at least 29.9", "24.00 GiB free")
    assert code == 1


def test_a_checkpoint_beyond_the_free_memory_is_refused_before_its_weights_are_read(monkeypatch, capsys):
    model = need_stories()
    free_is(monkeypatch, 1000)
    never_built(monkeypatch)
    code, out, err = call_main(monkeypatch, capsys, "generate", model, "-p", "hi", "--device", "cpu")
    weights = weights_needs(xqinfer.formats.open_checkpoint(model).config, torch.float32)["weights"]
    assert_one_line_error(code, out, err, f"{model} in fp32 needs at least", f"weights {human_bytes(weights)}",
                          "the CPU has 1000 B free")


def test_a_bench_row_beyond_the_free_memory_fails_alone(monkeypatch, capsys, tmp_path):
    llm = xqinfer.load(preset="llama-tiny", device="cpu")
    monkeypatch.setattr(cli, "load_llm", lambda *args: llm)
    small, large = (sum(cache_needs([parse_spec("fp16")], llm.config, n, 1, llm.dtype).values()) for n in (66, 2050))
    free_is(monkeypatch, (small + large) // 2)  # room for the 64-token row, not for the 2048-token one
    path = tmp_path / "bench.json"
    code, out, err = call_main(monkeypatch, capsys, "bench", "--context", "64", "--context", "2048", "--gen", "2",
                               "--reps", "1", "--cache", "fp16", "--json", path)
    assert code == 1
    data = json.loads(path.read_text(encoding="utf-8"))
    assert [(r["method"], r["context"]) for r in data["results"]] == [("fp16", 64)]
    assert [f["context"] for f in data["failures"]] == [2048]
    assert data["failures"][0]["error"].startswith("not enough memory: a kv fp32 cache of 2050 tokens needs at least")


def test_out_of_memory_from_the_allocators_is_one_line(monkeypatch, capsys):
    def allocate(*args, **kwargs):
        torch.empty(1 << 60, dtype=torch.uint8)  # a real failure of the CPU allocator (a RuntimeError)

    for error in (allocate, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), MemoryError()):
        def load(*args, error=error, **kwargs):
            if callable(error):
                error()
            raise error

        monkeypatch.setattr(cli.api, "load", load)
        code, out, err = call_main(monkeypatch, capsys, "generate", "--preset", "llama-tiny", "-p", "hi")
        assert_one_line_error(code, out, err, "out of memory")
        assert code == 1
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_full_disk_is_one_line():
    """stdout on a full disk (/dev/full answers every write with ENOSPC): one line, and nothing reported at exit."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "xqinfer", "plan", "--memory", "80GB"], stdout=full,
                                stderr=subprocess.PIPE, env=child_env(), timeout=120)
    err = ANSI.sub("", result.stderr.decode())
    assert result.returncode == 1
    assert err.strip().splitlines() == ["error: no space left on the disk: free some space, or write elsewhere"]
