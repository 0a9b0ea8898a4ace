"""Fused latent attention (xqinfer.kernels) against its torch reference, and the reference against the cache's own path.

Without CUDA the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before triton is
imported); with CUDA they are compiled and run on the GPU with the same tolerances. The interpreter costs about a
millisecond per Triton operation, so shapes are tiny (span <= 160, C <= 64 but for SmolLM2's ragged 192, head_dim
32) and each case runs a handful of programs.

Accuracy is measured against the reference computed in fp32 from the same inputs (q, Mk, RoPE tables and ring
values upcast; codes, scales and zeros as stored): the kernel's bf16 error is then its own (operands rounded to bf16
for the tensor cores, fp32 accumulation), next to that of the bf16 torch path, which also rounds its scores.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton and of the kernels module

pytest.importorskip("triton", reason="triton is not installed (optional: pip install 'xqinfer[triton]'); "
                                     "the fused kernels are skipped and xqinfer uses the torch path")

from xqinfer import quant  # noqa: E402
from xqinfer.attention import attend_rebuilt  # noqa: E402
from xqinfer.cache.base import EMPTY_SLOT  # noqa: E402
from xqinfer.cache.stream import QuantStream  # noqa: E402
from xqinfer.kernels import (  # noqa: E402
    KernelConfig,
    Override,
    QuantizedHistory,
    fused_latent_attention,
    fused_supported,
    fused_x_attention,
    latent_attention,
    latent_attention_reference,
    triton_available,
    x_attention_reference,
)
from xqinfer.rope import apply_rotary  # noqa: E402

# Garbage in EMPTY slots (inf/NaN scales) flows through numpy inside the interpreter before where() discards it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """The interpreter runs numpy on tiny blocks: a second OpenMP thread only adds waiting."""
    yield


def _tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _latents(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Normal latents with a per-channel offset and scale, and a few outliers (what X·U looks like)."""
    x = torch.randn(shape, generator=generator)
    x = x * (0.5 + torch.rand(shape[-1], generator=generator)) + torch.randn(shape[-1], generator=generator)
    return torch.where(torch.rand(shape, generator=generator) < 0.01, x * 8.0, x)


def make_case(*, batch=1, heads=4, kv_heads=1, head_dim=32, channels=64, span=96, group=32, key_bits=4,
              value_bits=4, length=None, dtype=torch.bfloat16, override=None, residual=None, eta=0.0,
              batch_mask=False, tables="rope", seed=0):
    """Arguments of one decode step as a cache would hold them: tokens [0, length) filled, the rest EMPTY slots.

    EMPTY slots get garbage codes and inf/NaN scales (a masked slot must not leak into the output). With
    `override` ("dense" or "ring"), recent tokens come from full-precision values like QuantStream.read: for keys
    (per channel) every token since the last flush of `residual` (default: the group), whose group is open and so
    holds garbage codes and scales here; for values (per token) the `residual` newest tokens.
    """
    g = torch.Generator().manual_seed(seed)
    length = span if length is None else length
    key_x = _latents((batch, span, channels), g)
    value_x = _latents((batch, span, channels), g)
    kq = quant.quantize_per_channel(key_x, key_bits, group)
    vq = quant.quantize_per_token(value_x, value_bits, group)
    key_codes, key_scale, key_zero = kq.codes.clone(), kq.scale.clone(), kq.zero.clone()
    value_codes, value_scale, value_zero = vq.codes.clone(), vq.scale.clone(), vq.zero.clone()
    key_group = kq.group

    empty = torch.arange(span) >= length
    key_codes[:, empty] = torch.randint(0, 256, key_codes[:, empty].shape, generator=g, dtype=torch.uint8)
    value_codes[:, empty] = torch.randint(0, 256, value_codes[:, empty].shape, generator=g, dtype=torch.uint8)
    value_scale[:, empty] = float("nan")
    value_zero[:, empty] = float("inf")
    empty_groups = torch.arange(span // key_group) * key_group >= length
    key_scale[:, empty_groups] = float("inf")
    key_zero[:, empty_groups] = float("nan")

    key_ov = value_ov = None
    if override is not None:
        flush = residual or key_group
        key_from = length // flush * flush
        value_from = length - (residual if residual is not None else 16)
        tokens = torch.arange(span)
        key_recent = (tokens >= key_from) & ~empty
        value_recent = (tokens >= value_from) & ~empty
        # The open group was never stored: its codes and scales are stale garbage that the override must hide.
        open_group = key_from // key_group
        if key_from < length:
            key_codes[:, key_from:length] = 0xFF
            key_scale[:, open_group] = float("inf")
        if override == "dense":
            key_ov = Override(key_recent, key_x.to(dtype))
            value_ov = Override(value_recent, value_x.to(dtype))
        else:
            ring = 40  # a ring that is not the span: rows are position % ring
            rows = tokens % ring
            key_ring = torch.full((batch, ring, channels), float("nan"))
            value_ring = torch.full((batch, ring, channels), float("nan"))
            key_ring[:, rows[key_recent]] = key_x[:, key_recent]
            value_ring[:, rows[value_recent]] = value_x[:, value_recent]
            key_ov = Override(key_recent, key_ring.to(dtype), rows.to(torch.int32))
            value_ov = Override(value_recent, value_ring.to(dtype), rows)

    mk = (torch.randn(channels, kv_heads * head_dim, generator=g) / math.sqrt(channels)).to(dtype)
    q = torch.randn(batch, heads, head_dim, generator=g).to(dtype)
    cos, sin = _tables(torch.arange(span) + 3, head_dim, dtype)
    if tables == "random":  # halves that differ: the kernel must not assume cos[:, :D/2] == cos[:, D/2:]
        cos, sin = (torch.randn(span, head_dim, generator=g).to(dtype) for _ in range(2))
    mask = ~empty
    if batch_mask:
        mask = mask.expand(batch, span).clone()
        mask[-1] = False  # the last sequence attends to nothing: zeros, not NaN
    keys = QuantizedHistory(key_codes, key_scale, key_zero, key_bits, key_ov)
    values = QuantizedHistory(value_codes, value_scale, value_zero, value_bits, value_ov)
    args = [q, keys, values, mk, cos, sin, mask, group]
    return _to(args, DEVICE), {"eta": eta}


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Override):
        return Override(*(None if t is None else t.to(device) for t in value))
    if isinstance(value, QuantizedHistory):
        return QuantizedHistory(value.codes.to(device), value.scale.to(device), value.zero.to(device), value.bits,
                                _to(value.override, device))
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def _exact_fp32(history: QuantizedHistory) -> QuantizedHistory:
    """The history with its override's full-precision rows in fp32 (codes, scales and zeros stay as stored)."""
    if history.override is None:
        return history
    return replace(history, override=history.override._replace(exact=history.override.exact.float()))


def _upcast(args):
    """The same problem with every model-dtype tensor in fp32: q, mk, the RoPE tables and the overrides' rows."""
    q, keys, values, mk, cos, sin, mask, group = args
    return [q.float(), _exact_fp32(keys), _exact_fp32(values), mk.float(), cos.float(), sin.float(), mask, group]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _check(args, kwargs, config=None):
    out = fused_latent_attention(*args, **kwargs, config=config)
    dtype = args[0].dtype
    assert out.shape == (args[0].shape[0], args[0].shape[1], args[3].shape[0]) and out.dtype == dtype
    assert torch.isfinite(out).all()
    exact = latent_attention_reference(*_upcast(args), **kwargs)
    torch_path = latent_attention_reference(*args, **kwargs)
    error, torch_error = _relative(out, exact), _relative(torch_path, exact)
    assert error <= TOLERANCE[dtype], f"kernel error {error:.2e} (the torch path in {dtype}: {torch_error:.2e})"
    # fp32 accumulation and fp32 scores: never much worse than the torch path, which rounds K and the scores.
    assert error <= 1.5 * torch_error + TOLERANCE[dtype] / 10, f"kernel {error:.2e} vs torch path {torch_error:.2e}"
    return out, exact


CASES = {
    # every width on both sides, group 32 / 128 / == span, odd fills, spans that are not multiples of the tiles,
    # batch 1 and 2, GQA groups 1, 2 and 4, with and without the residual override
    "k2v2-g32": dict(key_bits=2, value_bits=2, span=96, length=95),
    "k3v3-g32-b2-gqa2-ring": dict(key_bits=3, value_bits=3, span=160, length=131, batch=2, heads=4, kv_heads=2,
                                  override="ring"),
    "k4v4-g128=span-dense": dict(key_bits=4, value_bits=4, group=128, span=128, length=77, heads=1,
                                 override="dense"),
    "k8v8-b2-mha-ring": dict(key_bits=8, value_bits=8, span=64, batch=2, heads=2, kv_heads=2, override="ring",
                             residual=32),
    "k2v8-g128>span": dict(key_bits=2, value_bits=8, group=128, span=96, length=50, override="ring", residual=0),
    "k8v3-c48": dict(key_bits=8, value_bits=3, group=16, channels=48, span=80, length=67, override="dense"),
    "k3v2-fp16-tables": dict(key_bits=3, value_bits=2, span=160, length=101, dtype=torch.float16, batch=2,
                             tables="random"),
    "k4v3-fp32-ring": dict(key_bits=4, value_bits=3, span=96, length=70, dtype=torch.float32, override="ring"),
    "k4v4-eta": dict(key_bits=4, value_bits=2, span=64, length=60, eta=0.1, override="dense"),
    "k4v4-b2-nothing-allowed": dict(span=64, length=40, batch=2, batch_mask=True),
    # ragged value rows: SmolLM2's 192 latents at G = 128 (128 + 64, whole 64-channel tiles), and 48 at G = 7 (six
    # groups of 7 and one of 6, scales gathered per channel)
    "k4v3-c192-g128-ragged-ring": dict(key_bits=4, value_bits=3, group=128, channels=192, span=128, length=120,
                                       heads=3, override="ring"),
    "k2v4-c48-g7-ragged-dense": dict(key_bits=2, value_bits=4, group=7, channels=48, span=56, length=50,
                                     override="dense"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_reference(name):
    args, kwargs = make_case(**CASES[name])
    out, exact = _check(args, kwargs)
    if CASES[name].get("batch_mask"):
        assert (out[-1] == 0).all() and (exact[-1] == 0).all()


@pytest.mark.parametrize("config,key_bits,value_bits", [
    # several channel chunks (the last one partial: C = 48), uneven slices, per-channel groups smaller than a tile
    (KernelConfig(block_n=16, block_c=16, block_cv=32, kv_block=1, splits=10), 3, 4),  # > 8 slices to combine
    (KernelConfig(block_n=64, block_c=32, block_cv=16, kv_block=2, splits=7), 2, 2),  # splits > tiles: capped
])
def test_tilings(config, key_bits, value_bits):
    args, kwargs = make_case(key_bits=key_bits, value_bits=value_bits, span=160, length=150, channels=48, group=16,
                             override="ring", kv_heads=2, heads=8)
    _check(args, kwargs, config)


def test_bad_inputs_are_refused():
    args, kwargs = make_case(span=64)
    wrong = list(args)
    wrong[1] = replace(args[1], scale=args[1].scale[:, :1])  # per-channel scales for one group of a 2-group span
    with pytest.raises(ValueError, match=r"keys\.scale"):
        fused_latent_attention(*wrong)
    with pytest.raises(ValueError, match="power of two"):
        fused_latent_attention(*args, config=KernelConfig(block_n=24))
    with pytest.raises(ValueError, match="one decode token"):
        fused_latent_attention(args[0][:, :, None].expand(-1, -1, 2, -1), *args[1:])


def test_dispatch_falls_back_to_torch():
    assert triton_available()
    args, kwargs = make_case(head_dim=16, heads=2, kv_heads=2, span=64)
    assert "head_dim 16" in fused_supported(args[0], args[3])
    assert torch.equal(latent_attention(*args, **kwargs), latent_attention_reference(*args, **kwargs))
    args, kwargs = make_case(span=64)
    assert fused_supported(args[0], args[3]) is None
    assert torch.equal(latent_attention(*args, **kwargs), fused_latent_attention(*args, **kwargs))


# ---------------------------------------------------------------------------------------------------- integration


def _streams_after(length, span, channels, batch, group, residual, bits, generator):
    """A key (per channel) and a value (per token) stream holding `length` tokens, written like a prefill + decode."""
    streams = [QuantStream((batch,), span, channels, bits, group, axis, residual, torch.float32, torch.device("cpu"))
               for axis in ("channel", "token")]
    latents = [_latents((batch, length, channels), generator) for _ in streams]
    for stream, x in zip(streams, latents, strict=True):
        stream.write(x[:, : length - 1], torch.arange(length - 1))
        stream.write(x[:, length - 1 :], torch.tensor([length - 1]))
    return streams


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_integration_recipe_matches_the_cache_path(fused):
    """The arguments xquant.py would pass (stream buffers, Override from the ring) give what its decode step gives."""
    g = torch.Generator().manual_seed(3)
    batch, heads, kv_heads, head_dim, channels, span, group, residual, length = 2, 4, 2, 32, 64, 128, 32, 32, 103
    key_stream, value_stream = _streams_after(length, span, channels, batch, group, residual, 3, g)
    slot_positions = torch.where(torch.arange(span) < length, torch.arange(span), EMPTY_SLOT)
    stored_length = torch.tensor(length)
    mask = (slot_positions >= 0)[None, :]  # step.mask of the decode step at position length - 1
    cos, sin = _tables(slot_positions.clamp(min=0), head_dim, torch.float32)
    mk = torch.randn(channels, kv_heads * head_dim, generator=g) / math.sqrt(channels)
    mv = torch.randn(channels, kv_heads * head_dim, generator=g) / math.sqrt(channels)
    q = torch.randn(batch, heads, 1, head_dim, generator=g)

    # What XQuantGQALayer.attend computes for a decode step (absorb=1).
    keys = key_stream.read(stored_length, slot_positions) @ mk
    keys = apply_rotary(keys.view(batch, span, kv_heads, head_dim).transpose(1, 2), cos, sin)
    values = value_stream.read(stored_length, slot_positions)
    expected = attend_rebuilt(q, keys, values, mv, None, mask, 1 / math.sqrt(head_dim), absorb=True)

    def override(stream):
        recent = (slot_positions >= stream._full_precision_from(stored_length)) & (slot_positions >= 0)
        return Override(recent, stream.ring, slot_positions.clamp(min=0) % stream.ring_size)

    keys = QuantizedHistory(key_stream.codes[:, :span], key_stream.scale[:, : span // group],
                            key_stream.zero[:, : span // group], 3, override(key_stream))
    values = QuantizedHistory(value_stream.codes[:, :span], value_stream.scale[:, :span],
                              value_stream.zero[:, :span], 3, override(value_stream))
    run = fused_latent_attention if fused else latent_attention_reference
    mixed = run(*_to([q, keys, values, mk, cos, sin, mask, group], DEVICE)).cpu()  # [B, H, C]
    per_head = mv.view(channels, kv_heads, head_dim).transpose(0, 1)
    out = (mixed.view(batch, kv_heads, heads // kv_heads, channels) @ per_head).reshape(batch, heads, 1, head_dim)
    assert _relative(out, expected) <= 1e-5


@pytest.mark.parametrize("heads, group", [(2, 32), (3, 64)], ids=["d64-g32", "d96-g64-ragged"])
def test_mha_x_attention(heads, group):
    """XQuant on MHA: X per token for both keys and values, K = RoPE(X̂·Wkᵀ); Wkᵀ passed as a strided view. A hidden
    size of 96 at G = 64 makes every row ragged (64 + 32) on both sides."""
    g = torch.Generator().manual_seed(5)
    batch, head_dim, span, length = 2, 32, 96, 90
    hidden = heads * head_dim
    x = _latents((batch, span, hidden), g)
    xq = quant.quantize_per_token(x, 4, group)
    wk = torch.randn(heads * head_dim, hidden, generator=g) / math.sqrt(hidden)
    cos, sin = _tables(torch.arange(span), head_dim, torch.bfloat16)
    q = torch.randn(batch, heads, head_dim, generator=g).bfloat16()
    wk = wk.bfloat16()
    mask = torch.arange(span) < length
    recent = (torch.arange(span) >= length - 8) & mask
    stream = QuantizedHistory(xq.codes, xq.scale, xq.zero, 4, Override(recent, x.bfloat16()))
    q, stream, wk_t, cos, sin, mask = _to([q, stream, wk.T, cos, sin, mask], DEVICE)
    out = fused_x_attention(q, stream, wk_t, cos, sin, mask, group)
    exact = x_attention_reference(q.float(), _exact_fp32(stream), wk_t.float(), cos.float(), sin.float(), mask, group)
    assert torch.isfinite(out).all()
    assert _relative(out, exact) <= TOLERANCE[torch.bfloat16]


# ---------------------------------------------------------------------------------------------------- GPU compile

_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class OfflineDriver:
    # Just enough of a driver for `kernel.warmup`: triton's JIT then specializes the arguments and compiles
    # exactly as for a launch (through ptxas, to a cubin), without a device.
    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


driver.set_active(OfflineDriver(int(sys.argv[1])))
from xqinfer import quant
from xqinfer.kernels import KernelConfig, Override, QuantizedHistory, fused


def case(dtype, key_bits, value_bits, key_axis, override, eta, kv_block):
    # Llama-like per-head shapes (head_dim 128, GQA group 4) at a small span; the GPU's default tiling (128-token
    # tiles, 8 warps) and the 64-token one with two KV heads per program.
    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, head_dim, channels, span, group = 1, 8, 2, 128, 256, 256, 128
    x = torch.randn(batch, span, channels, generator=g)
    kq = (quant.quantize_per_channel if key_axis == "channel" else quant.quantize_per_token)(x, key_bits, group)
    vq = quant.quantize_per_token(x, value_bits, group)
    block_n, warps = (128, 8) if kv_block == 1 else (64, 4)
    config = KernelConfig(block_n=block_n, block_c=64, block_cv=64, kv_block=kv_block, splits=2, num_warps=warps,
                          num_stages=2)
    key_override = value_override = None
    if override:
        recent = torch.arange(span) >= span - 40
        key_override = Override(recent, x.to(dtype))
        value_override = Override(recent, x[:, :64].to(dtype), torch.arange(span) % 64)
    keys = QuantizedHistory(kq.codes, kq.scale, kq.zero, key_bits, key_override)
    values = QuantizedHistory(vq.codes, vq.scale, vq.zero, value_bits, value_override)
    q = torch.randn(batch, heads, head_dim).to(dtype)
    mk = torch.randn(channels, kv_heads * head_dim).to(dtype)
    table = torch.randn(span, head_dim).to(dtype)
    return fused.prepare(q, keys, values, mk, table, table, torch.ones(span, dtype=torch.bool), group, eta=eta,
                         key_axis=key_axis, config=config)


for spec in [(torch.bfloat16, 4, 3, "channel", True, 0.0, 1), (torch.float16, 2, 8, "token", False, 0.1, 2)]:
    for call in case(*spec).calls:
        call.kernel.warmup(*call.args, grid=call.grid, **call.meta, **call.options)
    print("compiled", *spec)
"""


def test_compiles_for_hopper(tmp_path):
    """The interpreter cannot catch what only the GPU compiler checks (dot operand types, layouts, constexprs): run
    triton's JIT on the real launch arguments for sm_90 (H100/H200), down to a cubin with its bundled ptxas, with an
    offline driver (no GPU needed). fp32 compiles too (4 s more: left out for time)."""
    import subprocess
    import sys

    import triton

    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, "90"], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    if result.returncode and "OfflineDriver" in result.stderr and "AttributeError" in result.stderr:
        pytest.skip(f"triton {triton.__version__}'s JIT wants more of a driver than the offline stand-in offers")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 2


# ---------------------------------------------------------------------------------------------------- cache glue


GLUE_TOLERANCE = 1e-4 if DEVICE.type == "cuda" else 1e-5  # fp32 either way; GPU sums in another order


def _decode_through_glue(monkeypatch, config, spec: str, capacity: int, prompt: int, steps: int, layer_cls,
                         fusable, decode) -> list[float]:
    """Runs a prefill and decode steps of a random model; at every decode step of every layer, compares the layer's
    torch output with the glue's fused output over the same buffers (the token is written by then)."""
    from xqinfer.engine import Engine
    from xqinfer.loader import random_model

    model = random_model(config, torch.float32, DEVICE, seed=1)
    errors = []
    original = layer_cls.attend

    def spy(self, step, x, q, k, v):
        out = original(self, step, x, q, k, v)
        if not step.concat:
            assert fusable(self, q, step, interpreter=True) is None, fusable(self, q, step, interpreter=True)
            if not q.is_cuda:  # without the opt-in, a CPU model keeps its torch path even under TRITON_INTERPRET=1
                assert "CUDA" in fusable(self, q, step)
            tiling = KernelConfig(block_n=128, block_c=128, block_cv=128)
            errors.append(_relative(decode(self, q, step, config=tiling), out))
        else:
            assert fusable(self, q, step, interpreter=True) is not None
        return out

    monkeypatch.setattr(layer_cls, "attend", spy)
    engine = Engine(model, spec, capacity=capacity, cuda_graph=False)
    g = torch.Generator().manual_seed(0)
    engine.prefill(torch.randint(0, config.vocab_size, (prompt,), generator=g).tolist())
    for _ in range(steps):
        token = torch.randint(0, config.vocab_size, (1,), generator=g)
        engine.decode(token, int(token))
    assert len(errors) == steps * config.num_layers
    return errors


GLUE_GQA = {
    # Llama-tiny (GQA 8/4, head_dim 32): token 71 reads keys since position 64 and the 32 newest values from the rings.
    "llama-tiny": (dict(num_layers=2), "xquant:bits=3,group=32,residual=32"),
    # A small SmolLM2-like GQA (6/3 heads of 32, kv_dim 96): value latent rows of 96 at G = 64 are ragged (64 + 32).
    "ragged": (dict(num_layers=2, hidden_size=192, num_heads=6, num_kv_heads=3), "xquant:bits=3,group=64,residual=64"),
}


@pytest.mark.parametrize("case", list(GLUE_GQA))
def test_glue_gqa_decode_matches_the_layer(monkeypatch, case):
    """The fused decode of every layer equals XQuantGQALayer's torch output."""
    import dataclasses

    from xqinfer.cache.xquant import XQuantGQALayer
    from xqinfer.cache.xquant_decode import gqa_decode, gqa_fusable
    from xqinfer.presets import preset_config

    changes, spec = GLUE_GQA[case]
    config = dataclasses.replace(preset_config("llama-tiny"), **changes)
    errors = _decode_through_glue(monkeypatch, config, spec, 256, 70, 1, XQuantGQALayer, gqa_fusable, gqa_decode)
    assert max(errors) <= GLUE_TOLERANCE, errors


GLUE_MHA = {
    "llama-tiny": dict(num_kv_heads=8, num_layers=2),  # 8/8 heads, hidden 256 at G = 64
    "ragged": dict(hidden_size=96, num_heads=3, num_kv_heads=3, num_layers=2),  # X rows of 96 at G = 64: 64 + 32
}


@pytest.mark.parametrize("case", list(GLUE_MHA))
def test_glue_mha_decode_matches_the_layer(monkeypatch, case):
    """MHA: X per token, K = X̂·Wkᵀ, Wvᵀ applied per head after the kernel."""
    import dataclasses

    from xqinfer.cache.xquant import XQuantMHALayer
    from xqinfer.cache.xquant_decode import mha_decode, mha_fusable
    from xqinfer.presets import preset_config

    config = dataclasses.replace(preset_config("llama-tiny"), **GLUE_MHA[case])
    errors = _decode_through_glue(monkeypatch, config, "xquant:bits=4,group=64,residual=16", 256, 40, 1,
                                  XQuantMHALayer, mha_fusable, mha_decode)
    assert max(errors) <= GLUE_TOLERANCE, errors


def test_glue_refuses_what_the_kernel_does_not_do():
    from types import SimpleNamespace as NS

    from xqinfer.cache.xquant_decode import gqa_fusable

    stream = NS(passthrough=False, codes=torch.zeros(1))
    layer = NS(outlier_channel=None, key_latents=stream, value_latents=stream, mv=torch.zeros(64, 64),
               mk=torch.zeros(64, 64), parent=NS(spec=NS(options={"absorb": 1, "fused": 1})))
    q = torch.zeros(1, 2, 1, 32, device=DEVICE)
    assert gqa_fusable(layer, q, NS(concat=True)) == "not a single-token decode step"
    assert "outlier" in gqa_fusable(NS(outlier_channel=object()), q, NS(concat=False))
    for change, reason in (({"key_latents": NS(passthrough=True)}, "bits=16"),
                           ({"value_latents": NS(passthrough=False, codes=None)}, "shares"),
                           ({"parent": NS(spec=NS(options={"absorb": 0, "fused": 1}))}, "absorb"),
                           ({"parent": NS(spec=NS(options={"absorb": 1, "fused": 0}))}, "fused=0")):
        assert reason in gqa_fusable(NS(**(vars(layer) | change)), q, NS(concat=False), interpreter=True)
