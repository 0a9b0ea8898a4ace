"""Every method runs with the model on an accelerator-like device, checked on CPU with the meta device.

A tensor made on the CPU by default inside the model or a cache (a `torch.arange` without `device=`, a constant table)
only fails once the model lives on a GPU, and so does a host read of a device tensor in the middle of a step. Meta
tensors behave like a GPU's here: mixing them with a CPU tensor other than a 0-dim scalar raises the same device
error, and reading one's value raises too. So prefill and decode of every method and layout on the meta device, in
bf16 and at batch 2, show that nothing is placed on the CPU and nothing is read on the host, before any GPU is lent.
"""

from __future__ import annotations

import pytest
import torch

from xqinfer.arch.llama import Transformer
from xqinfer.config import ModelConfig
from xqinfer.engine import Engine
from xqinfer.rope import Rotary

from test_bench import SHAPES
from test_capture import CASES

DEVICE = torch.device("meta")
PROMPT, STEPS = 250, 10


def meta_model(shape: str) -> Transformer:
    config = ModelConfig.from_dict(SHAPES[shape])
    with DEVICE:
        model = Transformer(config, Rotary(config, DEVICE)).to(torch.bfloat16)
    model.rotary = Rotary(config, DEVICE)  # the loader builds RoPE's float32 frequencies on the model's device
    return model.eval()


@pytest.mark.parametrize("shape,spec", [c[:2] for c in CASES], ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_prefill_and_decode_keep_every_tensor_on_the_models_device(shape, spec):
    model = meta_model(shape)
    engine = Engine(model, spec, capacity=512, batch_size=2, allow_extrapolation=True)
    assert engine.graphs is None  # graphs are for CUDA only
    assert all(t.device == DEVICE for t in engine.cache.tensors())
    # Two prefill chunks (the second attends over a stored history), then decode steps into the next span bucket.
    engine.prefill_chunk = PROMPT // 2 + 1
    logits = engine.prefill(list(range(PROMPT)))
    assert engine.span_for(PROMPT + 1) < engine.span_for(PROMPT + STEPS)
    for _ in range(STEPS):
        # token_id given: the engine itself must not need the sampled value, which lives on the device.
        logits = engine.decode(logits.argmax(dim=-1), token_id=0)
    assert logits.device == DEVICE and logits.shape == (2, model.config.vocab_size)
    assert logits.dtype == torch.bfloat16


def test_meta_tensors_refuse_what_a_gpu_refuses():
    # The premise of the tests above: a CPU tensor in meta arithmetic and a host read of a meta tensor both fail.
    on_device = torch.ones(4, device=DEVICE)
    with pytest.raises(RuntimeError):
        on_device + torch.ones(4)
    with pytest.raises((RuntimeError, NotImplementedError)):
        int(on_device.sum())
    assert (on_device * torch.tensor(2.0)).device == DEVICE  # a 0-dim CPU scalar is allowed, as on CUDA
