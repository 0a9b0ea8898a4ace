"""xqinfer's logits against transformers' on tiny random-weight checkpoints: full forwards and incremental decode.

Every case saves a transformers model with save_pretrained, loads the directory with xqinfer's own loader, and
compares fp32 logits to within 1e-4 (max abs). Incremental decode is compared with transformers' own incremental
decode over its past_key_values cache, which is what a cache-based engine must reproduce (dynamic RoPE, for one,
legitimately gives different logits in a full forward).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xqinfer.backends.cpu import SPLIT_MIN_BYTES, threaded_linear
from xqinfer.cache import make_cache
from xqinfer.engine import Engine
from xqinfer.rope import apply_rotary

from conftest import load_hf

TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("single_thread")


def _ids(count: int, seed: int, vocab: int = 300) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count,), generator=generator).tolist()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= TOLERANCE, f"{what}: max abs logit difference {diff:.3g} > {TOLERANCE}"


@torch.inference_mode()
def hf_full(hf, ids: list[int]) -> torch.Tensor:
    return hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@torch.inference_mode()
def xq_full(model, ids: list[int], capacity: int | None = None) -> torch.Tensor:
    cache = make_cache("fp16", model, capacity or len(ids))
    return model(torch.tensor([ids]), torch.arange(len(ids)), cache)[0]


@torch.inference_mode()
def hf_incremental(hf, prompt: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Last-token logits after the prompt, then after each of `steps` fed one at a time through past_key_values."""
    out = hf(input_ids=torch.tensor([prompt]), use_cache=True)
    logits, past = [out.logits[0, -1]], out.past_key_values
    for token in steps:
        out = hf(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
        logits.append(out.logits[0, -1])
        past = out.past_key_values
    return logits


def xq_incremental(engine: Engine, prompt: list[int], steps: list[int]) -> list[torch.Tensor]:
    logits = [engine.prefill(prompt)[0]]
    for token in steps:
        logits.append(engine.decode(torch.tensor([token]))[0])
    return logits


def _assert_steps_close(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        _assert_close(a, e, f"{what}, {'prefill' if step == 0 else f'decode step {step}'}")


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}

# id -> (arch, config overrides, prompt length, decode steps, Engine kwargs)
CASES = {
    "llama-mha": ("llama", {}, 24, 8, {}),
    "llama-gqa": ("llama", {"num_key_value_heads": 2}, 24, 8, {}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}, 24, 8, {}),
    "llama-head-dim-32": ("llama", {"head_dim": 32, "num_key_value_heads": 2}, 24, 8, {}),
    "llama-head-dim-8": ("llama", {"head_dim": 8, "num_attention_heads": 4}, 24, 8, {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, 24, 8, {}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3, "num_key_value_heads": 2}, 60, 10, {}),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, 40, 8, {}),
    # 40 + 12 positions > 32: the NTK base grows with every decode step past the trained context.
    "dynamic-rope": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32},
                     40, 12, {"allow_extrapolation": True, "capacity": 64}),
    "dynamic-rope-within": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                      "max_position_embeddings": 64}, 20, 6, {}),
    "mistral-window": ("mistral", {"sliding_window": 6, "max_position_embeddings": 256, "num_key_value_heads": 2},
                       20, 10, {"capacity": 64}),
    "mistral-window-unused": ("mistral", {"sliding_window": 64, "max_position_embeddings": 256}, 20, 6, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_full_forward_matches_transformers(case, make_hf_model, load_xq):
    arch, overrides, prompt_len, steps, _ = CASES[case]
    _, directory = make_hf_model(arch, **overrides)
    model = load_xq(directory)
    ids = _ids(prompt_len + steps, seed=1)
    _assert_close(xq_full(model, ids), hf_full(load_hf(directory, arch), ids), f"{case} full forward")


@pytest.mark.parametrize("case", list(CASES))
def test_incremental_decode_matches_transformers(case, make_hf_model, load_xq):
    arch, overrides, prompt_len, steps, engine_kwargs = CASES[case]
    _, directory = make_hf_model(arch, **overrides)
    ids = _ids(prompt_len + steps, seed=2)
    prompt, feed = ids[:prompt_len], ids[prompt_len:]
    expected = hf_incremental(load_hf(directory, arch), prompt, feed)
    engine = Engine(load_xq(directory), "fp16", **engine_kwargs)
    _assert_steps_close(xq_incremental(engine, prompt, feed), expected, case)


def test_tied_embeddings_share_the_embedding_matrix(make_hf_model, load_xq):
    hf, directory = make_hf_model(tie_word_embeddings=True)
    model = load_xq(directory)
    assert not hasattr(model, "lm_head")
    assert model.output_weight() is model.model.embed_tokens.weight
    torch.testing.assert_close(model.output_weight(), hf.lm_head.weight, rtol=0, atol=0)


def test_sharded_checkpoint_matches_transformers(make_hf_model, load_xq):
    hf, directory = make_hf_model(shard=True, num_key_value_heads=2)
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 1
    model = load_xq(directory)
    ids = _ids(20, seed=3)
    _assert_close(xq_full(model, ids), hf_full(hf, ids), "sharded full forward")
    engine = Engine(model, "fp16", capacity=32)
    _assert_steps_close(xq_incremental(engine, ids[:14], ids[14:]), hf_incremental(hf, ids[:14], ids[14:]), "sharded")


def test_checkpoint_layout_gives_the_same_logits(make_hf_model, load_xq):
    # fp32 on the CPU stores the wide weights [in, out]; CUDA and half precision keep the checkpoint's [out, in].
    hf, directory = make_hf_model(num_key_value_heads=2)
    model = load_xq(directory)
    for parameter in model.parameters():
        parameter.data = parameter.data.contiguous()
    ids = _ids(24, seed=4)
    _assert_close(xq_full(model, ids), hf_full(hf, ids), "checkpoint layout full forward")
    engine = Engine(model, "fp16", capacity=32)
    expected = hf_incremental(hf, ids[:16], ids[16:])
    _assert_steps_close(xq_incremental(engine, ids[:16], ids[16:]), expected, "checkpoint layout")


@pytest.mark.parametrize("layout", ["out-in", "in-out"])
def test_one_token_products_are_split_over_the_threads(layout, monkeypatch):
    weight = torch.randn(1024, 256)
    if layout == "in-out":
        weight = weight.t().contiguous().t()
    assert weight.nbytes >= SPLIT_MIN_BYTES
    torch.set_num_threads(2)  # the single_thread fixture restores the count afterwards
    batched = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *args: batched.append(args[1].shape) or bmm(*args))
    for x in (torch.randn(1, 1, 256), torch.randn(256), torch.randn(1, 5, 256)):
        torch.testing.assert_close(threaded_linear(x, weight), F.linear(x, weight), rtol=1e-6, atol=1e-5)
    assert batched == [(2, 256, 512)] * 2  # one block of output rows per thread, for the single-row inputs only


def test_decode_with_split_products_matches_transformers(make_hf_model, load_xq):
    # Projections of at least SPLIT_MIN_BYTES, so that with two threads every decode step takes the split path.
    hf, directory = make_hf_model(hidden_size=256, intermediate_size=512, num_key_value_heads=2)
    model = load_xq(directory)
    assert model.layers[0].self_attn.o_proj.weight.nbytes >= SPLIT_MIN_BYTES
    torch.set_num_threads(2)
    ids = _ids(20, seed=5)
    engine = Engine(model, "fp16", capacity=32)
    expected = hf_incremental(hf, ids[:12], ids[12:])
    _assert_steps_close(xq_incremental(engine, ids[:12], ids[12:]), expected, "split products")


def test_dynamic_rope_full_forward_beyond_trained_context(make_hf_model, load_xq):
    # A 48-token forward of a 32-position model: the whole sequence uses the stretched base, as in transformers.
    _, directory = make_hf_model(rope_scaling={"rope_type": "dynamic", "factor": 3.0}, max_position_embeddings=32)
    ids = _ids(48, seed=4)
    model = load_xq(directory)
    _assert_close(xq_full(model, ids), hf_full(load_hf(directory), ids), "dynamic RoPE, 48 of 32 positions")
    # ... and differs from a cache-based run, which stretches the base step by step: the two are not the same.
    engine = Engine(model, "fp16", capacity=48, allow_extrapolation=True)
    incremental = xq_incremental(engine, ids[:30], ids[30:47])
    assert (incremental[-1] - xq_full(model, ids)[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {"num_key_value_heads": 2}),
    ("llama", {"rope_scaling": LLAMA3}),
    ("mistral", {"sliding_window": 5, "max_position_embeddings": 256}),
], ids=["llama-gqa", "llama3-rope", "mistral-ring"])
def test_chunked_prefill_equals_single_prefill(arch, overrides, make_hf_model, load_xq):
    _, directory = make_hf_model(arch, **overrides)
    model = load_xq(directory)
    ids = _ids(45, seed=5)
    prompt, feed = ids[:33], ids[33:]
    single = xq_incremental(Engine(model, "fp16", capacity=64), prompt, feed)
    chunked_engine = Engine(model, "fp16", capacity=64, prefill_chunk=7)
    chunked = xq_incremental(chunked_engine, prompt, feed)
    _assert_steps_close(chunked, single, f"{arch} prefill_chunk=7 vs one chunk")
    assert chunked_engine.tokens == ids
    expected = hf_incremental(load_hf(directory, arch), prompt, feed)
    _assert_steps_close(chunked, expected, f"{arch} prefill_chunk=7 vs HF")


@pytest.mark.parametrize("prompt_len, chunk", [(3, 1024), (23, 7), (9, 1)], ids=["short-prompt", "chunk-7", "chunk-1"])
def test_mistral_ring_decodes_far_past_the_window(prompt_len, chunk, make_hf_model, load_xq):
    # Window 5 in a cache asked for 64 tokens: the cache is a 5-slot ring, overwritten many times over 40 steps.
    _, directory = make_hf_model("mistral", sliding_window=5, max_position_embeddings=256, num_key_value_heads=2)
    engine = Engine(load_xq(directory), "fp16", capacity=64, prefill_chunk=chunk)
    assert engine.cache.is_ring and engine.cache.capacity == 5
    ids = _ids(prompt_len + 40, seed=6)
    prompt, feed = ids[:prompt_len], ids[prompt_len:]
    expected = hf_incremental(load_hf(directory, "mistral"), prompt, feed)
    _assert_steps_close(xq_incremental(engine, prompt, feed), expected, f"mistral ring, prompt {prompt_len}")
    assert engine.length == prompt_len + 40  # a ring is bounded by the model's positions, not the 64 asked for


def test_full_forward_is_batch_independent(make_hf_model, load_xq):
    # Two different sequences in one batch give each sequence's own logits.
    hf, directory = make_hf_model(num_key_value_heads=2)
    model = load_xq(directory)
    a, b = _ids(16, seed=7), _ids(16, seed=8)
    cache = make_cache("fp16", model, 16, batch_size=2)
    with torch.inference_mode():
        both = model(torch.tensor([a, b]), torch.arange(16), cache)
    _assert_close(both[0], hf_full(hf, a), "batch row 0")
    _assert_close(both[1], hf_full(hf, b), "batch row 1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2, 1, 8), (2, 3, 37, 16), (1, 4, 300, 64)])
def test_apply_rotary_is_bitwise_the_rotate_half_formula(shape, dtype):
    # The in-place half-by-half form must round exactly as x·cos + rotate_half(x)·sin does, whatever the shape, so
    # that rotating a rebuilt history and rotating the same keys on arrival give the same bits.
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    angles = torch.rand(shape[-2], shape[-1] // 2, generator=g) * 100
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    half = shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    assert torch.equal(apply_rotary(x, cos, sin), x * cos + rotated * sin)
