"""The backend seam: the CPU's tricks (decode steps through the C kernels; without them fp32 weights stored
[in, out] and one-token products split over the threads; freed host memory kept for reuse) are chosen by device and
dtype and applied by the loader through `backend_for`, and by nothing else: without the CPU backend a model has the
checkpoint's layout, plain modules and the same logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xqinfer import loader
from xqinfer.arch import llama
from xqinfer.arch.base import Embedding
from xqinfer.backends import Backend, CpuBackend, backend_for, cpu
from xqinfer.config import ModelConfig
from xqinfer.engine import Engine
from xqinfer.kernels import cpu as kernels
from xqinfer.loader import random_model
from xqinfer.rope import Rotary

from conftest import TINY_CONFIG

pytestmark = pytest.mark.usefixtures("single_thread")


def _config(**changes) -> ModelConfig:
    return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **TINY_CONFIG, **changes})


def _meta_model(config: ModelConfig) -> nn.Module:
    with torch.device("meta"):
        return llama.Transformer(config, Rotary(config, "meta"))


def test_the_cpu_backend_is_chosen_for_the_cpu_only():
    assert backend_for("cpu", torch.float32) == CpuBackend(torch.float32)
    assert backend_for(torch.device("cpu"), torch.bfloat16) == CpuBackend(torch.bfloat16)
    for device, dtype in (("cuda", torch.bfloat16), ("cuda:1", torch.float32), ("meta", torch.float32)):
        assert type(backend_for(device, dtype)) is Backend


@pytest.mark.parametrize("tied", [False, True])
def test_without_kernels_only_cpu_fp32_stores_the_tall_weights_transposed(tied, kernels_on):
    model = _meta_model(_config(tie_word_embeddings=tied))
    tall = {f"model.layers.{i}.{name}.weight" for i in range(2) for name in
            ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj")}
    tall.add("model.embed_tokens.weight" if tied else "lm_head.weight")  # down_proj [d, f] is wide
    # The kernels read the checkpoint's [out, in] rows.
    assert backend_for("cpu", torch.float32).stored_transposed(model) == (set() if kernels_on else tall)
    assert backend_for("cpu", torch.bfloat16).stored_transposed(model) == set()
    assert backend_for("cuda", torch.bfloat16).stored_transposed(model) == set()
    assert backend_for("cuda", torch.float32).stored_transposed(model) == set()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_cpu_model_is_prepared_at_load(dtype, kernels_on, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "keep_freed_host_memory", lambda: calls.append("mallopt"))
    monkeypatch.setattr(cpu, "back_with_huge_pages", lambda parameters: calls.append(len(list(parameters))))
    model = random_model(_config(tie_word_embeddings=True), dtype, "cpu")
    # In any dtype: the decode step's temporaries are host memory either way, and every weight is streamed.
    assert calls == ["mallopt", len(list(model.parameters()))]
    # fp32 takes the CPU modules (the kernels' or, without them, the split products); bf16 the kernels' only.
    tricked = dtype == torch.float32 or (dtype == torch.bfloat16 and kernels_on)
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert linears and all((type(module) is cpu.CpuLinear) == tricked for module in linears)
    assert all((type(block) is cpu.CpuLlamaBlock) == tricked for block in model.layers)
    assert (type(model.model.embed_tokens) is cpu.CpuEmbedding) == tricked
    assert isinstance(model.model.embed_tokens, Embedding)


@pytest.mark.parametrize("tied", [False, True])
def test_without_the_cpu_backend_a_model_is_plain_and_decodes_the_same(tied, kernels_on, monkeypatch):
    # Projections of at least SPLIT_MIN_BYTES and two threads, so that without kernels the decode steps split.
    config = _config(hidden_size=256, intermediate_size=512, num_key_value_heads=2, tie_word_embeddings=tied)
    tricked = random_model(config, torch.float32, "cpu")
    monkeypatch.setattr(loader, "backend_for", lambda device, dtype: Backend())
    plain = random_model(config, torch.float32, "cpu")
    assert all(parameter.is_contiguous() for parameter in plain.parameters())
    assert all(parameter.is_contiguous() for parameter in tricked.parameters()) == kernels_on
    assert {type(module) for module in plain.modules()}.isdisjoint(set(cpu.CPU_MODULES.values()))
    for (name, a), (_, b) in zip(tricked.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    torch.set_num_threads(2)  # the single_thread fixture restores the count afterwards
    split, blocks = [], []
    bmm, block_output = torch.bmm, kernels.dense_block_output
    monkeypatch.setattr(torch, "bmm", lambda *args: split.append(args[1].shape) or bmm(*args))
    monkeypatch.setattr(kernels, "dense_block_output", lambda *args: blocks.append(1) or block_output(*args))
    ids = torch.randint(3, 300, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    steps = {}
    for name, model in (("tricked", tricked), ("plain", plain)):
        engine = Engine(model, "fp16", capacity=32)
        logits = [engine.prefill(ids[:12])]
        logits += [engine.decode(torch.tensor([token])) for token in ids[12:]]
        steps[name] = torch.stack(logits)
        if name == "tricked":
            assert bool(blocks) == kernels_on, "the decode steps did not take the kernels"
            assert bool(split) != kernels_on, "without kernels, the one-token products were not split"
            split.clear(), blocks.clear()
    assert not split and not blocks
    torch.testing.assert_close(steps["tricked"], steps["plain"], rtol=1e-5, atol=1e-5)


def test_huge_page_spans_are_the_whole_2mib_pages_inside_each_storage_once():
    huge = cpu.HUGE_PAGE_BYTES
    spans = [(huge + 1, 3 * huge), (huge + 1, 3 * huge), (4 * huge, huge - 1), (6 * huge, 2 * huge)]
    assert cpu.huge_page_spans(spans) == [(2 * huge, 2 * huge), (6 * huge, 2 * huge)]


def _anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        return next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))


def test_weights_advised_onto_huge_pages_keep_their_values():
    weights = [torch.randn(3 << 20, generator=torch.Generator().manual_seed(i)) for i in range(2)]  # 12 MiB each
    before = [w.clone() for w in weights]
    advised = cpu.back_with_huge_pages([*weights, weights[0][1:]])  # a view: its storage counts once
    if cpu._glibc() is None:
        assert advised == 0
        return
    assert cpu.HUGE_PAGE_BYTES * 8 <= advised <= sum(w.nbytes for w in weights)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode:
            thp_off = "[never]" in mode.read()
    except OSError:
        thp_off = True
    if not thp_off:  # the collapse happened where the kernel has THP
        assert _anon_huge_kib() >= 8 * 2048
