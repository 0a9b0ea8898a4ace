"""Cache methods end to end: exactness with quantization off, QuantStream streaming == batch quantization, static
buffers during decode, greedy agreement with the fp16 cache on a real model, and refused specs.

"Quantization off" is the test-only hook of `xqinfer.cache.stream`: a CacheSpec built directly (parse_spec refuses it)
with bits=16 (and base_bits=16 for xquant-cl) makes every QuantStream store its values as they are. Every method must
then give the fp16 cache's logits, which checks all of its plumbing (slots, rings, RoPE at the right positions, the
V absorption, the SVD latents, the cross-layer accumulator) independently of the quantizer.
"""

from __future__ import annotations

import functools

import pytest
import torch

import xqinfer
from xqinfer import quant
from xqinfer.accounting import bits_label, normalized_size
from xqinfer.cache import make_cache
from xqinfer.cache.base import EMPTY_SLOT, CacheSpec, parse_spec
from xqinfer.cache.stream import FULL_PRECISION, QuantStream
from xqinfer.cache.xquant_cl import stored_basis
from xqinfer.config import ModelConfig
from xqinfer.engine import Engine
from xqinfer.errors import CacheSpecError, XQInferWarning
from xqinfer.loader import random_model
from xqinfer.sampling import SamplingParams

from conftest import SHARED

pytestmark = pytest.mark.usefixtures("single_thread")

STORIES = SHARED / "models" / "stories260K"
AIDREAMS = SHARED / "models" / "aidreams260K"
TEXT = SHARED / "data" / "tinystories-sample.txt"

_BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 97,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
CONFIGS = {
    # MHA: XQuant caches X itself.
    "mha": dict(_BASE, hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
    # GQA with 2·kv_dim = 32 < hidden = 64: the XQuant-CL basis U_kv is rank-deficient (X̂ is a projection of X).
    "gqa": dict(_BASE, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    # Mistral GQA whose 40-token sliding window is far shorter than the sequences below: the caches are rings.
    "swa": dict(_BASE, architectures=["MistralForCausalLM"], hidden_size=64, num_attention_heads=8,
                num_key_value_heads=2, head_dim=8, sliding_window=40),
}
REAL = {"aidreams": AIDREAMS, "stories": STORIES}


def _need(path):
    if not path.exists():
        pytest.skip(f"shared asset {path} is absent (tests expect ../shared beside the repository)")
    return path


@functools.lru_cache(maxsize=None)
def _llm(name: str):
    return xqinfer.load(_need(REAL[name]), dtype="fp32", device="cpu")


@functools.lru_cache(maxsize=None)
def _model(name: str):
    if name in CONFIGS:
        return random_model(ModelConfig.from_dict(CONFIGS[name]), torch.float32, "cpu", seed=0)
    return _llm(name).model


@functools.lru_cache(maxsize=None)
def _text_ids(name: str) -> tuple[int, ...]:
    return tuple(_llm(name).tokenizer.encode(_need(TEXT).read_text(encoding="utf-8")))


def _tokens(name: str, count: int, seed: int = 0) -> list[int]:
    """Teacher-forced inputs: real text for the real models, seeded random ids for the random ones."""
    if name in REAL:
        ids = _text_ids(name)
        assert len(ids) >= count
        return list(ids[:count])
    vocab = CONFIGS[name]["vocab_size"]
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def quantization_off(text: str) -> CacheSpec:
    """The test-only hook: the method of `text` with its quantizer switched off (values stored as they are)."""
    spec = parse_spec(text)
    options = {**spec.options, "bits": FULL_PRECISION}
    if "base_bits" in options:
        options["base_bits"] = FULL_PRECISION
    return CacheSpec(spec.method, options)


def _run(model, spec, prompt: list[int], steps: list[int], chunk: int) -> torch.Tensor:
    """Logits after the prefill and after each teacher-forced decode step: [1 + len(steps), vocab]."""
    engine = Engine(model, spec, capacity=len(prompt) + len(steps), prefill_chunk=chunk)
    logits = [engine.prefill(prompt)]
    for token in steps:
        logits.append(engine.decode(torch.tensor([token])))
    return torch.cat(logits)


# ------------------------------------------------------------------------------------------- 1. exactness, quant off

# Pairwise coverage of the options that change the computation; the full product runs on the GQA model.
# With quantization off `residual` changes nothing that is computed (it only decides what is read back in full
# precision), so it is varied to show that every residual setting builds and runs, not cross-multiplied everywhere.
KIVI_SPECS = [
    "kivi:prerope=0,group=8,residual=0",
    "kivi:prerope=1,group=8,residual=16",
]
XQUANT_SPECS = [
    "xquant:absorb=0,group=8,residual=16",
    "xquant:absorb=1,group=8,residual=0",
]
XQUANT_GQA_SPECS = [
    "xquant:absorb=1,outlier=1,group=8,residual=16",
]
CL_SPECS = [
    "xquant-cl:absorb=0,base_layers=1",
    "xquant-cl:absorb=1,base_layers=3",
    # The shaped basis E, D (and the clip search, which quantization off bypasses): E·D is still U_kv·U_kvᵀ.
    "xquant-cl:absorb=1,base_layers=1,key_weight=0.5,sigma_power=0.5,rotate=1,clip=1",
]
FULL_PRODUCT = (
    [f"kivi:prerope={p},group=8,residual={r}" for p in (0, 1) for r in (0, 16)]
    + [f"xquant:absorb={a},outlier={o},group=8,residual={r}" for a in (0, 1) for o in (0, 1) for r in (0, 16)]
    + [f"xquant-cl:absorb={a},base_layers={b}" for a in (0, 1) for b in (1, 3)]
)

# Case: model, prompt length, decode steps, prefill chunk, specs.
_MHA_SPECS = KIVI_SPECS + XQUANT_SPECS + CL_SPECS
_GQA_SPECS = KIVI_SPECS + XQUANT_SPECS + XQUANT_GQA_SPECS + CL_SPECS
EXACT_CASES = {
    "mha": ("mha", 40, 64, 1024, _MHA_SPECS),
    "gqa": ("gqa", 40, 64, 1024, FULL_PRODUCT),
    "mha-chunked": ("mha", 60, 64, 16, _MHA_SPECS),
    "gqa-chunked": ("gqa", 60, 64, 16, _GQA_SPECS),
    # The ring wraps during decode only (prompt shorter than the window).
    "swa-decode": ("swa", 24, 64, 1024, _GQA_SPECS),
    # A 100-token prompt: prefill chunks write over ring slots the same chunk's first queries still see.
    "swa-prefill": ("swa", 100, 64, 1024, _GQA_SPECS),
    "aidreams": ("aidreams", 48, 64, 1024, _MHA_SPECS),
    "stories": ("stories", 48, 64, 1024, _GQA_SPECS),
}

def _exact_params():
    return [
        pytest.param(case, text, id=f"{case}-{text}")
        for case, (_, _, _, _, specs) in EXACT_CASES.items()
        for text in specs
    ]


@functools.lru_cache(maxsize=None)
def _fp16_reference(case: str) -> torch.Tensor:
    name, prompt_len, steps, chunk, _ = EXACT_CASES[case]
    ids = _tokens(name, prompt_len + steps)
    return _run(_model(name), parse_spec("fp16"), ids[:prompt_len], ids[prompt_len:], chunk)


@pytest.mark.parametrize("case, text", _exact_params())
def test_quantization_off_equals_fp16(case, text):
    name, prompt_len, steps, chunk, _ = EXACT_CASES[case]
    model = _model(name)
    ids = _tokens(name, prompt_len + steps)
    reference = _fp16_reference(case)
    logits = _run(model, quantization_off(text), ids[:prompt_len], ids[prompt_len:], chunk)
    assert logits.shape == reference.shape
    error = (logits - reference).abs().amax(dim=-1)
    worst = int(error.argmax())
    assert float(error.max()) <= 1e-4, f"step {worst} (0 = prefill) differs by {float(error.max()):.3g}"


def test_exactness_cases_exercise_what_they_claim():
    gqa = _model("gqa").config
    assert gqa.is_gqa and 2 * gqa.kv_dim < gqa.hidden_size  # rank-deficient U_kv
    assert not _model("mha").config.is_gqa
    swa = _model("swa").config
    assert swa.sliding_window == 40 and EXACT_CASES["swa-prefill"][1] > 2 * swa.sliding_window
    engine = Engine(_model("swa"), quantization_off("kivi:group=8,residual=0"), capacity=164)
    assert engine.cache.is_ring and engine.cache.capacity < 164


def test_passthrough_read_is_not_a_view_of_the_buffer():
    stream = QuantStream((1,), 4, 3, FULL_PRECISION, 1, "token", 0, torch.float32, torch.device("cpu"))
    stream.write(torch.ones(1, 4, 3), torch.arange(4))
    slots = torch.arange(4)
    before = stream.read(torch.tensor(4), slots)
    expected = before.clone()
    stream.write(torch.full((1, 1, 3), 7.0), torch.tensor([4]))
    assert torch.equal(before, expected), "what read() returned changed when the next token was written"


RING_8BIT = [
    ("kivi:bits=8,group=8,residual=0", 1024),
    ("kivi:bits=8,group=8,residual=16,prerope=1", 20),
    ("xquant:bits=8,group=8,residual=16,outlier=1", 1024),
    ("xquant:bits=8,group=8,residual=0,absorb=0", 20),
    ("xquant-cl:bits=8,base_bits=8", 20),
]


@pytest.mark.parametrize("text, chunk", RING_8BIT)
def test_8bit_ring_prefill_tracks_fp16(text, chunk):
    """The real (quantized) read path does not alias the buffers: prefill chunks that wrap the sliding-window ring
    stay within 8-bit noise of fp16 (measured <= 1e-2; reading overwritten history gives 0.2 and more)."""
    model = _model("swa")
    ids = _tokens("swa", 164)
    reference = _fp16_reference("swa-prefill")
    chunked = reference if chunk == 1024 else _run(model, parse_spec("fp16"), ids[:100], ids[100:], chunk)
    logits = _run(model, parse_spec(text), ids[:100], ids[100:], chunk)
    assert (chunked - reference).abs().max() <= 1e-4
    assert float((logits - chunked).abs().max()) <= 0.05


# ------------------------------------------------------------------------------------------- 2. streaming == batch


def _stream_data(lead, length, channels, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, length, channels, generator=g)
    x = x + torch.randn(channels, generator=g) * 2.0  # offsets, so groups are not centred on zero
    outliers = torch.rand(x.shape, generator=g) < 0.02
    x = torch.where(outliers, x * 15.0, x)
    x[..., 5, :] = 0.25  # a constant token (one per-token group with max = min)
    return x.to(dtype)


def _chunks(kind: str, total: int) -> list[int]:
    if kind == "single":
        return [1] * total
    pattern = [5, 1, 13, 2, 7, 1, 1, 11, 3, 8]
    sizes, i = [], 0
    while sum(sizes) < total:
        sizes.append(min(pattern[i % len(pattern)], total - sum(sizes)))
        i += 1
    return sizes


def _check_stream(stream: QuantStream, x: torch.Tensor, n: int, bits: int, group: int, axis: str, residual: int):
    capacity = stream.capacity
    held = range(max(0, n - capacity), n)
    slot_positions = torch.full((capacity,), EMPTY_SLOT, dtype=torch.long)
    for p in held:
        slot_positions[p % capacity] = p
    g = stream.group
    assert g == min(group, x.shape[-1] if axis == "token" else group)

    if axis == "token":
        batch = quant.quantize_per_token(x[..., :n, :], bits, group)
        for p in held:
            s = p % capacity
            assert torch.equal(stream.codes[..., s, :], batch.codes[..., p, :]), f"codes of token {p}"
            assert torch.equal(stream.scale[..., s, :], batch.scale[..., p, :]), f"scale of token {p}"
            assert torch.equal(stream.zero[..., s, :], batch.zero[..., p, :]), f"zero of token {p}"
        exact_from = n - residual
    else:
        closed = n // g * g
        batch = quant.quantize_per_channel(x[..., :closed, :], bits, g) if closed else None
        first_group = max(0, closed - capacity) // g
        for k in range(first_group, closed // g):
            gs = k % (capacity // g)
            assert torch.equal(stream.scale[..., gs, :], batch.scale[..., k, :]), f"scale of group {k}"
            assert torch.equal(stream.zero[..., gs, :], batch.zero[..., k, :]), f"zero of group {k}"
            for p in range(k * g, (k + 1) * g):
                assert torch.equal(stream.codes[..., p % capacity, :], batch.codes[..., p, :]), f"codes of token {p}"
        flush = residual or g
        exact_from = n // flush * flush
        assert exact_from <= closed

    values = stream.read(torch.tensor(n), slot_positions)
    assert values.shape == (*x.shape[:-2], capacity, x.shape[-1]) and values.dtype == x.dtype
    dequantized = quant.dequantize(batch, x.dtype) if batch is not None else None
    for p in held:
        got = values[..., p % capacity, :]
        if p >= exact_from:
            assert torch.equal(got, x[..., p, :]), f"token {p} should be read in full precision (n={n})"
        else:
            assert torch.equal(got, dequantized[..., p, :]), f"token {p} should be read dequantized (n={n})"
    # Before the buffer wraps, a read of the first slots only (a span bucket) gives those slots of the full read.
    span = -(-max(n, 1) // g) * g
    if n <= capacity and span < capacity:
        partial = stream.read(torch.tensor(n), slot_positions[:span])
        assert torch.equal(partial[..., :n, :], values[..., :n, :]), f"a read of {span} slots (n={n})"


STREAM_CASES = [
    # axis, bits, group, residual, capacity
    ("token", 2, 8, 0, 128),
    ("token", 3, 16, 5, 128),  # group = the whole 16 channels
    ("token", 4, 32, 12, 32),  # group clipped to the 16 channels; ring
    ("token", 8, 4, 0, 32),
    ("token", 3, 8, 7, 48),
    ("channel", 2, 8, 0, 128),
    ("channel", 3, 8, 16, 128),
    ("channel", 4, 4, 8, 32),
    ("channel", 8, 8, 0, 32),
    ("channel", 3, 4, 0, 48),
    ("channel", 2, 8, 16, 48),
    # A residual longer than the buffer (and than any span read): the ring is bigger than what it overrides.
    ("token", 2, 8, 40, 32),
    ("channel", 2, 8, 48, 32),
]


@pytest.mark.parametrize("chunking", ["single", "uneven"])
@pytest.mark.parametrize("axis, bits, group, residual, capacity", STREAM_CASES)
def test_stream_equals_batch(axis, bits, group, residual, capacity, chunking):
    lead, channels, length = (2, 3), 16, 100
    dtype = torch.float16 if bits == 3 else torch.float32
    x = _stream_data(lead, length, channels, dtype, seed=bits * 31 + group)
    stream = QuantStream(lead, capacity, channels, bits, group, axis, residual, dtype, torch.device("cpu"))
    assert length > capacity or capacity == 128
    n, checks = 0, 0
    for i, size in enumerate(_chunks(chunking, length)):
        stream.write(x[..., n : n + size, :], torch.arange(n, n + size))
        n += size
        if chunking == "uneven" or i % 7 == 3 or n == length:
            _check_stream(stream, x, n, bits, group, axis, residual)
            checks += 1
    assert n == length and checks > 5


def test_stream_chunk_spanning_several_groups_equals_batch():
    """One write that opens mid-group, closes three groups and leaves one open."""
    lead, channels, g = (1,), 8, 4
    x = _stream_data(lead, 30, channels, torch.float32, seed=7)
    stream = QuantStream(lead, 64, channels, 2, g, "channel", 0, torch.float32, torch.device("cpu"))
    stream.write(x[..., :2, :], torch.arange(2))
    stream.write(x[..., 2:15, :], torch.arange(2, 15))
    _check_stream(stream, x, 15, 2, g, "channel", 0)


@pytest.mark.parametrize("chunks", [[150], [256], [1, 255], [100, 156]])
def test_a_chunk_near_the_capacity_keeps_the_groups_it_closes(chunks):
    """The groups a chunk may touch (it can open mid-group) are a static count, capped at the buffer's: 150 tokens
    into 256 slots at G = 128 would otherwise quantize a third group on slots 0..127, whose masked store (the group
    stays open) undid the store of the first one there."""
    lead, channels, g = (1,), 8, 128
    x = _stream_data(lead, 256, channels, torch.float32, seed=9)
    stream = QuantStream(lead, 256, channels, 4, g, "channel", 0, torch.float32, torch.device("cpu"))
    n = 0
    for size in chunks:
        stream.write(x[..., n : n + size, :], torch.arange(n, n + size))
        n += size
        _check_stream(stream, x, n, 4, g, "channel", 0)


@pytest.mark.parametrize("chunking", ["single", "uneven"])
def test_streams_sharing_a_steps_index_work_store_and_read_what_unshared_ones_do(chunking):
    """`shared` only saves work: two layers' K (per channel) and V (per token) streams keeping one dict per step hold
    and read exactly what the same streams without it do."""
    lead, channels, length, capacity = (2, 3), 16, 100, 128
    x = _stream_data(lead, length, channels, torch.float32, seed=5)

    def layers() -> list[QuantStream]:
        return [QuantStream(lead, capacity, channels, 2, 8, axis, 16, torch.float32, torch.device("cpu"))
                for axis in ("channel", "token", "channel", "token")]

    sharing, alone = layers(), layers()
    slot_positions = torch.full((capacity,), EMPTY_SLOT, dtype=torch.long)
    n = 0
    for size in _chunks(chunking, length):
        positions = torch.arange(n, n + size)
        slot_positions[positions] = positions
        shared: dict = {}
        for k, (a, b) in enumerate(zip(sharing, alone)):
            y = x[..., n : n + size, :] * (k + 1)
            a.write(y, positions, shared)
            b.write(y, positions)
        n += size
        for a, b in zip(sharing, alone):
            assert torch.equal(a.read(torch.tensor(n), slot_positions, shared), b.read(torch.tensor(n), slot_positions))
    for a, b in zip(sharing, alone):
        assert all(torch.equal(t, u) for t, u in zip(a.tensors(), b.tensors()))


# ------------------------------------------------------------------------------------------- 3. static buffers

STATIC_CASES = [
    ("gqa", "fp16"),
    ("gqa", "kivi:bits=2,group=8,residual=16"),
    ("gqa", "kivi:bits=3,group=8,residual=0,prerope=1"),
    ("gqa", "xquant:bits=4,group=8,residual=8"),
    ("gqa", "xquant:bits=3,group=8,residual=0,outlier=1,absorb=0"),
    ("gqa", "xquant-cl:bits=2,base_layers=1"),
    ("mha", "xquant:bits=3,group=32,residual=4"),
    ("mha", "xquant-cl:bits=3,absorb=0"),
    # Rings: a 50-token prompt plus 20 steps wraps the 40-token window's buffers.
    ("swa", "fp16"),
    ("swa", "kivi:bits=2,group=8,residual=8"),
    ("swa", "xquant:bits=4,group=8,residual=0"),
    ("swa", "xquant-cl:bits=2"),
]


@pytest.mark.parametrize("name, text", STATIC_CASES)
def test_decode_reallocates_nothing(name, text):
    model = _model(name)
    ids = _tokens(name, 70, seed=3)
    engine = Engine(model, text, capacity=70)
    tensors = engine.cache.tensors()
    pointers = [t.data_ptr() for t in tensors]
    shapes = [t.shape for t in tensors]
    nbytes = engine.cache.nbytes()
    engine.prefill(ids[:50])
    for token in ids[50:]:
        engine.decode(torch.tensor([token]))
    after = engine.cache.tensors()
    assert [t.data_ptr() for t in after] == pointers
    assert [t.shape for t in after] == shapes
    assert engine.cache.nbytes() == nbytes
    assert engine.length == 70


# ------------------------------------------------------------------------------------------- 4. greedy agreement

GREEDY = SamplingParams(temperature=0)
PROMPT = "Once upon a time"
NEW_TOKENS = 100

# spec -> floor on the fraction of the 100 positions whose greedy token equals fp16's. Measured on CPU (fp32):
# the default residual (128) holds all 105 tokens in full precision, hence 1.00; with residual=0 (and for
# xquant-cl, which has no residual window) quantization bites: 4-bit KIVI/KIVI*/XQuant first diverge at token 57
# (0.58), XQuant-CL 4-bit at token 31 (0.34). After the first divergence the two texts differ, so the floors sit
# well under the measurements and only catch a method that breaks down.
AGREEMENT_FLOORS = {
    "kivi:bits=4": 0.9,
    "kivi:bits=4,prerope=1": 0.9,
    "xquant:bits=4": 0.9,
    "xquant-cl:bits=4": 0.2,
    "kivi:bits=4,residual=0": 0.3,
    "kivi:bits=4,prerope=1,residual=0": 0.3,
    "xquant:bits=4,residual=0,group=32": 0.3,
}


@functools.lru_cache(maxsize=None)
def _greedy(cache: str) -> tuple[int, ...]:
    result = xqinfer.generate(_llm("stories"), PROMPT, max_tokens=NEW_TOKENS, sampling=GREEDY, cache=cache, chat=False)
    return tuple(result.tokens)


def _agreement(tokens, reference) -> tuple[float, int]:
    same = sum(a == b for a, b in zip(tokens, reference))
    first = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return same / len(reference), first


@pytest.mark.parametrize("cache", ["xquant:bits=8", "xquant:bits=8,residual=0,group=32"])
def test_8bit_xquant_greedy_equals_fp16(cache):
    reference = _greedy("fp16")
    assert len(reference) == NEW_TOKENS
    assert _greedy(cache) == reference


@pytest.mark.parametrize("cache", list(AGREEMENT_FLOORS))
def test_4bit_greedy_agreement_with_fp16(cache):
    reference = _greedy("fp16")
    tokens = _greedy(cache)
    agreement, first = _agreement(tokens, reference)
    text = _llm("stories").tokenizer.decode(list(tokens))
    print(f"{cache}: agreement {agreement:.2f} with fp16 over {NEW_TOKENS} greedy tokens, first divergence {first}")
    assert len(tokens) == NEW_TOKENS and text.strip()
    assert agreement >= AGREEMENT_FLOORS[cache]


# ------------------------------------------------------------------------------------------- 5. refused specs

PARSE_REFUSALS = [
    ("xquant:bits=5", ["bits=5", "accepted", "2, 3, 4, 8"]),
    ("kivi:group=0", ["group=0", "accepted", ">= 1"]),
    ("xquant:foo=1", ["foo", "accepted", "bits", "group", "residual", "outlier", "absorb"]),
    ("nosuchmethod:bits=2", ["nosuchmethod", "accepted", "fp16", "kivi", "xquant", "xquant-cl"]),
    ("kivi:residual=20,group=32", ["residual", "multiple of group"]),
    ("xquant:bits=four", ["bits", "accepted", "2, 3, 4, 8"]),
    ("kivi:prerope=2", ["prerope", "accepted", "0, 1"]),
    ("xquant-cl:base_layers=0", ["base_layers", "accepted", ">= 1"]),
    ("fp16:bits=4", ["bits", "accepted"]),
    # A repeated key used to keep its last value silently (`bits=2,bits=4` ran 4-bit).
    ("kivi:bits=2,bits=4", ["kivi", "'bits'", "more than once"]),
    ("xquant:group=32, group=32", ["'group'", "more than once"]),
    ("xquant-cl:more_bits=3+x", ["more_bits='3+x'", "joined by '+'"]),
    ("xquant-cl:bits=3,more_bits=5,fewer_bits=4+5", ["layer 5", "both"]),
    ("xquant-cl:bits=4,more_bits=5", ["more_bits", "5-bit"]),
    ("xquant-cl:bits=1,fewer_bits=5", ["fewer_bits", "0-bit"]),
]


@pytest.mark.parametrize("text, fragments", PARSE_REFUSALS)
def test_bad_spec_is_refused_when_parsed(text, fragments):
    with pytest.raises(CacheSpecError) as info:
        parse_spec(text)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


BUILD_REFUSALS = [
    ("mha", "xquant-cl:base_layers=99", ["base_layers=99", "accepted", "1..4"]),
    ("mha", "xquant:outlier=1", ["outlier=1", "MHA"]),
    # Per-channel latents (GQA keys) close R tokens at a time: R must be a multiple of the group.
    ("gqa", "xquant:group=16,residual=8", ["residual=8", "multiple", "16"]),
    ("mha", "xquant-cl:base_layers=2,more_bits=1", ["more_bits", "layer 1", "not a delta layer", "2..3"]),
    ("mha", "xquant-cl:fewer_bits=3+4", ["fewer_bits", "layer 4", "3..3"]),
]


@pytest.mark.parametrize("name, text, fragments", BUILD_REFUSALS)
def test_bad_spec_is_refused_when_the_cache_is_built(name, text, fragments):
    spec = parse_spec(text)
    with pytest.raises(CacheSpecError) as info:
        make_cache(spec, _model(name), 64)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_uneven_delta_bits_are_the_widths_they_name():
    # Every delta layer one bit up is the next width everywhere: same streams, same logits, same size.
    model = _model("gqa")
    delta_layers = "+".join(map(str, range(1, model.config.num_layers)))
    uneven = make_cache(f"xquant-cl:bits=2,base_layers=1,more_bits={delta_layers}", model, 32)
    assert [layer.stream.bits for layer in uneven.layers] == [4] + [3] * (model.config.num_layers - 1)
    prompt, steps = _tokens("gqa", 20), _tokens("gqa", 6, seed=1)
    with torch.inference_mode():
        assert torch.equal(_run(model, f"xquant-cl:bits=2,base_layers=1,more_bits={delta_layers}", prompt, steps, 8),
                           _run(model, "xquant-cl:bits=3,base_layers=1", prompt, steps, 8))
    as_three = parse_spec("xquant-cl:bits=3,base_layers=1")
    assert normalized_size(uneven.spec, model.config) == normalized_size(as_three, model.config)
    # One up and one down: the same memory as none, and the label says so.
    swapped = parse_spec("xquant-cl:bits=3,base_layers=1,more_bits=1,fewer_bits=2")
    assert normalized_size(swapped, model.config) == normalized_size(as_three, model.config)
    assert bits_label(swapped, model.config) == "3 (first 1 at 4; 1 at 4, 1 at 2)"


def test_base_layers_up_to_the_layer_count_is_accepted():
    layers = _model("mha").config.num_layers
    cache = make_cache(f"xquant-cl:base_layers={layers}", _model("mha"), 32)
    assert len(cache.layers) == layers


@pytest.mark.parametrize("text", ["xquant:bits=5", "kivi:group=0", "nosuchmethod", "xquant:foo=1"])
def test_engine_refuses_bad_specs_too(text):
    with pytest.raises(CacheSpecError):
        Engine(_model("mha"), text, capacity=32)


@pytest.mark.parametrize("name, spec, residual", [
    ("mha", "kivi:group=8,residual=100000", 80),  # capacity 72 (70 in whole groups of 8) + one group
    ("gqa", "xquant:group=8,residual=100000", 80),  # per-channel latents: the same
    ("mha", "xquant:residual=100000", 71),  # per token (MHA): capacity 70 + 1
])
def test_a_residual_beyond_the_capacity_is_clamped_with_a_warning_and_changes_nothing(name, spec, residual):
    model = _model(name)
    with pytest.warns(XQInferWarning, match=f"residual=100000 is longer than .*using residual={residual}"):
        clamped = Engine(model, spec, capacity=70)
    exact = Engine(model, spec.replace("100000", str(residual)), capacity=70)
    assert clamped.spec.options["residual"] == 100000  # the spec stays as written: reports show what was asked
    assert clamped.cache.residual == residual and clamped.cache.nbytes() == exact.cache.nbytes()
    prompt = _tokens(name, 30)
    a, b = clamped.prefill(prompt), exact.prefill(prompt)
    assert torch.equal(a, b)
    for _ in range(39):  # up to the last position the capacity holds
        token = a.argmax(dim=-1)
        a, b = clamped.decode(token), exact.decode(token)
        assert torch.equal(a, b)


def test_the_default_residual_is_clamped_quietly_and_a_ring_is_left_alone(recwarn):
    short = Engine(_model("mha"), "kivi:group=8", capacity=16)  # default residual=128, a 16-token run
    assert short.cache.residual == 24
    ring = Engine(_model("swa"), "kivi:group=8,residual=1000", capacity=160)
    assert ring.cache.is_ring and ring.cache.residual == 1000
    assert not [w for w in recwarn if issubclass(w.category, XQInferWarning)]


# ------------------------------------------------------------------------------------------- edge configurations

WIDE_KV = dict(_BASE, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # kv_dim 64 > 32


def test_xquant_on_gqa_with_kv_dim_above_hidden_runs():
    model = random_model(ModelConfig.from_dict(WIDE_KV), torch.float32, "cpu", seed=0)
    ids = list(range(3, 23))
    reference = _run(model, parse_spec("fp16"), ids[:16], ids[16:], 1024)
    logits = _run(model, quantization_off("xquant:group=8,residual=0"), ids[:16], ids[16:], 1024)
    assert (logits - reference).abs().max() <= 1e-4


def test_the_stored_basis_is_the_plain_svd_by_default_and_keeps_k_and_v_exact_when_shaped():
    g = torch.Generator().manual_seed(0)
    wk, wv, x = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((16, 64), (16, 64), (5, 64)))
    encode, decode = stored_basis(wk, wv)
    assert encode.shape == (64, 32) and torch.equal(decode, encode.T)
    assert torch.allclose(encode.T @ encode, torch.eye(32, dtype=torch.float64), atol=1e-12)
    layer3, layer4 = stored_basis(wk, wv, 0.5, 0.5, 3), stored_basis(wk, wv, 0.5, 0.5, 4)
    for e, d in (layer3, layer4):
        assert e.shape == (64, 32) and not torch.allclose(e.T @ e, torch.eye(32, dtype=torch.float64))
        for w in (wk, wv):  # only the span of [Wk | Wv] survives the round trip, and that is all K and V read
            assert torch.allclose(x @ e @ d @ w.T, x @ w.T, atol=1e-10)
    assert torch.equal(layer3[0], stored_basis(wk, wv, 0.5, 0.5, 3)[0])  # the rotation is seeded: same every load
    assert not torch.allclose(layer3[0], layer4[0])  # and differs per layer
