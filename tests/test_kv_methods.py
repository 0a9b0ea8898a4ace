"""AsymKV and XQuant-KV: equivalent bits, shared codes, calibration, exactness with quantization off."""

from __future__ import annotations

import pytest
import torch

from xqinfer import quant
from xqinfer.cache import CacheSpec, make_cache, parse_spec
from xqinfer.cache.asymkv import AsymKVCache
from xqinfer.cache.kivi import KIVICache
from xqinfer.cache.xquant_kv import XQuantKVCache
from xqinfer.config import ModelConfig
from xqinfer.engine import Engine
from xqinfer.errors import CacheSpecError
from xqinfer.loader import random_model
from xqinfer.presets import preset_config

TINY = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
    "max_position_embeddings": 256,
}


@pytest.fixture(scope="module")
def model():
    return random_model(ModelConfig.from_dict(TINY), torch.float32, "cpu", seed=3)


@pytest.mark.parametrize("text, method, expected", [
    ("xquant-kv:kq=32,vq=0,km=32,vm=16", XQuantKVCache, 1.375),
    ("xquant-kv:kq=28,vq=0,km=32,vm=28", XQuantKVCache, 1.40625),
    ("xquant-kv", XQuantKVCache, 1.375),
    ("kivi:bits=2", KIVICache, 2.0),
    ("asymkv:lk=32,lv=0", AsymKVCache, 1.5),
    ("asymkv", AsymKVCache, 1.5),
])
def test_equivalent_bits_of_a_32_layer_model(text, method, expected):
    config = preset_config("llama-2-7b")
    assert config.num_layers == 32
    assert method.code_bits(method.resolve(parse_spec(text), config), config) == expected


def test_defaults_follow_the_layer_count():
    config = ModelConfig.from_dict(TINY)
    assert XQuantKVCache.resolve(parse_spec("xquant-kv"), config).options == {
        **parse_spec("xquant-kv").options, "kq": 4, "vq": 0, "km": 4, "vm": 2}
    assert AsymKVCache.resolve(parse_spec("asymkv"), config).options["lk"] == 4


@pytest.mark.parametrize("text, fragment", [
    ("xquant-kv:kq=3,km=0", "same bits"),  # layer 3 (1-bit keys) would share layer 2's 2-bit codes
    ("xquant-kv:vq=1,vm=0", "same bits"),
    ("asymkv:lk=9", "accepted: 0..4"),
    ("xquant-kv:eta1=0.7", "accepted"),
])
def test_invalid_layer_choices_are_refused(model, text, fragment):
    with pytest.raises(CacheSpecError, match=fragment):
        make_cache(text, model, 64)


def test_shared_layers_hold_no_code_bytes(model):
    cache = make_cache("xquant-kv:km=0,vm=0,residual=0", model, 64)
    for index, layer in enumerate(cache.layers):
        shared = index % 2 == 1
        assert (layer.keys.codes is None) == shared and (layer.values.codes is None) == shared
        code_bytes = sum(t.nbytes for t in layer.tensors() if t.dtype == torch.uint8)
        assert (code_bytes == 0) == shared
    assert cache.layer_nbytes()[1] < cache.layer_nbytes()[0]


def test_shared_layer_reads_the_previous_codes_with_its_own_calibrated_scale(model):
    spec = "xquant-kv:km=0,vm=0,residual=0,group=32"
    engine = Engine(model, spec, capacity=96)
    prompt = list(range(3, 67))  # two closed key groups of 32 tokens
    engine.prefill(prompt)
    cache = engine.cache
    first, second = cache.layers[0], cache.layers[1]
    slots = torch.arange(cache.capacity)
    positions = torch.where(slots < len(prompt), slots, torch.full_like(slots, -1))
    length = torch.tensor(len(prompt))
    first.values.read(length, positions)  # the partner's codes as it last read them
    values = second.values.read(length, positions)
    codes = quant.unpack(first.values.codes, first.values.bits, first.values.channels)
    grouped = quant.to_groups(codes, second.values.group, "token")
    scale, zero = quant.calibrated_params(second.values.scale, second.values.zero, second.values.bits,
                                          second.values.eta)
    expected = quant.from_groups(grouped.float() * scale.unsqueeze(-1) + zero.unsqueeze(-1), "token")
    torch.testing.assert_close(values[..., : len(prompt), :], expected[..., : len(prompt), :].to(values.dtype))
    # Its own scale, not layer 0's: the layers' value ranges differ.
    assert not torch.equal(second.values.scale, first.values.scale)


def test_calibration_lowers_one_bit_error():
    torch.manual_seed(0)
    x = torch.randn(4096, 512)
    q = quant.quantize_per_token(x, 1, 32)
    plain = (quant.dequantize(q) - x).pow(2).mean() / x.var()
    calibrated = (quant.dequantize(q, eta=1 / 6) - x).pow(2).mean() / x.var()
    assert plain == pytest.approx(1.96, rel=0.05) and calibrated == pytest.approx(0.68, rel=0.05)


def _logits(model, spec, prompt, steps):
    engine = Engine(model, spec, capacity=len(prompt) + len(steps))
    out = [engine.prefill(prompt)]
    out += [engine.decode(torch.tensor([token])) for token in steps]
    return torch.stack(out)


@pytest.mark.parametrize("text", ["asymkv:residual=0", "xquant-kv:residual=0", "xquant-kv:km=0,vm=0,residual=0",
                                  "xquant-kv:km=0,vm=0"])
def test_quantization_off_equals_fp16(model, text, single_thread):
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (100,)).tolist()
    reference = _logits(model, "fp16", ids[:36], ids[36:])
    spec = parse_spec(text)
    off = CacheSpec(spec.method, {**spec.options, "bits": 16})
    assert (_logits(model, off, ids[:36], ids[36:]) - reference).abs().max() <= 1e-4
    quantized = _logits(model, spec, ids[:36], ids[36:])
    if "residual=0" in text:
        assert (quantized - reference).abs().max() > 1e-3  # and with quantization on, it does quantize


def test_shared_codes_under_the_sim_protocol(model, tmp_path, single_thread):
    """sim attends to the new tokens through their quantized form: shared layers must take their partner's codes
    for those tokens too, not the codes of the partner's history."""
    from xqinfer.api import LLM
    from xqinfer.ppl import perplexity
    from xqinfer.sampling import SamplingParams
    from xqinfer.tokenizer import Tokenizer

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 12, encoding="utf-8")
    llm = LLM("tiny", model.config, model, Tokenizer.byte_level(300), SamplingParams(), (2,))
    report = perplexity(llm, text, ["xquant-kv:km=0,vm=0", "xquant-kv:km=4,vm=4"], ctx=128, protocol="sim")
    shared, unshared = report.scores[1].ppl, report.scores[2].ppl
    assert all(map(torch.isfinite, map(torch.tensor, (shared, unshared))))
    assert shared != unshared  # sharing changes what is read
