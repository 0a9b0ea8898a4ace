"""Decode floors: the bytes and flops they charge, checked against the presets by hand and against what the torch
decode step really computes (torch's flop counter); the peaks measured on this CPU; `bench --floors`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import xqinfer
from xqinfer.accounting import bytes_per_token, rebuild_flops_per_token, streamed_parameters
from xqinfer.bench import bench
from xqinfer.cache import parse_spec
from xqinfer.config import ModelConfig
from xqinfer.engine import Engine
from xqinfer.loader import random_model
from xqinfer.presets import preset_config
from xqinfer.roofline import Peaks, decode_floor, measure_peaks

from test_bench import SHAPES, run_cli

pytestmark = pytest.mark.usefixtures("single_thread")

PEAKS = Peaks(bandwidth=4.0e12, matmul=8.0e14, dtype="bfloat16")


def test_fp16_floor_is_weights_and_cache_over_bandwidth():
    config = preset_config("llama-3.1-8b")  # untied: the embedding table is gathered, not streamed
    context = 32768
    floor = decode_floor(config, parse_spec("fp16"), context, 1, torch.bfloat16, PEAKS)
    weights = (config.num_parameters - config.vocab_size * config.hidden_size) * 2
    cache = context * 2 * config.num_layers * config.kv_dim * 2
    assert floor.bytes_per_step == weights + cache
    assert floor.memory_seconds == pytest.approx((weights + cache) / PEAKS.bandwidth)
    assert floor.flops_per_step == 2 * streamed_parameters(config)
    assert floor.bound == "memory" and floor.seconds == floor.memory_seconds


def test_rebuild_flops_by_hand_for_the_presets():
    llama3, llama2 = preset_config("llama-3.1-8b"), preset_config("llama-2-7b")
    for method in ("fp16", "kivi:bits=2", "asymkv", "xquant-kv"):
        assert rebuild_flops_per_token(parse_spec(method), llama3) == 0
    # GQA latents, width 1024: K = L̂k·Mk (2·1024·1024), V absorbed over 32 query heads (2·32·1024).
    assert rebuild_flops_per_token(parse_spec("xquant:bits=4"), llama3) == 32 * (2 * 1024 * 1024 + 2 * 32 * 1024)
    assert rebuild_flops_per_token(parse_spec("xquant:bits=4,absorb=0"), llama3) == 32 * 2 * (2 * 1024 * 1024)
    # MHA X, width 4096: K = X̂·Wk (2·4096·4096), V absorbed.
    assert rebuild_flops_per_token(parse_spec("xquant:bits=4"), llama2) == 32 * (2 * 4096 * 4096 + 2 * 32 * 4096)
    # XQuant-CL on GQA: back from the 2048-wide U_kv basis, then X̂·Wk.
    assert rebuild_flops_per_token(parse_spec("xquant-cl:bits=2"), llama3) == \
        32 * (2 * 2048 * 4096 + 2 * 4096 * 1024 + 2 * 32 * 4096)
    # At 32k on an H200-like device, llama-3.1-8b's xquant is still memory-bound; llama-2-7b's is compute-bound.
    assert decode_floor(llama3, parse_spec("xquant:bits=4"), 32768, 1, torch.bfloat16, PEAKS).bound == "memory"
    assert decode_floor(llama2, parse_spec("xquant:bits=4"), 32768, 1, torch.bfloat16, PEAKS).bound == "compute"


def _step_flops(engine: Engine, span: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        engine.static_step(span)
    return counter.get_total_flops()


@pytest.mark.parametrize("shape,spec", [("mha", "xquant:bits=4"), ("gqa", "xquant:bits=4,group=32"),
                                        ("mha", "xquant:bits=4,absorb=0"), ("gqa", "xquant-cl:bits=2,group=32"),
                                        ("mha", "xquant-cl:bits=2")])
@torch.inference_mode()
def test_rebuild_flops_are_what_the_torch_decode_step_computes(shape, spec):
    # Each slot a decode step reads costs the rebuild plus the q·K score (2·H·D): the difference between two spans.
    # With absorb=0 the attention itself runs in SDPA, which torch's counter does not count on a CPU.
    config = ModelConfig.from_dict(SHAPES[shape])
    engine = Engine(random_model(config, torch.float32, "cpu", seed=1), spec, capacity=600)
    engine.prefill(list(range(1, 100)))
    engine._step_tokens.fill_(1)
    engine._step_positions.fill_(engine.length)
    per_slot = (_step_flops(engine, 512) - _step_flops(engine, 256)) / 256
    scores = config.num_layers * 2 * config.num_heads * config.head_dim if parse_spec(spec).options["absorb"] else 0
    assert per_slot == rebuild_flops_per_token(parse_spec(spec), config) + scores


def test_peaks_measured_on_this_cpu_are_positive_and_finite():
    peaks = measure_peaks(torch.device("cpu"), torch.float32, copy_bytes=16 << 20, matmul_size=256, repeats=2)
    assert math.isfinite(peaks.bandwidth) and peaks.bandwidth > 1e8
    assert math.isfinite(peaks.matmul) and peaks.matmul > 1e8
    assert peaks.dtype == "float32"


def test_bench_with_peaks_reports_each_decode_against_its_floor():
    llm = xqinfer.load(preset="llama-tiny", device="cpu")
    results = bench(llm, [64], ["fp16", "xquant:bits=4"], gen=4, reps=1, peaks=PEAKS).results
    for result in results:
        floor = decode_floor(llm.config, parse_spec(result.method), 64 + 2, 1, llm.dtype, PEAKS)
        assert result.decode_floor_tokens_per_s == pytest.approx(1 / floor.seconds)
        assert result.decode_floor_bound == floor.bound
        assert result.fraction_of_floor == pytest.approx(result.decode_tokens_per_s / result.decode_floor_tokens_per_s)
    assert bytes_per_token(parse_spec("fp16"), llm.config, llm.dtype) > 0
    plain = bench(llm, [64], ["fp16"], gen=2, reps=1).results[0]
    assert plain.decode_floor_tokens_per_s is None and plain.fraction_of_floor is None


def test_bench_floors_flag_adds_peaks_and_columns(monkeypatch, capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--preset", "llama-tiny", "--device", "cpu", "--context",
                             "64", "--gen", "4", "--reps", "1", "--cache", "fp16", "--floors", "--json", path)
    assert code == 0, err
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["peaks"]["bandwidth"] > 0 and data["peaks"]["matmul"] > 0 and data["peaks"]["dtype"] == "float32"
    result = data["results"][0]
    assert result["decode_floor_tokens_per_s"] > 0 and result["decode_floor_bound"] in ("memory", "compute")
    assert "floor t/s" in out and "of floor" in out and "peaks: copy" in err
