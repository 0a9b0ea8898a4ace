"""The CPU decode kernel (kernels/kv_attention.c) against the torch path of KVQuantLayer, its reference.

Every decode step of every layer is run both ways from the same cache state: the torch path first (then the state
is put back), the kernel second; their attention outputs must agree to float32 rounding and the states they leave
must be equal. Comparing whole runs
instead would not work: a 1e-6 difference in a hidden state can flip a quantization code of the next token.
"""

from __future__ import annotations

import pytest
import torch

from xqinfer.cache import kv_quant
from xqinfer.cache.xquant import XQuantGQALayer
from xqinfer.config import ModelConfig
from xqinfer.engine import Engine
from xqinfer.kernels import cpu
from xqinfer.loader import random_model

from gguf_files import need_smollm2

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernel: {cpu.unavailable()}")

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 96, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 300,
    "max_position_embeddings": 1024,
}
MISTRAL = {**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 96}


@pytest.fixture(scope="module")
def llama():
    return random_model(ModelConfig.from_dict(LLAMA), torch.float32, "cpu", seed=5)


def run_both_ways(model, spec: str, prompt: int, steps: int, batch: int = 1, capacity: int = 512,
                  layer_class: type = kv_quant.KVQuantLayer) -> list[float]:
    """Largest |kernel - torch| of each decode-step attention output, relative to the output's scale."""
    engine = Engine(model, spec, capacity=capacity, batch_size=batch, cuda_graph=False)
    attend = layer_class.attend
    errors = []

    def both(layer, step, x, q, k, v):
        if step.positions.shape[0] != 1:
            return attend(layer, step, x, q, k, v)
        saved = [t.clone() for t in layer.tensors()]
        layer.parent.kernel_unusable = "the reference"
        reference = attend(layer, step, x, q, k, v)
        assert layer.decode_path == "torch"
        stored = [t.clone() for t in layer.tensors()]
        for tensor, before in zip(layer.tensors(), saved):
            tensor.copy_(before)
        del layer.parent.kernel_unusable  # back to the cached answer: the kernel
        out = attend(layer, step, x, q, k, v)
        assert layer.decode_path == "cpu"
        # The kernel path's store (kernels.cpu.KiviStore, or xquant's own write) leaves the cache bit for bit as
        # the torch path's write.
        assert all(torch.equal(a, b) for a, b in zip(layer.tensors(), stored))
        errors.append(((out - reference).abs().max() / reference.abs().max()).item())
        return reference

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (prompt,), generator=generator).tolist()
    layer_class.attend = both
    try:
        with torch.inference_mode():
            token = engine.prefill(ids).argmax(-1)
            for _ in range(steps):
                token = engine.decode(token, int(token[0])).argmax(-1)
    finally:
        layer_class.attend = attend
    assert len(errors) == steps * model.config.num_layers
    return errors


@pytest.mark.parametrize("spec", [
    "kivi:bits=2", "kivi:bits=4", "kivi:bits=8",
    "kivi:bits=2,residual=0",  # no value ring; keys read the open group from theirs
    "kivi:bits=2,residual=32",  # the residual window moves past quantized tokens during the steps
    "kivi:bits=4,group=48,residual=96",  # ragged value groups: 48 + 16 channels of a 64-wide head
    "kivi:bits=2,group=16,residual=16", "kivi:bits=8,group=64,residual=0",
    "asymkv",  # 1-bit values
    "xquant-kv",  # 1-bit codes, calibration and codes shared across layers
    "xquant-kv:kq=4,vq=0,km=3,vm=1",
])
def test_kernel_equals_the_torch_path(llama, spec):
    errors = run_both_ways(llama, spec, prompt=150, steps=40)
    assert max(errors) < 1e-5, f"{spec}: worst relative error {max(errors):.3g}"


@pytest.mark.parametrize("head_dim", [128, 40])  # the kernel's copy for 128-channel heads, and its generic one
@pytest.mark.parametrize("spec", ["fp16", "kivi:bits=2,residual=32", "xquant-kv"])
def test_kernel_at_other_head_sizes(spec, head_dim):
    model = random_model(ModelConfig.from_dict({**LLAMA, "head_dim": head_dim}), torch.float32, "cpu", seed=7)
    if spec == "fp16":
        engine = Engine(model, spec, capacity=256, cuda_graph=False)
        with torch.inference_mode():
            token = engine.prefill(list(range(150))).argmax(-1)
            kernel = engine.decode(token, int(token[0]))
            engine.cache.kernel_unusable = "the reference"
            engine.reset()
            token = engine.prefill(list(range(150))).argmax(-1)
            reference = engine.decode(token, int(token[0]))
        assert (kernel - reference).abs().max() < 1e-4
        return
    assert max(run_both_ways(model, spec, prompt=150, steps=10)) < 1e-5


def test_kernel_with_two_sequences(llama):
    assert max(run_both_ways(llama, "kivi:bits=2,residual=32", prompt=70, steps=20, batch=2)) < 1e-5


def test_kernel_over_a_sliding_window_ring():
    model = random_model(ModelConfig.from_dict(MISTRAL), torch.float32, "cpu", seed=6)
    # Positions run past the window and the ring wraps during the decode steps.
    assert max(run_both_ways(model, "kivi:bits=2,residual=32", prompt=120, steps=60, capacity=400)) < 1e-5


@pytest.mark.parametrize("spec, reason", [
    ("kivi:bits=3", "the CPU kernel reads 1, 2, 4, 8-bit codes"),
    ("kivi:bits=2,prerope=1", "prerope=1 rotates the keys after dequantizing them"),
    ("kivi:bits=2,group=20,residual=40", "the CPU kernel reads value groups of a multiple of 8 channels"),
])
def test_what_the_kernel_leaves_to_torch(llama, spec, reason):
    engine = Engine(llama, spec, capacity=256, cuda_graph=False)
    assert engine.cache.kernel_unusable == reason
    with torch.inference_mode():
        token = engine.prefill(list(range(40))).argmax(-1)
        engine.decode(token, int(token[0]))
    assert engine.cache.decode_path() == "torch"


@pytest.fixture(params=["tiles", "vectors"])
def rebuild(request, monkeypatch):
    """xquant's key rebuild both ways: on the CPU's AMX tiles (where it and Linux give them) and on vectors."""
    if request.param == "tiles" and not cpu.matrix_tiles():
        pytest.skip("no AMX tiles on this CPU")
    if request.param == "vectors":
        monkeypatch.setattr(cpu, "matrix_tiles", lambda: False)
    return request.param


@pytest.mark.parametrize("spec", [
    "xquant:bits=4,group=32,residual=32",  # latents read from their codes and from the rings
    "xquant:bits=2,group=16,residual=64",  # groups shorter than a tile: vectors either way
    "xquant:bits=2,group=32,residual=64", "xquant:bits=8,group=32,residual=0",
    "xquant:bits=4,group=32,residual=32,eta=0.1",  # calibrated scales and zeros
    "xquant:bits=4,group=24,residual=48",  # value groups of 24 channels: 24 * 4 = 96
    "xquant:bits=4,group=48,residual=48",  # tiles of 32 and 16 tokens in each group
])
def test_xquant_kernel_equals_the_torch_path(llama, spec, rebuild):
    errors = run_both_ways(llama, spec, prompt=150, steps=30, layer_class=XQuantGQALayer)
    assert max(errors) < 1e-5, f"{spec}: worst relative error {max(errors):.3g}"


def test_xquant_kernel_with_two_sequences_and_a_sliding_window(rebuild):
    model = random_model(ModelConfig.from_dict(MISTRAL), torch.float32, "cpu", seed=6)
    spec = "xquant:bits=4,group=32,residual=32"
    assert max(run_both_ways(model, spec, prompt=120, steps=40, capacity=400, layer_class=XQuantGQALayer)) < 1e-5
    assert max(run_both_ways(model, spec, prompt=70, steps=10, batch=2, layer_class=XQuantGQALayer)) < 1e-5


def test_xquant_kernel_on_smollm2(rebuild):
    """The real model (9 heads over 3 KV heads of 64, latents 192 wide): every layer of 12 decode steps after a
    300-token prompt, both ways from the same state, and the greedy tokens the kernel path decodes on its own."""
    from xqinfer.api import load

    model = load(need_smollm2()).model
    torch.set_num_threads(2)  # the single_thread fixture restores the count afterwards
    errors = run_both_ways(model, "xquant:bits=4", prompt=300, steps=12, layer_class=XQuantGQALayer)
    assert max(errors) < 1e-5

    def greedy(spec: str) -> list[int]:
        engine = Engine(model, spec, capacity=512, cuda_graph=False)
        with torch.inference_mode():
            token = engine.prefill(list(range(1000, 1300))).argmax(-1)
            for _ in range(20):
                token = engine.decode(token, int(token[0])).argmax(-1)
        assert engine.cache.decode_path() == ("cpu" if spec == "xquant:bits=4" else "torch")
        return engine.tokens[300:]

    assert greedy("xquant:bits=4") == greedy("xquant:bits=4,fused=0")


@pytest.mark.parametrize("spec, reason", [
    ("xquant:bits=3", "the CPU kernel reads 1, 2, 4, 8-bit codes"),
    ("xquant:bits=4,outlier=1", "outlier=1 keeps a full-precision key channel the kernel does not read"),
    ("xquant:bits=4,fused=0", "the spec asks for the torch path (fused=0)"),
    ("xquant:bits=4,absorb=0", "V absorption is off (absorb=0)"),
    ("xquant:bits=4,group=20,residual=40", "the CPU kernel reads value groups of a multiple of 8 channels"),
])
def test_what_the_xquant_kernel_leaves_to_torch(llama, spec, reason):
    engine = Engine(llama, spec, capacity=256, cuda_graph=False)
    with torch.inference_mode():
        token = engine.prefill(list(range(40))).argmax(-1)
        engine.decode(token, int(token[0]))
    assert engine.cache.kernel_unusable == reason
    assert engine.cache.decode_path() == "torch"


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("XQINFER_CPU_KERNELS", "0")
    cpu._library.cache_clear()
    try:
        assert cpu.unavailable() == "XQINFER_CPU_KERNELS=0"
    finally:
        monkeypatch.undo()
        cpu._library.cache_clear()
    assert cpu.unavailable() is None


def test_no_compiler_means_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cpu._library.cache_clear()
    try:
        assert "no C compiler" in cpu.unavailable()
    finally:
        monkeypatch.undo()
        cpu._library.cache_clear()


def _hard_rows(dim: int) -> torch.Tensor:
    """[1, 6, 1, dim] value rows at the edges of float16 storage: ordinary, constant (scale 0), tiny (subnormal
    float16 scales and zeros), beyond float16's range (clamped), signed zeros, and values on float16's grid."""
    generator = torch.Generator().manual_seed(3)
    ordinary = torch.randn(dim, generator=generator)
    constant = torch.full((dim,), 0.3)
    tiny = torch.randn(dim, generator=generator) * 1e-6
    huge = torch.randn(dim, generator=generator) * 1e5
    zeros = torch.zeros(dim)
    zeros[::2] = -0.0
    grid = torch.randint(-64, 64, (dim,), generator=generator).float() / 8
    return torch.stack([ordinary, constant, tiny, huge, zeros, grid])[None, :, None, :]


@pytest.mark.parametrize("bits", cpu.BITS)
@pytest.mark.parametrize("group", [32, 24, 64])  # 24: a ragged last group (64 = 24 + 24 + 16)
def test_kivi_store_quantizes_as_quant_does(bits, group):
    from xqinfer import quant
    from xqinfer.rope import apply_rotary

    dim, capacity, ring = 64, 8, 4
    v = _hard_rows(dim)
    heads = v.shape[1]
    k = torch.randn(v.shape, generator=torch.Generator().manual_seed(4))
    angle = torch.randn(1, dim, generator=torch.Generator().manual_seed(5))
    expected = quant.Layout(bits, group, "token").quantize(v)
    groups = expected.scale.shape[-1]
    codes = torch.zeros(1, heads, capacity, expected.codes.shape[-1], dtype=torch.uint8)
    scale = torch.zeros(1, heads, capacity, groups, dtype=torch.float16)
    zero = torch.zeros_like(scale)
    key_ring, value_ring = torch.zeros(1, heads, ring, dim), torch.zeros(1, heads, ring, dim)
    cpu.KiviStore(key_ring, codes, scale, zero, bits, group, value_ring)(k, v, angle.cos(), angle.sin(), 1, 5, 2)
    assert torch.equal(codes[:, :, 5:6], expected.codes)
    # .view(int16): equal bit patterns, the sign of a zero included
    assert torch.equal(scale[:, :, 5:6].view(torch.int16), expected.scale.view(torch.int16))
    assert torch.equal(zero[:, :, 5:6].view(torch.int16), expected.zero.view(torch.int16))
    assert torch.equal(key_ring[:, :, 1:2], apply_rotary(k, angle.cos(), angle.sin()))
    assert torch.equal(value_ring[:, :, 2:3], v)
    untouched = [s for s in range(capacity) if s != 5]
    assert not codes[:, :, untouched].any() and not scale[:, :, untouched].any()


@pytest.mark.parametrize("bits", cpu.BITS)
@pytest.mark.parametrize("shared", [False, True])  # True: XQuant-KV's layer that reads another's codes
def test_store_key_group_quantizes_as_quant_does(bits, shared):
    from xqinfer import quant

    group, dim, ring_size, capacity = 32, 64, 64, 96
    columns = _hard_rows(group)[0, :, 0]  # [6, group]: every kind of hard channel, each over the group's tokens
    rows = columns[torch.arange(dim) % 6].T.reshape(1, 1, group, dim).expand(2, 3, group, dim).clone()
    rows[1] *= -3  # another sequence, another range
    expected = quant.Layout(bits, group, "channel").quantize(rows)
    ring = torch.zeros(2, 3, ring_size, dim)
    ring[:, :, group:] = rows  # the group's rows: the second half of the ring
    codes = torch.zeros(2, 3, capacity, expected.codes.shape[-1], dtype=torch.uint8)
    scale = torch.zeros(2, 3, capacity // group, dim, dtype=torch.float16)
    zero = torch.zeros_like(scale)
    cpu.store_key_group(ring[:, :, group:], bits, None if shared else codes[:, :, 64:96], scale[:, :, 1:2],
                        zero[:, :, 1:2])
    assert torch.equal(scale[:, :, 1:2].view(torch.int16), expected.scale.view(torch.int16))
    assert torch.equal(zero[:, :, 1:2].view(torch.int16), expected.zero.view(torch.int16))
    assert not scale[:, :, [0, 2]].any() and not zero[:, :, [0, 2]].any()
    if shared:
        assert not codes.any()
    else:
        assert torch.equal(codes[:, :, 64:96], expected.codes) and not codes[:, :, :64].any()


def test_kernel_in_bfloat16():
    # bfloat16 rings reach the kernel as a float32 copy made at every step (the buffers it was built on are not)
    model = random_model(ModelConfig.from_dict(LLAMA), torch.bfloat16, "cpu", seed=5)
    errors = run_both_ways(model, "kivi:bits=2,residual=32", prompt=70, steps=40)
    assert max(errors) < 1e-2
