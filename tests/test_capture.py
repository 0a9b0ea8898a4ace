"""The decode step is capturable in a CUDA graph, checked on CPU.

A captured graph replays the kernels it recorded, with the arguments it recorded: the same buffers, the same sizes,
the same Python scalars. So every step that replays one graph (every position of one span bucket) must issue the
same operations with the same non-tensor arguments, read state kept across steps only from the same buffers (a
tensor swapped into an attribute between steps would be invisible to the replay), never read a tensor on the host
and never produce a data-dependent shape. A dispatch mode records exactly that for `Engine.static_step`, on CPU,
for every method and layout; on a GPU, tests/test_bench.py also replays real graphs against the eager path.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from xqinfer.engine import Engine

from test_bench import random_prompt, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

# Ops a graph cannot hold: a host read of a tensor's value, or an output whose shape depends on data.
UNCAPTURABLE = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
                "repeat_interleave.Tensor"}


class StepRecorder(TorchDispatchMode):
    """Every op of one step: its name, its tensors' metadata, where external state lives, its Python scalars.

    A tensor argument is "external" when no op of this step allocated its storage: the model's weights, the cache's
    buffers, the engine's input buffers. Those must be the same storage at every step; what the step allocates
    itself lives in the graph's private pool when captured, so its address does not matter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[Any, ...]]] = []
        self.kernels = 0  # ops that compute (not views, which only relabel memory and are not in a graph)
        self.allocated: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]
        input_storages = {_storage(t) for t in inputs}
        signature = tuple(self._describe(leaf) for leaf in tree_flatten((args, kwargs))[0])
        self.ops.append((str(func.overloadpacket.__name__) + "." + func._overloadname, signature))
        self.kernels += not func.is_view
        out = func(*args, **kwargs)
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor) and _storage(leaf) not in input_storages:
                self.allocated.add(_storage(leaf))
        return out

    def _describe(self, leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return repr(leaf)
        where = "step" if _storage(leaf) in self.allocated else ("external", _storage(leaf), leaf.storage_offset())
        return (tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype, where)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def recorded_decode(engine: Engine, token: torch.Tensor) -> tuple[torch.Tensor, "StepRecorder"]:
    """One `engine.decode`, with the part a graph captures (`static_step`) recorded."""
    recorder = StepRecorder()
    plain = engine.static_step

    def step(span: int) -> torch.Tensor:
        with recorder:
            return plain(span)

    engine.static_step = step
    try:
        logits = engine.decode(token)
    finally:
        del engine.static_step
    return logits, recorder


# (shape, spec, prompt length): each method and layout, the decode crossing per-channel group boundaries (KIVI's 32,
# XQuant-KV's 128 after the prompt) and, for the sliding-window model, wrapping its ring.
CASES = [
    ("mha", "fp16", 100),
    ("gqa", "fp16", 100),
    ("mha", "kivi:bits=2,group=32,residual=32", 100),
    ("gqa", "kivi:bits=2,group=32,residual=32,prerope=1", 100),
    ("gqa", "asymkv", 120),
    ("gqa", "xquant-kv", 120),
    ("mha", "xquant:bits=4", 100),
    ("mha", "xquant:bits=2,group=32,residual=0,absorb=0", 100),
    ("gqa", "xquant:bits=3,group=32,residual=32,outlier=1", 100),
    ("mha", "xquant-cl:bits=2", 100),
    ("gqa", "xquant-cl:bits=1,eta=0.2,group=32,base_layers=2", 100),
    ("ring", "fp16", 40),
    ("ring", "kivi:bits=2,group=16,residual=16", 40),
    ("ring", "xquant:bits=4,group=16,residual=16", 40),
    ("ring", "xquant-cl:bits=2,group=16", 40),
    ("dynamic", "xquant:bits=4", 180),
]
STEPS = 16


@pytest.mark.parametrize("shape,spec,prompt_length", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@torch.inference_mode()
def test_every_step_of_a_bucket_replays_the_first_steps_operations(shape, spec, prompt_length):
    model = tiny_model(shape, plain=True)
    engine = Engine(model, spec, capacity=512, allow_extrapolation=True)
    engine.cache.host_steps = False  # the path a CUDA step takes: no host reads, no kernel outside torch
    token = engine.prefill(random_prompt(prompt_length, seed=5)).argmax(dim=-1)
    assert engine.span_for(prompt_length + STEPS) == engine.span_for(prompt_length + 1), "the steps must share a bucket"
    first = None
    for step in range(STEPS):
        logits, recorder = recorded_decode(engine, token)
        ops = recorder.ops
        names = {name.split(".")[0] for name, _ in ops} | {name for name, _ in ops}
        assert not names & UNCAPTURABLE, f"step {step} reads a tensor on the host or makes a data-dependent shape: " \
                                         f"{sorted(names & UNCAPTURABLE)}"
        if first is None:
            first = ops
            assert any(name.startswith("mm") or name.startswith("addmm") or "linear" in name for name, _ in ops)
        else:
            assert len(ops) == len(first), f"step {step} issues {len(ops)} ops, the captured step {len(first)}"
            for index, (now, then) in enumerate(zip(ops, first)):
                assert now == then, f"step {step}, op {index}: {now[0]} differs from the captured step's {then[0]}: " \
                                    f"{_difference(now[1], then[1])}"
        token = logits.argmax(dim=-1)


# Computing ops (views excluded) a method adds to one decode step, per layer, over what the fp16 cache's step issues.
# On a GPU each is a kernel launch of its own at every token, even replayed from a CUDA graph (~1-2 us each), so at
# 32 layers each 10 ops per layer cost about 0.5 ms per token: as much as streaming a few GB of weights. The bounds
# keep each method near what its quantized write and read need; before they were set the steps issued about twice as
# many ops (views included: kivi 200 per layer, xquant 222 on GQA, xquant-cl 110; 110, 150 and 76 when first bounded).
# Counts are exact, so a bound that fails means new kernels in the step, not noise. On a CPU a stored fp16 scale is
# cast to float32 before dequantizing (one op per stream that a GPU does not run).
OPS_PER_LAYER = [
    ("mha", "kivi", 85),
    ("gqa", "kivi:prerope=1", 90),
    ("gqa", "asymkv", 85),
    ("gqa", "xquant-kv", 85),
    ("mha", "xquant", 52),
    ("gqa", "xquant", 98),
    ("gqa", "xquant:outlier=1,absorb=0", 96),
    ("mha", "xquant-cl", 52),
    ("gqa", "xquant-cl", 56),
]


@pytest.mark.parametrize("shape,spec,bound", OPS_PER_LAYER, ids=[f"{c[0]}-{c[1]}" for c in OPS_PER_LAYER])
@torch.inference_mode()
def test_decode_step_ops_per_layer_stay_bounded(shape, spec, bound):
    model = tiny_model(shape, plain=True)
    counts = {}
    for method in ("fp16", spec):
        engine = Engine(model, method, capacity=512)
        engine.cache.host_steps = False  # the ops of a CUDA step, which all run in torch
        token = engine.prefill(random_prompt(100, seed=5)).argmax(dim=-1)
        counts[method] = recorded_decode(engine, token)[1].kernels
    per_layer = (counts[spec] - counts["fp16"]) / model.config.num_layers
    assert per_layer <= bound, f"{spec} adds {per_layer:.1f} computing ops per layer to a decode step (bound {bound})"


def test_the_recorder_sees_a_changed_scalar_and_a_swapped_state_tensor():
    # The check above is only as good as its recorder: a position passed as a Python int must show up, and so must
    # state that a step reads from a tensor replaced between steps (a graph would keep reading the old one).
    traces = []
    buffer = torch.zeros(8)
    for position in (3, 4):
        with StepRecorder() as recorder:
            buffer.narrow(0, position, 1).fill_(1.0)
        traces.append(recorder.ops)
    assert traces[0] != traces[1]
    kept = [torch.ones(4), torch.ones(4)]  # both alive: two storages, as an attribute swapped between steps gives
    traces = []
    for state in kept:
        with StepRecorder() as recorder:
            (state * 2).sum()
        traces.append(recorder.ops)
    assert traces[0] != traces[1]
    with StepRecorder() as recorder:
        scratch = torch.ones(4)
        (scratch * 2).sum()
    assert recorder.ops[1][1][0][-1] == "step"  # what a step allocates itself may move: only its shape counts


def _difference(now: tuple, then: tuple) -> str:
    for position, (a, b) in enumerate(zip(now, then)):
        if a != b:
            return f"argument {position}: {a} != {b}"
    return f"{len(now)} arguments != {len(then)}"
