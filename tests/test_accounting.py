"""Memory accounting (METHODS.md section 7): the actual bytes every cache holds against closed-form sizes computed
here from the capacity, dimensions, bits, groups and residual; the normalized sizes of the section 7 table from the
preset configs alone; and the normalized size against the bits the built buffers really store per token."""

from __future__ import annotations

import math

import pytest
import torch

from xqinfer.accounting import bytes_per_token, layer_bits, normalized_size, residual_bytes
from xqinfer.cache import make_cache
from xqinfer.cache.base import parse_spec
from xqinfer.cache.fp16 import FP16LayerCache
from xqinfer.cache.stream import QuantStream
from xqinfer.config import ModelConfig
from xqinfer.loader import random_model
from xqinfer.presets import preset_config

pytestmark = pytest.mark.usefixtures("single_thread")

_BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}
CONFIGS = {
    "mha": dict(_BASE, hidden_size=64, num_attention_heads=4, num_key_value_heads=4),  # head_dim 16
    "gqa": dict(_BASE, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8),  # kv_dim 16
    "gqa-square": dict(_BASE, hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8),  # 2kv = d
    "swa": dict(_BASE, architectures=["MistralForCausalLM"], hidden_size=64, num_attention_heads=8,
                num_key_value_heads=2, head_dim=8, sliding_window=40),
    # SmolLM2-135M's widths (kv_dim 192, hidden 576) in 2 layers: the default groups of 128 leave ragged rows.
    "smol": {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
             "num_hidden_layers": 2, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 512,
             "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": True},
}
CONFIGS["smol-mha"] = dict(CONFIGS["smol"], num_key_value_heads=9)  # X rows of 576 = 4·128 + 64

_MODELS: dict = {}


def _model(name: str, dtype: torch.dtype):
    key = (name, dtype)
    if key not in _MODELS:
        _MODELS[key] = random_model(ModelConfig.from_dict(CONFIGS[name]), dtype, "cpu", seed=0)
    return _MODELS[key]


# ------------------------------------------------------------------------------------------- closed forms


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of n really packed codes: 8/b codes per byte, or 8 three-bit codes in 3 bytes."""
    if bits == 3:
        return 3 * math.ceil(n / 8)
    return math.ceil(n * bits / 8)


def per_token_stream(n_lead: int, capacity: int, channels: int, bits: int, group: int, residual: int, dt: int) -> int:
    g = min(group, channels)
    codes = capacity * packed_bytes(channels, bits)
    # fp16 scale + zero, one pair per group of g channels per token, the last group of a row ragged if g leaves one
    params = 2 * 2 * capacity * math.ceil(channels / g)
    ring = dt * residual * channels
    return n_lead * (codes + params + ring)


def per_channel_stream(n_lead: int, capacity: int, channels: int, bits: int, group: int, residual: int, dt: int) -> int:
    codes = capacity * packed_bytes(channels, bits)
    params = 2 * 2 * (capacity // group) * channels  # one pair per channel per group of g tokens
    ring = dt * max(residual, group) * channels  # the open group waits in full precision even with residual=0
    return n_lead * (codes + params + ring)


def buffer_capacity(config: ModelConfig, requested: int, multiple: int) -> int:
    """Slots a cache allocates: a sliding-window ring needs its window (+ two groups of slack when grouped)."""
    window = config.sliding_window
    if window is not None and requested > window:
        needed = window + (2 * multiple if multiple > 1 else 0)
    else:
        needed = requested
    return math.ceil(needed / multiple) * multiple


def expected_bytes(text: str, config: ModelConfig, requested: int, dt: int, batch: int = 1) -> tuple[int, int]:
    """(allocated slots, total bytes) of a cache built for `requested` tokens, in closed form."""
    spec = parse_spec(text)
    o = spec.options
    d, kv, hd = config.hidden_size, config.kv_dim, config.head_dim
    heads_kv, layers = config.num_kv_heads, config.num_layers
    gqa = config.is_gqa
    if spec.method == "fp16":
        cap = buffer_capacity(config, requested, 1)
        per_layer = 2 * batch * heads_kv * cap * hd * dt
    elif spec.method == "kivi":
        g, r, b = o["group"], o["residual"], o["bits"]
        cap = buffer_capacity(config, requested, g)
        lead = batch * heads_kv
        per_layer = per_channel_stream(lead, cap, hd, b, g, r, dt) + per_token_stream(lead, cap, hd, b, g, r, dt)
    elif spec.method == "xquant":
        g, r, b = o["group"], o["residual"], o["bits"]
        if not gqa:
            cap = buffer_capacity(config, requested, 1)
            per_layer = per_token_stream(batch, cap, d, b, g, r, dt)
        else:
            cap = buffer_capacity(config, requested, g)
            outlier = o["outlier"]
            per_layer = (
                per_channel_stream(batch, cap, kv - outlier, b, g, r, dt)
                + per_token_stream(batch, cap, kv, b, g, r, dt)
                + outlier * batch * cap * dt  # channel 0 of X·Uk in the model dtype
            )
    elif spec.method == "xquant-cl":
        cap = buffer_capacity(config, requested, 1)
        width = min(2 * kv, d) if gqa else d
        layer_bits = [o["base_bits"] if i < o["base_layers"] else o["bits"] for i in range(layers)]
        total = sum(per_token_stream(batch, cap, width, b, o["group"], 0, dt) for b in layer_bits)
        return cap, total + 8 * cap
    else:
        raise AssertionError(spec.method)
    return cap, layers * per_layer + 8 * cap  # + the int64 slot -> position table


BYTE_CASES = [
    ("mha", "fp16", 70),
    ("gqa", "fp16", 70),
    ("swa", "fp16", 200),
    ("mha", "kivi:bits=2,group=32,residual=32", 64),
    ("mha", "kivi:bits=3,group=8,residual=0", 70),  # capacity rounded up to 72
    ("gqa", "kivi:bits=4,group=16,residual=32,prerope=1", 100),  # value group clipped to head_dim 8
    ("gqa", "kivi:bits=8,group=4,residual=4", 30),
    ("swa", "kivi:bits=2,group=8,residual=16", 200),  # ring: window 40 + 16 slack
    ("mha", "xquant:bits=4,group=128,residual=128", 200),  # group clipped to hidden 64
    ("mha", "xquant:bits=3,group=16,residual=5", 70),
    ("mha", "xquant:bits=2,group=32,residual=0", 33),
    ("gqa", "xquant:bits=4,group=8,residual=16", 70),
    ("gqa", "xquant:bits=3,group=16,residual=0,outlier=1", 64),  # 15 key channels: 3-bit rows pad to 6 bytes
    ("gqa", "xquant:bits=2,group=32,residual=32,outlier=1", 100),
    ("gqa-square", "xquant:bits=3,group=128,residual=0", 64),
    ("swa", "xquant:bits=4,group=8,residual=0", 200),
    ("mha", "xquant-cl:bits=2,base_bits=4,base_layers=3", 70),
    ("mha", "xquant-cl:bits=3,base_bits=8,base_layers=1,group=16", 50),
    ("gqa", "xquant-cl:bits=2,base_layers=2", 70),  # U_kv width 32 < hidden
    ("gqa-square", "xquant-cl:bits=3,base_bits=4,base_layers=4,group=32", 64),
    ("swa", "xquant-cl:bits=2", 200),
    # Ragged per-token rows: value latents 192 = 128 + 64, X 576 = 4·128 + 64, U_kv rows 384 = 3·100 + 84, heads of
    # 64 = 48 + 16, and groups of 7.
    ("smol", "xquant:bits=4", 150),
    ("smol", "xquant:bits=3,group=7,residual=0", 100),  # values 27·7 + 3; keys: capacity rounded to 105
    ("smol", "xquant-cl:bits=2,base_layers=1,group=100", 70),  # U_kv rows of 384 = 3·100 + 84
    ("smol", "kivi:bits=2,group=48,residual=96", 100),  # capacity rounded to 144
    ("smol-mha", "xquant:bits=4", 150),
    ("smol-mha", "xquant:bits=2,group=100,residual=0", 64),
    ("smol-mha", "xquant-cl:bits=3,base_bits=4,base_layers=1", 70),
    ("smol-mha", "kivi:bits=4,group=48,residual=48", 100),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("name, text, capacity", BYTE_CASES)
def test_actual_bytes_match_closed_form(name, text, capacity, dtype):
    model = _model(name, dtype)
    cache = make_cache(text, model, capacity)
    tensors = cache.tensors()
    # No tensor is listed twice or shares storage with another, so the sum counts every byte exactly once.
    storages = [t.untyped_storage().data_ptr() for t in tensors if t.numel()]
    assert len(set(storages)) == len(storages)
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in tensors)
    assert sum(cache.layer_nbytes()) + cache.slot_positions.nbytes == cache.nbytes()
    cap, total = expected_bytes(text, model.config, capacity, torch.finfo(dtype).bits // 8)
    assert cache.capacity == cap
    assert cache.nbytes() == total


def test_three_bit_codes_take_three_eighths_of_a_byte():
    model = _model("mha", torch.float16)
    cache = make_cache("xquant:bits=3,group=64,residual=0", model, 80)
    stream = cache.layers[0].x
    assert stream.codes.dtype == torch.uint8
    assert stream.codes.shape[-1] == 64 * 3 // 8  # 64 codes in 24 bytes
    assert stream.codes.nbytes == 80 * 24


# ------------------------------------------------------------------------------------------- section 7's table

TABLE = [
    # preset, spec, the table's figure
    ("llama-2-7b", "kivi:group=128,prerope=1,bits=4", 0.2656),
    ("llama-2-7b", "kivi:group=128,prerope=1,bits=3", 0.2031),
    ("llama-2-7b", "kivi:group=128,prerope=1,bits=2", 0.1406),
    ("llama-3.1-8b", "kivi:group=128,prerope=1,bits=4", 0.2656),
    ("llama-3.1-8b", "kivi:group=128,prerope=1,bits=3", 0.2031),
    ("llama-3.1-8b", "kivi:group=128,prerope=1,bits=2", 0.1406),
    ("llama-3.1-8b", "xquant:bits=4", 0.2656),
    ("llama-3.1-8b", "xquant:bits=3", 0.2031),
    ("llama-3.1-8b", "xquant:bits=2", 0.1406),
    ("llama-2-7b", "xquant:bits=4", 0.1328),
    ("llama-2-7b", "xquant:bits=3", 0.1016),
    ("llama-2-7b", "xquant-cl:bits=3,base_bits=4,base_layers=3", 0.1045),
    ("llama-2-7b", "xquant-cl:bits=2,base_bits=4,base_layers=3", 0.0762),
]

@pytest.mark.parametrize("preset, text, figure", TABLE)
def test_normalized_size_reproduces_the_methods_table(preset, text, figure):
    config = preset_config(preset)
    assert config.num_layers == 32 and config.is_gqa == (preset == "llama-3.1-8b")
    value = normalized_size(parse_spec(text), config)
    # The table prints 4 decimals, truncating an exact half (0.203125 -> 0.2031): within half a unit of the last digit.
    assert abs(value - figure) <= 0.5e-4 + 1e-12, f"{text} on {preset}: {value}"


def test_normalized_size_exact_fractions():
    mha, gqa = preset_config("llama-2-7b"), preset_config("llama-3.1-8b")
    for bits in (2, 3, 4):
        assert normalized_size(parse_spec(f"kivi:group=128,prerope=1,bits={bits}"), mha) == (bits + 0.25) / 16
        assert normalized_size(parse_spec(f"xquant:bits={bits}"), gqa) == (bits + 0.25) / 16
        assert normalized_size(parse_spec(f"xquant:bits={bits}"), mha) == (bits + 0.25) / 32
    for bits in (2, 3):
        spec = parse_spec(f"xquant-cl:bits={bits},base_bits=4,base_layers=3")
        assert normalized_size(spec, mha) == (3 * 4.25 + 29 * (bits + 0.25)) / 32 / 32
    assert normalized_size(parse_spec("fp16"), mha) == 1.0


# ------------------------------------------------------------------------------------------- built caches

BUILT = [
    ("mha", "fp16"),
    ("gqa", "fp16"),
    ("mha", "kivi:bits=2,group=32,residual=32"),
    ("gqa", "kivi:bits=3,group=16,residual=16,prerope=1"),
    ("mha", "xquant:bits=4"),
    ("mha", "xquant:bits=3,group=16,residual=0"),
    ("gqa", "xquant:bits=2,group=16,residual=16"),
    ("gqa", "xquant:bits=8,group=16,residual=0,outlier=1"),  # 8-bit: rows of 15 codes pack without padding
    ("gqa-square", "xquant:bits=4,group=32,residual=0"),
    ("mha", "xquant-cl:bits=2,base_bits=4,base_layers=3"),
    ("gqa-square", "xquant-cl:bits=3,base_bits=4,base_layers=2,group=32"),
    ("swa", "kivi:bits=4,group=8,residual=8"),
    ("swa", "xquant:bits=4,group=8,residual=8"),
    # Ragged per-token rows with every method's defaults where they are ragged (xquant, xquant-cl) or not, and groups
    # that leave ragged heads; xquant-kv's shared layer stores scales and zeros but no codes.
    ("smol", "xquant:bits=4"),
    ("smol", "xquant:bits=2,group=7,residual=0"),
    ("smol", "xquant-cl:base_layers=1"),
    ("smol", "kivi"),
    ("smol", "asymkv"),
    ("smol", "xquant-kv"),
    ("smol", "xquant-kv:group=48,residual=96"),
    ("smol-mha", "xquant:bits=4"),
    ("smol-mha", "xquant:bits=3,group=100,residual=0"),
    ("smol-mha", "xquant-cl:bits=2,base_bits=4,base_layers=1"),
    ("smol-mha", "kivi:bits=2,group=48,residual=96"),
]


def _stored_and_working(cache) -> tuple[int, int]:
    """Bytes of what is stored per cached token (codes, scales, zeros, full-precision channels) vs. the residual
    rings, over every layer; fails if some tensor of the cache is in neither."""
    stored = working = 0
    for layer in cache.layers:
        if isinstance(layer, FP16LayerCache):
            stored += layer.keys.nbytes + layer.values.nbytes
            continue
        streams = [v for v in vars(layer).values() if isinstance(v, QuantStream)]
        assert streams, type(layer)
        accounted = 0
        for stream in streams:
            if stream.passthrough:
                stored += stream.values.nbytes
            else:
                codes = stream.codes.nbytes if stream.codes is not None else 0  # none in a layer that shares codes
                stored += codes + stream.scale.nbytes + stream.zero.nbytes
                working += stream.ring.nbytes
            accounted += sum(t.nbytes for t in stream.tensors())
        assert accounted == sum(t.nbytes for t in layer.tensors())
    return stored, working


def built_size(cache) -> float:
    """The normalized size of a built cache's own (resolved) spec, in the dtype it stores."""
    return normalized_size(cache.spec, cache.config, cache.dtype)


@pytest.mark.parametrize("name, text", BUILT)
def test_built_cache_normalized_size_is_the_config_figure_and_the_stored_bits(name, text):
    model = _model(name, torch.float16)
    config = model.config
    cache = make_cache(text, model, 128 if name != "swa" else 300)
    assert built_size(cache) == normalized_size(parse_spec(text), config)
    assert built_size(cache) == normalized_size(parse_spec(text), config, torch.float16)
    layers = [bits / 16 for bits in layer_bits(cache.spec, cache.config, cache.dtype)]
    assert len(layers) == config.num_layers and sum(layers) / len(layers) == pytest.approx(built_size(cache))
    stored, working = _stored_and_working(cache)
    assert stored + working + cache.slot_positions.nbytes == cache.nbytes()
    # Bits stored per cached token over what a 16-bit KV cache of the same model stores per token.
    kv_bits_per_token = 16 * 2 * config.kv_dim * config.num_layers
    assert stored * 8 / cache.capacity / kv_bits_per_token == pytest.approx(built_size(cache), rel=1e-12)


def test_normalized_size_follows_the_model_dtype_for_fp16():
    model = _model("gqa", torch.float32)
    cache = make_cache("fp16", model, 32)
    assert built_size(cache) == normalized_size(parse_spec("fp16"), model.config, torch.float32) == 2.0
    # Quantized methods store fp16 scales whatever the model dtype: the figure does not move.
    for text in ("kivi:bits=2", "xquant:bits=3", "xquant-cl:bits=2"):
        built = make_cache(text, model, 128)
        assert built_size(built) == normalized_size(parse_spec(text), model.config)


WIDE_PAIR = dict(_BASE, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # 2kv = 64 > 32


def test_xquant_cl_accounting_when_2kv_exceeds_hidden():
    model = random_model(ModelConfig.from_dict(WIDE_PAIR), torch.float16, "cpu", seed=0)
    cache = make_cache("xquant-cl:bits=4", model, 64)
    stored, _ = _stored_and_working(cache)
    kv_bits_per_token = 16 * 2 * model.config.kv_dim * model.config.num_layers
    assert stored * 8 / cache.capacity / kv_bits_per_token == pytest.approx(built_size(cache), rel=1e-12)


def test_ragged_rows_count_one_scale_and_zero_per_group_they_hold():
    """SmolLM2-135M itself (30 layers): ceil(C / G) pairs per row of C, the ragged last group a whole pair."""
    smol = ModelConfig.from_dict(dict(CONFIGS["smol"], num_hidden_layers=30))
    mha = ModelConfig.from_dict(dict(CONFIGS["smol-mha"], num_hidden_layers=30))
    for bits in (2, 3, 4):
        keys, values = bits + 32 / 128, bits + 32 * 2 / 192  # values: 128 + 64 channels, two pairs per 192
        assert normalized_size(parse_spec(f"xquant:bits={bits}"), smol) == pytest.approx((keys + values) / 2 / 16)
        x = bits + 32 * 5 / 576  # 4·128 + 64 channels, five pairs per 576
        assert normalized_size(parse_spec(f"xquant:bits={bits}"), mha) == pytest.approx(576 * x / (2 * 576) / 16)
    cl = parse_spec("xquant-cl:bits=2,base_bits=4,base_layers=3")
    assert normalized_size(cl, mha) == pytest.approx((3 * (4 + 160 / 576) + 27 * (2 + 160 / 576)) / 30 / 32)
    kivi = parse_spec("kivi:bits=2,group=48,residual=96")  # keys per 48 tokens; values 48 + 16 channels of a head
    assert normalized_size(kivi, smol) == pytest.approx(((2 + 32 / 48) + (2 + 32 * 2 / 64)) / 2 / 16)


@pytest.mark.parametrize("name, text", [case for case in BUILT if case[0].startswith("smol")])
def test_plan_bytes_per_token_are_what_the_built_cache_stores(name, text):
    """`xqinfer plan` sizes a cache from the config alone: per token, exactly the bytes a built one stores."""
    model = _model(name, torch.float16)
    cache = make_cache(text, model, 128)
    stored, _ = _stored_and_working(cache)
    assert bytes_per_token(parse_spec(text), model.config, torch.float16) * cache.capacity == pytest.approx(
        stored, rel=1e-12)


@pytest.mark.parametrize("name, text", [case for case in BUILT if case[0] != "swa"])
def test_plan_residual_bytes_are_the_built_cache_rings(name, text):
    """What `plan` adds per sequence for the full-precision residual is the rings a built cache holds (a ring
    cache aside: its window, not the spec, sizes it)."""
    model = _model(name, torch.float16)
    cache = make_cache(text, model, 512)
    _, working = _stored_and_working(cache)
    assert residual_bytes(parse_spec(text), model.config, torch.float16) == working


MHA_TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 256}
GQA_TINY = {**MHA_TINY, "num_key_value_heads": 2}
REFUSED = [("mha", "xquant-cl:base_layers=5"), ("mha", "xquant:outlier=1"), ("mha", "asymkv:lk=9"),
           ("mha", "xquant-kv:km=5"), ("gqa", "xquant:group=32,residual=48"), ("gqa", "xquant-kv:kq=3,km=3")]


@pytest.mark.parametrize("kind, text", REFUSED)
def test_plan_refuses_every_spec_that_building_the_cache_refuses(kind, text):
    from xqinfer.errors import CacheSpecError
    from xqinfer.plan import plan

    config = ModelConfig.from_dict(MHA_TINY if kind == "mha" else GQA_TINY)
    with pytest.raises(CacheSpecError) as built:
        make_cache(text, random_model(config, torch.float32, "cpu"), 32)
    with pytest.raises(CacheSpecError) as planned:
        plan(config, [text], memory=2**30, context=32)
    assert str(planned.value) == str(built.value)
