"""XQuant-KV's 1- and 2-bit path against a plain-loop reference of METHODS.md sections 1 and 6 (no xqinfer.quant).

The reference quantizes one group at a time with Python floats: `z = min(g)`, `s = (max(g) - z) / (2^b - 1)`,
`q = clamp(round((x - z) / s), 0, 2^b - 1)`, dequantized with the calibration `ẑ = z + η·s·(2^b - 1)`,
`ŝ = (1 - 2η)·s`, η = eta1 for 1-bit codes and eta2 for 2-bit ones. Scale and zero are stored in fp16, the zero
rounded down and the scale up (methods.md section 1, "Storage rounding"), which the reference does with numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xqinfer.cache import make_cache
from xqinfer.config import ModelConfig
from xqinfer.loader import random_model

LAYERS, KV_HEADS, HEAD_DIM, TOKENS, GROUP = 4, 2, 64, 96, 32
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
    "vocab_size": 300, "max_position_embeddings": 256,
}


@pytest.fixture(scope="module")
def model():
    return random_model(ModelConfig.from_dict(CONFIG), torch.float32, "cpu", seed=5)


def _fp16_toward(value: float, direction: float) -> float:
    """`value` as the nearest fp16 on the side of `direction` (-inf: not above it, +inf: not below it)."""
    stored = np.float16(value)
    if (direction < 0 and float(stored) > value) or (direction > 0 and float(stored) < value):
        stored = np.nextafter(stored, np.float16(direction))
    return float(stored)


def _group(values: list[float], bits: int, eta: float,
           codes: list[int] | None = None) -> tuple[list[float], list[int]]:
    """One group dequantized as read back, and its codes; `codes` given: another group's, with this one's range."""
    levels = 2**bits - 1
    zero = _fp16_toward(min(values), -math.inf)
    scale = _fp16_toward((max(values) - zero) / levels, math.inf)
    if codes is None:
        codes = [0 if scale == 0 else min(max(round((x - zero) / scale), 0), levels) for x in values]
    zero_hat, scale_hat = zero + eta * scale * levels, (1 - 2 * eta) * scale
    return [zero_hat + q * scale_hat for q in codes], codes


def reference(x: torch.Tensor, bits: int, eta: float, axis: str,
              partner: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, H, T, D] as METHODS.md reads it back: groups of GROUP tokens of one channel (keys) or GROUP channels
    of one token (values). `partner`: the layer whose codes x's layer reads (shared codes)."""
    out = torch.empty_like(x)
    batch, heads, tokens, dim = x.shape
    for b in range(batch):
        for h in range(heads):
            for outer in range(dim if axis == "channel" else tokens):
                for start in range(0, tokens if axis == "channel" else dim, GROUP):
                    index = [(start + i, outer) if axis == "channel" else (outer, start + i) for i in range(GROUP)]
                    codes = None
                    if partner is not None:
                        _, codes = _group([partner[b, h, t, d].item() for t, d in index], bits, eta)
                    values, _ = _group([x[b, h, t, d].item() for t, d in index], bits, eta, codes)
                    for (t, d), value in zip(index, values):
                        out[b, h, t, d] = value
    return out


def _read_back(cache, keys: list[torch.Tensor], values: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Each layer's (K, V) through its streams as the cache stores and reads them (residual 0), layer by layer, so a
    shared layer reads its partner's codes as the partner just read them."""
    positions = torch.arange(TOKENS)
    slots = torch.arange(cache.capacity)
    stored = torch.where(slots < TOKENS, slots, torch.full_like(slots, -1))
    length = torch.tensor(TOKENS)
    out = []
    for layer, k, v in zip(cache.layers, keys, values):
        layer.keys.write(k, positions)
        layer.values.write(v, positions)
        keys_read, values_read = layer.keys.read(length, stored), layer.values.read(length, stored)
        out.append((keys_read[..., :TOKENS, :], values_read[..., :TOKENS, :]))
    return out


def _simulated(cache, keys: list[torch.Tensor], values: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Each layer's (K, V) as the `sim` protocol reads them."""
    return [(layer.keys.simulate(k), layer.values.simulate(v)) for layer, k, v in zip(cache.layers, keys, values)]


def _inputs(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shape = (1, KV_HEADS, TOKENS, HEAD_DIM)
    # Keys with a few outlier channels, as real keys have; every layer its own range.
    keys = [torch.randn(shape, generator=generator) * (1 + 4 * (torch.arange(HEAD_DIM) % 16 == 0)) * (i + 1)
            for i in range(LAYERS)]
    values = [torch.randn(shape, generator=generator) * (i + 1) for i in range(LAYERS)]
    return keys, values


@pytest.mark.parametrize("path", [_read_back, _simulated])
@pytest.mark.parametrize("spec, key_bits, value_bits, shared", [
    # The defaults at 4 layers: keys 2-bit and not shared, values 1-bit, layer 3 sharing layer 2's value codes.
    ("xquant-kv:residual=0", [2] * 4, [1] * 4, (False, False, False, True)),
    # Keys 1-bit from layer 2, values 2-bit below layer 2; every odd layer shares both; distinct etas.
    ("xquant-kv:kq=2,vq=2,km=0,vm=0,eta1=0.25,eta2=0.1,residual=0", [2, 2, 1, 1], [2, 2, 1, 1],
     (False, True, False, True)),
])
def test_xquant_kv_reads_back_the_reference(model, path, spec, key_bits, value_bits, shared):
    cache = make_cache(spec, model, TOKENS)
    options = cache.spec.options
    eta = {1: options["eta1"], 2: options["eta2"]}
    keys, values = _inputs(seed=11)
    for index, (k_hat, v_hat) in enumerate(path(cache, keys, values)):
        layer = cache.layers[index]
        assert (layer.keys.bits, layer.values.bits) == (key_bits[index], value_bits[index])
        # η by bit width (eta1 for 1-bit codes, eta2 for 2-bit), not by layer or by method default.
        assert (layer.keys.eta, layer.values.eta) == (eta[key_bits[index]], eta[value_bits[index]])
        key_partner = keys[index - 1] if shared[index] and options["km"] <= index else None
        value_partner = values[index - 1] if shared[index] and options["vm"] <= index else None
        assert (layer.keys.codes_from is not None) == (key_partner is not None)
        assert (layer.values.codes_from is not None) == (value_partner is not None)
        expected_k = reference(keys[index], key_bits[index], eta[key_bits[index]], "channel", key_partner)
        expected_v = reference(values[index], value_bits[index], eta[value_bits[index]], "token", value_partner)
        torch.testing.assert_close(k_hat, expected_k, rtol=0, atol=1e-5 * (index + 1) * 5)
        torch.testing.assert_close(v_hat, expected_v, rtol=0, atol=1e-5 * (index + 1) * 5)


def test_one_bit_levels_are_the_calibrated_ends():
    """A 1-bit group reads back exactly two values, z + η·s and max - η·s, η = eta1 (1/6 by default)."""
    model = random_model(ModelConfig.from_dict(CONFIG), torch.float32, "cpu", seed=5)
    cache = make_cache("xquant-kv:residual=0", model, TOKENS)
    values = torch.linspace(-1.0, 2.0, HEAD_DIM).expand(1, KV_HEADS, TOKENS, HEAD_DIM)
    v_hat = cache.layers[0].values.simulate(values)
    group = values[0, 0, 0, :GROUP]
    low, high = group.min().item(), group.max().item()
    span = high - low
    levels = sorted(set(v_hat[0, 0, 0, :GROUP].tolist()))
    assert len(levels) == 2
    assert levels == pytest.approx([low + span / 6, high - span / 6], abs=2e-3)


def test_onebit_benchmark_scores_as_ppl_does(tmp_path, single_thread):
    """benchmarks/onebit.py: its PPL equals `perplexity`'s on the same windows (the probe changes nothing it
    measures), its error table has every layer, and the scan's all-2-bit base is `xquant-kv:vq=4,vm=4`."""
    import json
    import sys
    from pathlib import Path

    from xqinfer.api import load
    from xqinfer.ppl import perplexity

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import onebit

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "onebit.json"
    specs = ["asymkv", "xquant-kv"]
    args = ["--preset", "llama-tiny", "--dataset", str(text), "--ctx", "64", "--limit", "2", "--scan", "values",
            "--json", str(out)]
    assert onebit.main(args + [a for spec in specs for a in ("--cache", spec)]) == 0
    result = json.loads(out.read_text())
    report = perplexity(load(preset="llama-tiny"), text, specs + ["xquant-kv:vq=4,vm=4"], ctx=64, limit=2, kld=True)
    for row, score in zip(result["methods"], report.scores):
        assert row["ppl"] == pytest.approx(score.ppl, rel=1e-6)
        assert row["kld"] == pytest.approx(score.kld, rel=1e-5, abs=1e-7)
    base = result["scan"][-1]
    assert base["one_bit"] == "none" and base["ppl"] == pytest.approx(report.scores[-1].ppl, rel=1e-6)
    assert [row["one_bit"] for row in result["scan"][:-1]] == [f"values:{i}" for i in range(4)]
    asymkv, xquant_kv = result["methods"][1]["layers"], result["methods"][2]["layers"]
    assert [layer["layer"] for layer in asymkv] == list(range(4))
    # 2-bit keys are read back closer than 1-bit values; calibration brings 1-bit values closer.
    assert all(layer["k_rel"] < layer["v_rel"] for layer in asymkv)
    assert all(x["v_rel"] < a["v_rel"] for a, x in zip(asymkv[:3], xquant_kv[:3]))
    assert [layer["value_shared"] for layer in xquant_kv] == [False, False, False, True]
    assert all(0 <= layer["v_code_match"] <= 1 for layer in xquant_kv[1:])
    assert xquant_kv[0]["v_code_match"] is None
