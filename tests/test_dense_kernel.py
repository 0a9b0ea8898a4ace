"""The CPU's dense decode kernels (kernels/dense.c, and kv_attention.c's plain_store) against the torch modules
they replace: float32 to rounding, bfloat16 bit for bit (the kernels round where torch's ops round), and whole decode
runs with and without them, on tiny models and on the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xqinfer.arch import llama
from xqinfer.backends import cpu as cpu_backend
from xqinfer.config import ModelConfig
from xqinfer.engine import Engine
from xqinfer.kernels import cpu
from xqinfer.loader import random_model
from xqinfer.rope import apply_rotary

from gguf_files import need_smollm2

pytestmark = [pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}"),
              pytest.mark.usefixtures("single_thread")]

GQA = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 96, "intermediate_size": 130, "num_hidden_layers": 3,
    "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 301,
    "max_position_embeddings": 512,
}  # 130 and 301 output rows: blocks of four with a ragged end
MHA = {**GQA, "num_key_value_heads": 6, "intermediate_size": 128, "tie_word_embeddings": True}


def _model(config: dict, dtype: torch.dtype):
    return random_model(ModelConfig.from_dict(config), dtype, "cpu", seed=1)


def _torch_block_input(block, h, cos, sin):
    attention = block.self_attn
    x = llama.RMSNorm.forward(block.input_layernorm, h)
    q, k, v = F.linear(x, attention.qkv_proj.weight).split(attention.qkv_sizes, dim=-1)
    shape = (h.shape[0], 1, -1, attention.head_dim)
    return (x, apply_rotary(q.view(shape).transpose(1, 2), cos, sin), k.view(shape).transpose(1, 2),
            v.view(shape).transpose(1, 2))


def _torch_block_output(block, h, out):
    attention, mlp = block.self_attn, block.mlp
    h1 = h + F.linear(out.transpose(1, 2).reshape(h.shape[0], 1, -1), attention.o_proj.weight)
    gate, up = F.linear(llama.RMSNorm.forward(block.post_attention_layernorm, h1),
                        mlp.gate_up_proj.weight).split(mlp.gate_up_sizes, dim=-1)
    return h1 + F.linear(F.silu(gate) * up, mlp.down_proj.weight)


@pytest.mark.parametrize("config", [GQA, MHA], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_two_block_calls_equal_the_torch_block(config, dtype, batch):
    model = _model(config, dtype)
    block = model.layers[1]
    assert type(block) is cpu_backend.CpuLlamaBlock
    attention = block.self_attn
    generator = torch.Generator().manual_seed(batch)
    h = torch.randn(batch, 1, config["hidden_size"], generator=generator).to(dtype)
    cos, sin = model.rotary.cos_sin(torch.tensor([37]), dtype)
    got = cpu.dense_attention_input(h, block.input_layernorm.weight, block.input_layernorm.eps,
                                    attention.qkv_proj.weight, cos, sin, attention.num_heads, attention.num_kv_heads)
    out = torch.randn(batch, attention.num_heads, 1, attention.head_dim, generator=generator).to(dtype)
    got += (cpu.dense_block_output(h, out, attention.o_proj.weight, block.post_attention_layernorm.weight,
                                   block.post_attention_layernorm.eps, block.mlp.gate_up_proj.weight,
                                   block.mlp.down_proj.weight),)
    expected = (*_torch_block_input(block, h, cos, sin), _torch_block_output(block, h, out))
    for name, a, b in zip(("x", "q", "k", "v", "h"), got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if dtype == torch.bfloat16:
            assert torch.equal(a, b), f"{name}: {(a.float() - b.float()).abs().max()}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("rows", [1, 2, 5, cpu.MAX_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_linear_equals_f_linear(rows, dtype):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 70, generator=generator).to(dtype)
    weight = torch.randn(301, 70, generator=generator).to(dtype)
    assert cpu.dense_usable(x, weight)
    if dtype == torch.bfloat16:
        assert torch.equal(cpu.dense_linear(x, weight), F.linear(x, weight))
    else:
        torch.testing.assert_close(cpu.dense_linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_what_the_dense_kernels_leave_to_torch():
    weight = torch.randn(8, 4)
    assert not cpu.dense_usable(torch.randn(cpu.MAX_ROWS + 1, 4), weight)  # a prefill chunk
    assert not cpu.dense_usable(torch.randn(1, 4, dtype=torch.float16), weight.half())
    assert not cpu.dense_usable(torch.randn(1, 4), weight.t().contiguous().t())  # stored [in, out]
    assert not cpu.dense_usable(torch.randn(1, 4), weight.bfloat16())  # mixed dtypes


def test_plain_store_equals_rotary_and_a_copy():
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 20, 16, generator=generator), torch.randn(2, 3, 20, 16, generator=generator)
    k, v = torch.randn(2, 3, 1, 16, generator=generator), torch.randn(2, 3, 1, 16, generator=generator)
    angle = torch.randn(1, 16, generator=generator)
    expected_keys, expected_values = keys.clone(), values.clone()
    expected_keys[:, :, 7:8] = apply_rotary(k, angle.cos(), angle.sin())
    expected_values[:, :, 7:8] = v
    cpu.PlainStore(keys, values)(k, v, angle.cos(), angle.sin(), 7)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_rotate_is_apply_rotary_bit_for_bit(dtype):
    """Bit for bit: the quantized caches store what it gives, and a key one ulp off can flip a code."""
    generator = torch.Generator().manual_seed(1)
    k = (torch.randn(2, 3, 1, 64, generator=generator) * 10).to(dtype)
    angle = torch.randn(1, 64, generator=generator) * 100
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    assert torch.equal(cpu.dense_rotate(k, cos, sin), apply_rotary(k, cos, sin))


def _decode_run(model, spec: str, batch: int, steps: int = 12) -> tuple[torch.Tensor, list[int]]:
    engine = Engine(model, spec, capacity=96, batch_size=batch, cuda_graph=False)
    ids = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.inference_mode():
        logits = [engine.prefill(ids)]
        token = logits[-1].argmax(-1)
        for _ in range(steps):
            logits.append(engine.decode(token, int(token[0])))
            token = logits[-1].argmax(-1)
    return torch.stack(logits), engine.tokens[len(ids):]


def _without_dense_kernels(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "dense_usable", lambda *args: False)


@pytest.mark.parametrize("config", [GQA, MHA], ids=["gqa-untied", "mha-tied"])
@pytest.mark.parametrize("spec, batch", [("fp16", 1), ("fp16", 2), ("kivi:bits=4", 1)])
def test_decode_through_the_kernels_equals_the_torch_modules(config, spec, batch, monkeypatch):
    model = _model(config, torch.float32)
    calls = []
    block_input = cpu.dense_attention_input
    monkeypatch.setattr(cpu, "dense_attention_input", lambda *args: calls.append(1) or block_input(*args))
    fast, fast_tokens = _decode_run(model, spec, batch)
    assert len(calls) == 12 * config["num_hidden_layers"]  # every decode step of every layer, no prefill
    _without_dense_kernels(monkeypatch)
    reference, reference_tokens = _decode_run(model, spec, batch)
    assert fast_tokens == reference_tokens
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_smollm2_decodes_the_same_tokens_through_the_kernels(monkeypatch):
    """The real model, 40 greedy steps: the same tokens and logits within 1e-4 of the torch modules."""
    from xqinfer.api import load

    model = load(need_smollm2()).model
    torch.set_num_threads(2)  # the single_thread fixture restores the count afterwards
    ids = list(range(1000, 1200))

    def run() -> tuple[torch.Tensor, list[int]]:
        engine = Engine(model, "fp16", capacity=256, cuda_graph=False)
        with torch.inference_mode():
            logits = [engine.prefill(ids)]
            for _ in range(40):
                token = logits[-1].argmax(-1)
                logits.append(engine.decode(token, int(token[0])))
        return torch.stack(logits), engine.tokens[len(ids):]

    fast, fast_tokens = run()
    _without_dense_kernels(monkeypatch)
    reference, reference_tokens = run()
    assert fast_tokens == reference_tokens
    assert (fast - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("batch", [1, 2])
def test_the_plain_kernel_step_equals_torch_attention(batch, monkeypatch):
    """fp16's decode step through plain_store and the kernel, against its torch path (rotary, index_copy, SDPA)."""
    from xqinfer.cache.fp16 import FP16Cache

    model = _model(GQA, torch.float32)
    fast, fast_tokens = _decode_run(model, "fp16", batch)
    monkeypatch.setattr(FP16Cache, "kernel_unusable", "the reference")
    reference, reference_tokens = _decode_run(model, "fp16", batch)
    assert fast_tokens == reference_tokens
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_a_conversion_binds_the_weights_again():
    # Decode steps look their weights up once; .to() replaces them, so the next step must look again.
    model = _model(GQA, torch.float32)
    _decode_run(model, "fp16", 1, steps=2)
    block = model.model.layers[0]
    assert block.__dict__["_decode_binding"].dtype == torch.float32
    model.to(torch.bfloat16)
    assert "_decode_binding" not in block.__dict__
    again, _ = _decode_run(model, "fp16", 1, steps=2)
    assert block.__dict__["_decode_binding"].dtype == torch.bfloat16
    assert again.dtype == torch.bfloat16
