"""Ragged per-token groups: a row of C channels that the group g does not divide has ceil(C / g) groups, the last one
shorter (192 channels at g = 128: 128 + 64). Real models need them: SmolLM2-135M's value latents are 192 wide and its
hidden size 576, against the default G = 128 of `xquant` and `xquant-cl`.

- The quantizer against an independent reference written here: a plain loop over groups computing METHODS.md
  section 1 (min, max, scale, codes, x̂) with the module's directed rounding of the stored fp16 zero (down) and
  scale (up) replicated; every bit width, widths 192 / 576 / 100 with groups 128 / 64 / 32 / 7.
- QuantStream with ragged rows: stored buffers equal batch quantization, `simulate`, `write_reconstructed` and the
  shared-codes path (`codes_from`, XQuant-KV) against the reference.
- Every registered method with its default options (and a few ragged variants) runs prefill + decode, and both
  perplexity protocols of `xqinfer.ppl`, on a SmolLM2-shaped random model (GQA, kv_dim 192, hidden 576) and on an MHA
  one with hidden 576; at 8 bits the logits stay close to the fp16 cache's.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from xqinfer import quant
from xqinfer.cache import REGISTRY, make_cache
from xqinfer.cache.stream import QuantStream
from xqinfer.config import ModelConfig
from xqinfer.engine import Engine
from xqinfer.loader import random_model
from xqinfer.ppl import perplexity

from test_caches import _check_stream, _chunks, _stream_data
from test_capture import UNCAPTURABLE, recorded_decode

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")

# SmolLM2-135M's shape (9 query heads over 3 KV heads of 64, hidden 576) with 4 layers instead of 30: enough for
# XQuant-CL's 3 default base layers and a delta layer, and for XQuant-KV's shared pair (1, 2) ... (3, 4).
SMOL = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 4,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 512, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
}
SHAPES = {"smol-gqa": SMOL, "smol-mha": dict(SMOL, num_key_value_heads=9)}


# ------------------------------------------------------------------------------------------------ the reference


def _stored(value: Tensor, direction: float) -> Tensor:
    """float32 `value` as the fp16 next to it on the side of `direction` (-inf: down, +inf: up), back in float32."""
    nearest = value.half()
    wrong_side = nearest.float() > value if direction < 0 else nearest.float() < value
    stepped = torch.nextafter(nearest, torch.full_like(nearest, direction))
    return torch.where(wrong_side, stepped, nearest).float()


def reference_quantize(x: Tensor, bits: int, group: int, eta: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token quantization of x [..., C], one group at a time: (codes, scale, zero, x̂) in float32.

    Groups are g = min(group, C) consecutive channels from channel 0, the last one whatever is left. Scale and zero
    are [..., ceil(C / g)]; x̂ is dequantized with XQuant-KV's calibration `eta` (0: plain).
    """
    levels = 2**bits - 1
    x = x.float()
    channels = x.shape[-1]
    g = min(group, channels)
    codes, scales, zeros, values = [], [], [], []
    for start in range(0, channels, g):
        part = x[..., start : start + g]
        zero = _stored(part.amin(dim=-1, keepdim=True), float("-inf"))
        scale = _stored((part.amax(dim=-1, keepdim=True) - zero) / levels, float("inf"))
        code = torch.where(scale > 0, torch.round((part - zero) / scale).clamp(0, levels), 0.0)
        codes.append(code)
        scales.append(scale)
        zeros.append(zero)
        values.append(code * ((1 - 2 * eta) * scale) + (zero + eta * levels * scale))
    return torch.cat(codes, -1), torch.cat(scales, -1), torch.cat(zeros, -1), torch.cat(values, -1)


def _data(shape: tuple[int, ...], seed: int) -> Tensor:
    """Normal rows with per-channel offsets, sparse outliers and one constant row (a group with max = min)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) + torch.randn(shape[-1], generator=g) * 2.0
    x = torch.where(torch.rand(shape, generator=g) < 0.02, x * 15.0, x)
    x[..., 1, :] = 0.25
    return x


def assert_reconstructs(actual: Tensor, expected: Tensor, x: Tensor) -> None:
    """Equal up to float32 rounding: the same codes and stored parameters, products and sums in another order."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * x.abs().max().item())


# (C, group): ragged last groups of 64, 64, 36, 4, 2 and 2 channels; groups that divide (unchanged) and one wider than
# the row (the whole row, METHODS.md section 1).
WIDTHS = [(192, 128), (576, 128), (100, 64), (100, 32), (100, 7), (576, 7), (192, 64), (100, 1024)]


@pytest.mark.parametrize("channels, group", WIDTHS, ids=[f"C{c}-g{g}" for c, g in WIDTHS])
@pytest.mark.parametrize("bits", quant.BITS)
def test_per_token_groups_match_the_reference(bits, channels, group):
    x = _data((2, 5, channels), seed=bits * 7 + channels + group)
    q = quant.quantize_per_token(x, bits, group)
    g = min(group, channels)
    assert q.group == g and q.scale.shape == (2, 5, math.ceil(channels / g)) == q.zero.shape
    assert q.codes.shape == (2, 5, quant.packed_size(channels, bits)) and q.shape == x.shape
    codes, scale, zero, expected = reference_quantize(x, bits, group)
    assert torch.equal(quant.unpack(q.codes, bits, channels).float(), codes)
    assert torch.equal(q.scale.float(), scale) and torch.equal(q.zero.float(), zero)
    xh = quant.dequantize(q)
    assert_reconstructs(xh, expected, x)
    # The bound the directed rounding buys: every element within half of its own group's stored step.
    step = scale.repeat_interleave(g, dim=-1)[..., :channels]
    assert ((xh - x).abs() <= step * (0.5 + 1e-4) + 1e-6 * x.abs() + 1e-7).all()
    assert torch.equal(quant.Layout(bits, group, "token").simulate(x), xh)
    for eta in (0.1, 1 / 6):
        calibrated = reference_quantize(x, bits, group, eta)[3]
        assert_reconstructs(quant.dequantize(q, eta=eta), calibrated, x)
        assert torch.equal(quant.Layout(bits, group, "token", eta=eta).simulate(x), quant.dequantize(q, eta=eta))


@pytest.mark.parametrize("channels, group", [(192, 128), (100, 32), (100, 7)])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_a_ragged_row_is_its_whole_groups_then_its_last_group_alone(bits, channels, group):
    # What each part gives quantized on its own, bit for bit: the padding leaves no trace.
    x = _data((3, 4, channels), seed=bits)
    whole = quant.quantize_per_token(x, bits, group)
    aligned = channels // group * group
    head = quant.quantize_per_token(x[..., :aligned], bits, group)
    tail = quant.quantize_per_token(x[..., aligned:], bits, group)
    assert tail.scale.shape[-1] == 1
    for name in ("scale", "zero"):
        assert torch.equal(getattr(whole, name), torch.cat((getattr(head, name), getattr(tail, name)), dim=-1))
    codes = quant.unpack(whole.codes, bits, channels)
    assert torch.equal(codes[..., :aligned], quant.unpack(head.codes, bits, aligned))
    assert torch.equal(codes[..., aligned:], quant.unpack(tail.codes, bits, channels - aligned))
    assert torch.equal(quant.dequantize(whole), torch.cat((quant.dequantize(head), quant.dequantize(tail)), dim=-1))


def test_grouping_pads_only_ragged_rows():
    x = _data((2, 3, 192), seed=1)
    view = quant.to_groups(x, 64, "token")
    assert view.shape == (2, 3, 3, 64) and view.data_ptr() == x.data_ptr()  # the one reshape: no copy
    padded = quant.to_groups(x, 128, "token")
    assert padded.shape == (2, 3, 2, 128)
    assert torch.equal(padded[..., 1, :64], x[..., 128:])
    assert (padded[..., 1, 64:] == x[..., -1:]).all()  # copies of the row's last element
    assert torch.equal(quant.from_groups(padded, "token", 192), x)
    assert quant.from_groups(padded, "token").shape == (2, 3, 256)
    assert quant.group_count(192, 128) == 2 and quant.group_count(100, 7) == 15 and quant.group_count(100, 1024) == 1
    assert quant.effective_group(100, 32, "token") == 32 and quant.effective_group(100, 1024, "token") == 100


def test_groups_of_tokens_still_tile():
    with pytest.raises(ValueError, match="not a multiple"):
        quant.effective_group(100, 32, "channel")
    with pytest.raises(ValueError, match="not a multiple"):
        quant.quantize_per_channel(torch.randn(100, 8), 2, 32)


def test_a_trailing_group_of_tokens_is_simulated_over_the_tokens_it_has():
    # The sim protocol reads a window whose length need not be a multiple of the group: its last group is shorter.
    x = _data((100, 8), seed=5)
    simulated = quant.Layout(2, 32, "channel").simulate(x)
    whole = quant.dequantize(quant.quantize_per_channel(x[:96], 2, 32))
    tail = quant.dequantize(quant.quantize_per_channel(x[96:], 2, 32))  # one group of the 4 tokens left
    assert torch.equal(simulated, torch.cat((whole, tail)))


@pytest.mark.parametrize("bits", quant.BITS)
def test_ragged_tokens_quantized_one_at_a_time_equal_the_batch(bits):
    x = _data((2, 9, 100), seed=3).to(torch.bfloat16)
    whole = quant.quantize_per_token(x, bits, 32)
    parts = [quant.quantize_per_token(x[..., t : t + 1, :], bits, 32) for t in range(x.shape[-2])]
    for name in ("codes", "scale", "zero"):
        assert torch.equal(torch.cat([getattr(p, name) for p in parts], dim=-2), getattr(whole, name)), name


# ------------------------------------------------------------------------------------------------ streams

# bits, channels, group, residual, capacity (a ring of 48 slots for 100 tokens, or room for all of them)
STREAMS = [(2, 20, 8, 0, 128), (3, 20, 8, 5, 48), (4, 100, 32, 12, 128), (8, 192, 128, 0, 48), (1, 100, 7, 16, 128)]


@pytest.mark.parametrize("chunking", ["single", "uneven"])
@pytest.mark.parametrize("bits, channels, group, residual, capacity", STREAMS)
def test_ragged_stream_equals_batch(bits, channels, group, residual, capacity, chunking):
    lead, length = (2, 3), 100
    dtype = torch.float16 if bits == 3 else torch.float32
    x = _stream_data(lead, length, channels, dtype, seed=bits * 31 + group)
    stream = QuantStream(lead, capacity, channels, bits, group, "token", residual, dtype, CPU)
    assert stream.scale.shape == (*lead, capacity, math.ceil(channels / min(group, channels))) == stream.zero.shape
    n = 0
    for i, size in enumerate(_chunks(chunking, length)):
        stream.write(x[..., n : n + size, :], torch.arange(n, n + size))
        n += size
        if i % 9 == 4 or n == length:
            _check_stream(stream, x, n, bits, group, "token", residual)


@pytest.mark.parametrize("bits, channels, group", [(4, 192, 128), (2, 100, 7)])
def test_ragged_stream_simulates_and_reconstructs_what_it_reads(bits, channels, group):
    lead, length = (2,), 40
    x = _stream_data(lead, length, channels, torch.float32, seed=5)
    stream = QuantStream(lead, 64, channels, bits, group, "token", 0, torch.float32, CPU, eta=0.05)
    expected = reference_quantize(x, bits, group, eta=0.05)[3]
    assert_reconstructs(stream.simulate(x), expected, x)
    reconstructed = torch.cat([stream.write_reconstructed(x[..., :25, :], torch.arange(25)),
                               stream.write_reconstructed(x[..., 25:, :], torch.arange(25, length))], dim=-2)
    assert_reconstructs(reconstructed, expected, x)
    slot_positions = torch.where(torch.arange(64) < length, torch.arange(64), -1)
    assert torch.equal(stream.read(torch.tensor(length), slot_positions)[..., :length, :], reconstructed)


@pytest.mark.parametrize("channels, group", [(192, 128), (100, 32)])
def test_ragged_shared_codes_read_the_partners_codes_with_their_own_scales(channels, group):
    """XQuant-KV's shared layer: its partner's codes, its own min/max scale and zero, calibrated; the stream path
    (`read` after the partner's) and the sim path (`simulate` after the partner's) alike."""
    lead, length, bits, eta = (2,), 30, 2, 0.045
    first, second = (_stream_data(lead, length, channels, torch.float32, seed=s) for s in (1, 2))
    partner = QuantStream(lead, 32, channels, bits, group, "token", 0, torch.float32, CPU, eta=eta)
    shared = QuantStream(lead, 32, channels, bits, group, "token", 0, torch.float32, CPU, eta=eta, codes_from=partner)
    assert shared.codes is None and shared.scale.shape == partner.scale.shape
    codes = reference_quantize(first, bits, group)[0]
    _, scale, zero, _ = reference_quantize(second, bits, group)
    g = min(group, channels)
    scale, zero = (t.repeat_interleave(g, dim=-1)[..., :channels] for t in (scale, zero))
    expected = codes * ((1 - 2 * eta) * scale) + (zero + eta * (2**bits - 1) * scale)

    partner.write(first, torch.arange(length))
    shared.write(second, torch.arange(length))
    slot_positions = torch.where(torch.arange(32) < length, torch.arange(32), -1)
    partner.read(torch.tensor(length), slot_positions)
    read = shared.read(torch.tensor(length), slot_positions)[..., :length, :]
    assert_reconstructs(read, expected, second)
    partner.simulate(first)
    assert_reconstructs(shared.simulate(second), expected, second)


# ------------------------------------------------------------------------------------------------ every method

# The defaults of every registered method, then ragged variants: KIVI and XQuant-KV values in heads of 64 at g = 48
# (48 + 16), XQuant at g = 7 (per-token rows of 27 groups of 7 + 3 on GQA, 82 + 2 on MHA), XQuant-CL at g = 100.
METHODS = sorted(REGISTRY) + ["kivi:group=48,residual=96", "xquant-kv:group=48,residual=96",
                              "xquant:group=7,residual=0", "xquant-cl:group=100"]


@functools.lru_cache(maxsize=None)
def _model(shape: str):
    with torch.inference_mode(False):
        return random_model(ModelConfig.from_dict(SHAPES[shape]), torch.float32, "cpu", seed=0)


def _ids(count: int, seed: int = 0) -> list[int]:
    return torch.randint(0, SMOL["vocab_size"], (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits(shape: str, spec: str, prompt: int = 150, steps: int = 4) -> Tensor:
    """Logits after a prefill and after each teacher-forced decode step: [1 + steps, vocab].

    150 tokens: past the default residual of 128 and the first key group of 128, so both are read quantized.
    """
    engine = Engine(_model(shape), spec, capacity=256)
    ids = _ids(prompt + steps)
    logits = [engine.prefill(ids[:prompt])]
    for token in ids[prompt:]:
        logits.append(engine.decode(torch.tensor([token])))
    return torch.cat(logits)


@pytest.mark.parametrize("spec", METHODS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_method_runs_prefill_and_decode_on_smollm2_widths(shape, spec):
    logits = _logits(shape, spec)
    assert logits.shape == (5, SMOL["vocab_size"]) and torch.isfinite(logits).all()


@pytest.mark.parametrize("shape, spec", [("smol-gqa", "xquant"), ("smol-mha", "xquant"), ("smol-mha", "xquant-cl"),
                                         ("smol-gqa", "xquant-kv:group=48,residual=96")])
@torch.inference_mode()
def test_ragged_decode_steps_stay_capturable(shape, spec):
    """What tests/test_capture.py checks of every method, on ragged rows: each step of a span bucket issues the first
    step's operations with the same scalars and buffers, and none reads a tensor on the host."""
    engine = Engine(_model(shape), spec, capacity=512)
    engine.cache.host_steps = False  # the path a CUDA step takes: no host reads, no kernel outside torch
    engine.prefill(_ids(150))
    traces = []
    for token in _ids(3, seed=1):
        _, recorder = recorded_decode(engine, torch.tensor([token]))
        names = {name for name, _ in recorder.ops}
        assert not ({name.split(".")[0] for name in names} | names) & UNCAPTURABLE
        traces.append(recorder.ops)
    assert traces[1] == traces[0] and traces[2] == traces[0]


def test_the_default_group_is_ragged_on_these_widths():
    gqa = make_cache("xquant", _model("smol-gqa"), 256).layers[0]
    assert gqa.value_latents.group == 128 and gqa.value_latents.scale.shape[-1] == 2  # 192 = 128 + 64
    mha = make_cache("xquant", _model("smol-mha"), 256).layers[0]
    assert mha.x.scale.shape[-1] == 5  # 576 = 4 · 128 + 64
    cl = make_cache("xquant-cl", _model("smol-mha"), 256).layers[3]
    assert cl.stream.scale.shape[-1] == 5


@pytest.mark.parametrize("spec", ["kivi:bits=8,group=48,residual=0", "xquant:bits=8,residual=0",
                                  "xquant-cl:bits=8,base_bits=8"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_ragged_reads_track_fp16(shape, spec):
    """With everything read back quantized (residual 0), 8-bit codes keep every logit close to the fp16 cache's."""
    logits, reference = _logits(shape, spec), _logits(shape, "fp16")
    relative = ((logits - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()
    assert relative <= 0.03, f"{spec}: relative logit error {relative:.4f}"


def _fake_llm(shape: str) -> SimpleNamespace:
    """What `perplexity` reads of an LLM, with a byte tokenizer over the random model's vocabulary."""
    model = _model(shape)
    tokenizer = SimpleNamespace(encode=lambda text, add_bos=False: [1] * add_bos + [b % 512 for b in text.encode()])
    return SimpleNamespace(model=model, config=model.config, tokenizer=tokenizer, name=shape, dtype=torch.float32,
                           device=CPU)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ragged") / "text.txt"
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away", "home"]
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (400,), generator=g).tolist()))
    return path


@pytest.mark.parametrize("protocol, chunk", [("sim", 1), ("stream", 40)])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_perplexity_of_every_method_under_both_protocols(shape, protocol, chunk, dataset):
    # ctx 160: a sim window writes more than one key group of 128 in one chunk (and the XQuant GQA capacity is 256).
    report = perplexity(_fake_llm(shape), dataset, METHODS, ctx=160, protocol=protocol, chunk=chunk, limit=1)
    assert report.scores[0].spec.method == "fp16" and len(report.scores) == len(METHODS)
    for score in report.scores:
        assert score.tokens == 159 and math.isfinite(score.ppl), str(score.spec)


def test_per_token_sim_equals_stream_at_chunk_1_with_ragged_rows(dataset):
    """Per-token groups depend on one token only, so without a residual window the two protocols read the same values
    (docs/methods.md): X rows of 576 (MHA XQuant, XQuant-CL) and the value latents' rows of 192 are all ragged."""
    specs = {"smol-mha": ["xquant:residual=0", "xquant-cl"], "smol-gqa": ["xquant-cl"]}
    for shape, methods in specs.items():
        runs = [perplexity(_fake_llm(shape), dataset, methods, ctx=32, protocol=protocol, chunk=1, limit=1)
                for protocol in ("sim", "stream")]
        for sim, stream in zip(*(run.scores for run in runs), strict=True):
            assert stream.ppl == pytest.approx(sim.ppl, rel=1e-4), str(sim.spec)
