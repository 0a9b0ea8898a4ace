"""A method is one file: registered from this test file alone, a toy method shows up in `plan`, `ppl` and `bench`
(through the CLI, in-process) with the facts it declares, without any other file naming it."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from xqinfer import cli
from xqinfer.attention import attend
from xqinfer.cache import REGISTRY, benchmarked_specs
from xqinfer.cache.base import Cache, LayerCache, Option, register
from xqinfer.rope import apply_rotary


class RoundedLayer(LayerCache):
    """K and V rounded to bfloat16 as they are stored: a method of its own, simple enough to check by eye."""

    def __init__(self, parent: Cache, index: int) -> None:
        super().__init__(parent, index)
        config = parent.config
        shape = (parent.batch_size, config.num_kv_heads, parent.capacity, config.head_dim)
        self.keys = torch.zeros(shape, dtype=torch.bfloat16, device=parent.device)
        self.values = torch.zeros(shape, dtype=torch.bfloat16, device=parent.device)

    def attend(self, step, x, q, k, v):
        k = apply_rotary(k, step.cos, step.sin)
        tail = step.slots.shape[0]
        if step.concat:
            history = self.keys[:, :, : step.span].to(q.dtype), self.values[:, :, : step.span].to(q.dtype)
        self.keys.index_copy_(2, step.slots, k[:, :, -tail:].to(torch.bfloat16))
        self.values.index_copy_(2, step.slots, v[:, :, -tail:].to(torch.bfloat16))
        if step.concat:
            keys, values = torch.cat((history[0], k), dim=2), torch.cat((history[1], v), dim=2)
        else:
            keys, values = self.keys[:, :, : step.span].to(q.dtype), self.values[:, :, : step.span].to(q.dtype)
        return attend(q, keys, values, step.mask, self.projection.scale)

    def tensors(self):
        return [self.keys, self.values]


@pytest.fixture
def toy_method():
    """Registers `toy-bf16` for one test and removes it afterwards (the registry is process-wide)."""

    @register("toy-bf16")
    class RoundedCache(Cache):
        BENCHMARKED = ("toy-bf16",)
        OPTIONS = {"note": Option(7, minimum=0)}

        def make_layer(self, index):
            return RoundedLayer(self, index)

        @classmethod
        def layer_bits_per_element(cls, spec, config, index, dtype):
            return 16.0

        @classmethod
        def code_bits(cls, spec, config):
            return 16.0

        @classmethod
        def bits_label(cls, spec, config):
            return "bf16"

    yield RoundedCache
    del REGISTRY["toy-bf16"]


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["xqinfer", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    return exited.value.code or 0, out, err


def test_a_registered_method_is_in_the_defaults(toy_method):
    assert benchmarked_specs()[-1] == "toy-bf16"


def test_plan_sizes_a_registered_method_from_its_own_facts(toy_method, monkeypatch, capsys, tmp_path):
    path = tmp_path / "plan.json"
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--preset", "llama-3.2-1b", "--memory", "24GB",
                             "--context", "4k", "--json", path)
    assert code == 0, err
    rows = {row["method"]: row for row in json.loads(path.read_text())["methods"]}
    assert rows["toy-bf16:note=7"]["normalized_size"] == 1.0 and rows["toy-bf16:note=7"]["equivalent_bits"] == 16
    assert rows["toy-bf16:note=7"]["bytes_per_token"] == rows["fp16"]["bytes_per_token"]
    assert "toy-bf16" in out


def test_ppl_and_bench_run_a_registered_method(toy_method, monkeypatch, capsys, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("one two three four five six seven eight nine ten " * 20, encoding="utf-8")
    scores = tmp_path / "ppl.json"
    code, _, err = run_cli(monkeypatch, capsys, "ppl", text, "--preset", "llama-tiny", "--ctx", "32", "--limit", "2",
                           "--cache", "toy-bf16", "--kld", "--json", scores)
    assert code == 0, err
    rows = {row["spec"]: row for row in json.loads(scores.read_text())["methods"]}
    fp16, toy = rows["fp16"], rows["toy-bf16:note=7"]
    assert toy["bits"] == "bf16" and toy["normalized_size"] == 1.0
    # bf16 rounding of K and V moves the scores a little, never a lot, on the same windows.
    assert toy["tokens"] == fp16["tokens"] and 0 < toy["kld"] < 1e-2
    assert toy["ppl"] == pytest.approx(fp16["ppl"], rel=1e-2)

    timings = tmp_path / "bench.json"
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--preset", "llama-tiny", "--device", "cpu",
                             "--context", "64", "--gen", "4", "--reps", "1", "--cache", "toy-bf16",
                             "--json", timings)
    assert code == 0, err
    (result,) = json.loads(timings.read_text())["results"]
    assert result["method"] == "toy-bf16:note=7" and result["decode_tokens_per_s"] > 0
    assert result["cache_bytes"] >= 64 * result["cache_bytes_per_token"]
