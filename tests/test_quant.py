"""Tests of xqinfer.quant: error bound, constant groups, packing, streaming == batch, calibration."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from xqinfer import quant
from xqinfer.quant import (
    BITS,
    CLIP_RATIOS,
    BitPacker,
    Layout,
    Quantized,
    clipped_params,
    dequantize,
    dequantize_codes,
    minmax_params,
    pack,
    packed_size,
    quantize_codes,
    quantize_per_channel,
    quantize_per_token,
    to_groups,
    unpack,
)

QUANTIZE = {"token": quantize_per_token, "channel": quantize_per_channel}


def _data(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal data with sparse large outliers, plus a per-channel offset so groups are not centred on 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x + torch.randn(shape[-1], generator=g) * 2.0
    outliers = torch.rand(shape, generator=g) < 0.01
    x = torch.where(outliers, x * 20.0, x)
    return x.to(dtype)


def _step(q: Quantized) -> torch.Tensor:
    """The stored scale broadcast to every element of the reconstructed tensor, float32."""
    s = q.scale.float()
    if q.axis == "token":
        return s.repeat_interleave(q.group, dim=-1)
    return s.repeat_interleave(q.group, dim=-2)


# ----------------------------------------------------------------------------------------------- error bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("group", [8, 32, 128])
@pytest.mark.parametrize("bits", BITS)
def test_error_at_most_half_step(bits: int, group: int, axis: str, dtype: torch.dtype) -> None:
    x = _data((2, 3, 256, 128), seed=bits * 1000 + group, dtype=dtype)
    q = QUANTIZE[axis](x, bits, group)
    assert q.codes.dtype == torch.uint8
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.float16
    xh = dequantize(q, torch.float32)
    assert xh.shape == x.shape
    assert torch.isfinite(xh).all()
    err = (xh - x.float()).abs()
    step = _step(q)
    tol = step * (0.5 + 1e-4) + 1e-6 * x.float().abs() + 1e-7
    assert (err <= tol).all(), f"max excess {(err - step / 2).max().item()}"
    # the default output dtype is the input's
    assert dequantize(q).dtype == dtype


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_error_bound_holds_for_every_storage_dtype(scale_dtype: torch.dtype) -> None:
    # 8 bits with a bf16 scale is where round-to-nearest storage alone would exceed half a step.
    x = _data((64, 256), seed=7) + 37.0
    for axis in ("token", "channel"):
        q = QUANTIZE[axis](x, 8, 32, scale_dtype=scale_dtype)
        assert q.scale.dtype == scale_dtype
        err = (dequantize(q, torch.float32) - x).abs()
        assert (err <= _step(q) * (0.5 + 1e-4) + 1e-6 * x.abs()).all()


def test_codes_in_range_and_cover_both_ends() -> None:
    x = _data((16, 128), seed=3)
    for bits in BITS:
        q = quantize_per_token(x, bits, 32)
        codes = unpack(q.codes, bits, 128)
        assert int(codes.max()) == (1 << bits) - 1
        assert int(codes.min()) == 0


def test_zero_is_min_rounded_down_and_scale_covers_max() -> None:
    x = torch.tensor([[0.1, 0.7, 1.3, 3.3333]])
    scale, zero = minmax_params(x, 2, torch.float16)
    assert zero.float() <= 0.1 and 0.1 - zero.float() < 1e-3
    assert zero.float() + 3 * scale.float() >= 3.3333


# ----------------------------------------------------------------------------------------------- constants


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_reconstruct_exactly(bits: int, axis: str) -> None:
    x = torch.full((2, 64, 64), 1.5)
    x[0] = -3.25
    x[1, :, 32:] = 0.0
    q = QUANTIZE[axis](x, bits, 32)
    assert (q.scale == 0).all()
    assert (unpack(q.codes, bits, 64) == 0).all()
    xh = dequantize(q)
    assert torch.equal(xh, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zeros_tensor(dtype: torch.dtype) -> None:
    x = torch.zeros(3, 32, 16, dtype=dtype)
    for axis in ("token", "channel"):
        for bits in BITS:
            q = QUANTIZE[axis](x, bits, 8)
            xh = dequantize(q)
            assert xh.dtype == dtype
            assert torch.equal(xh, x)
            assert not torch.isnan(q.scale).any() and not torch.isnan(q.zero).any()


def test_constant_in_model_dtype_is_exact_with_model_dtype_storage() -> None:
    x = torch.full((4, 32), 0.1, dtype=torch.bfloat16)
    q = quantize_per_token(x, 2, 32, scale_dtype=torch.bfloat16)
    assert torch.equal(dequantize(q), x)


def test_unrepresentable_constant_is_close_and_finite() -> None:
    x = torch.full((4, 32), 0.1)  # 0.1 is not an fp16 value
    q = quantize_per_token(x, 1, 32)
    xh = dequantize(q)
    assert torch.isfinite(xh).all()
    assert (xh - x).abs().max() < 1e-4


def test_huge_values_do_not_produce_inf_or_nan() -> None:
    x = torch.tensor([[-1e6, 5.0, 1e6, 0.0]])
    q = quantize_per_token(x, 1, 4)
    assert torch.isfinite(q.scale.float()).all() and torch.isfinite(q.zero.float()).all()
    assert torch.isfinite(dequantize(q)).all()


# ----------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", BITS)
def test_pack_roundtrip_all_lengths(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in list(range(1, 21)) + [1000]:
        codes = torch.randint(0, 1 << bits, (3, n), generator=g, dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.shape == (3, packed_size(n, bits))
        out = unpack(packed, bits, n)
        assert out.dtype == torch.uint8
        assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", BITS)
def test_pack_max_and_int_codes(bits: int) -> None:
    codes = torch.full((5, 24), (1 << bits) - 1, dtype=torch.int64)
    assert torch.equal(unpack(pack(codes, bits), bits, 24), codes.to(torch.uint8))


def test_packed_sizes() -> None:
    for n in (8, 64, 128, 1024):
        assert packed_size(n, 1) == n // 8
        assert packed_size(n, 2) == n // 4
        assert packed_size(n, 3) == n * 3 // 8
        assert packed_size(n, 4) == n // 2
        assert packed_size(n, 8) == n
    assert packed_size(1, 3) == 3 and packed_size(9, 3) == 6
    assert packed_size(1, 1) == 1 and packed_size(9, 1) == 2
    assert packed_size(3, 4) == 2 and packed_size(5, 2) == 2 and packed_size(0, 3) == 0
    x = _data((10, 128), seed=1)
    for bits in BITS:
        q = quantize_per_token(x, bits, 128)
        assert q.codes.numel() * 8 == 10 * 128 * bits  # really packed: b bits per code
        assert q.nbytes == q.codes.numel() + 2 * 10 * 2


def test_pack_layout_is_lsb_first() -> None:
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0b10000001]
    assert pack(torch.tensor([3, 1]), 2).tolist() == [0b0111]
    assert pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [
        (w >> s) & 0xFF
        for w in [sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))]
        for s in (0, 8, 16)
    ]


def test_unpack_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(4, dtype=torch.uint8), 3, 8)


@pytest.mark.parametrize("bits", BITS)
def test_a_packer_made_once_packs_like_the_module_functions(bits: int) -> None:
    # A cache's BitPacker is reused by every step; in_range only drops the masking of codes already in range.
    packer = BitPacker(bits)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 21), generator=g, dtype=torch.uint8)
    wild = torch.randint(-300, 300, (3, 21), generator=g)
    for _ in range(2):
        assert torch.equal(packer.pack(codes), pack(codes, bits))
        assert torch.equal(packer.pack(codes, in_range=True), pack(codes, bits))
        assert torch.equal(packer.pack(wild), pack(wild, bits))
        assert torch.equal(packer.unpack(pack(codes, bits), 21), codes)
    x = _data((4, 64), seed=bits)
    for quantize in QUANTIZE.values():
        q = quantize(x, bits, 16, packer=packer)
        assert torch.equal(q.codes, quantize(x, bits, 16).codes)
        assert torch.equal(dequantize(q, packer=packer), dequantize(q))
    with pytest.raises(ValueError, match="packer"):
        quantize_per_token(x, 2 if bits != 2 else 4, 16, packer=packer)


# ----------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("bits", BITS)
def test_per_token_streaming_equals_batch(bits: int) -> None:
    x = _data((2, 4, 17, 64), seed=11, dtype=torch.bfloat16)
    whole = quantize_per_token(x, bits, 32)
    parts = [quantize_per_token(x[..., t : t + 1, :], bits, 32) for t in range(x.shape[-2])]
    for field in ("codes", "scale", "zero"):
        streamed = torch.cat([getattr(p, field) for p in parts], dim=-2)
        assert torch.equal(streamed, getattr(whole, field)), field


@pytest.mark.parametrize("bits", BITS)
def test_per_channel_blocks_equal_batch(bits: int) -> None:
    group, k = 32, 4
    x = _data((2, 4, group * k, 64), seed=12)
    whole = quantize_per_channel(x, bits, group)
    assert whole.scale.shape == (2, 4, k, 64)
    assert whole.codes.shape == (2, 4, group * k, packed_size(64, bits))
    parts = [quantize_per_channel(x[..., i * group : (i + 1) * group, :], bits, group) for i in range(k)]
    for field in ("codes", "scale", "zero"):
        streamed = torch.cat([getattr(p, field) for p in parts], dim=-2)
        assert torch.equal(streamed, getattr(whole, field)), field


def test_shapes_and_group_clipping() -> None:
    x = _data((3, 40, 64), seed=5)
    q = quantize_per_token(x, 4, 128)  # group > C: the group is the whole channel vector
    assert q.group == 64 and q.scale.shape == (3, 40, 1) and q.codes.shape == (3, 40, 32)
    q = quantize_per_token(x, 3, 16)
    assert q.scale.shape == (3, 40, 4) and q.codes.shape == (3, 40, 24) and q.shape == x.shape
    q = quantize_per_channel(x, 2, 128)  # group > T: the group is all the tokens
    assert q.group == 40 and q.scale.shape == (3, 1, 64) and q.codes.shape == (3, 40, 16)
    q = quantize_per_channel(x, 2, 8)
    assert q.scale.shape == (3, 5, 64)
    assert to_groups(x, 8, "token").shape == (3, 40, 8, 8)
    assert to_groups(x, 8, "channel").shape == (3, 5, 8, 64)


def test_simulate_matches_quantize_dequantize() -> None:
    x = _data((2, 64, 128), seed=9, dtype=torch.bfloat16)
    for axis in ("token", "channel"):
        for bits in BITS:
            for eta in (0.0, 0.1):
                ref = dequantize(QUANTIZE[axis](x, bits, 32), eta=eta)
                assert torch.equal(Layout(bits, 32, axis, eta=eta).simulate(x), ref)


def test_low_level_functions_compose_into_preallocated_buffers() -> None:
    x = _data((2, 2, 8, 64), seed=4)
    bits, group = 2, 16
    codes_buf = torch.zeros(2, 2, 32, packed_size(64, bits), dtype=torch.uint8)
    scale_buf = torch.zeros(2, 2, 32, 64 // group, dtype=torch.float16)
    zero_buf = torch.zeros_like(scale_buf)
    xg = to_groups(x, group, "token")
    scale, zero = minmax_params(xg, bits, torch.float16, dim=-1)
    codes = quantize_codes(xg, scale, zero, bits)
    codes_buf[..., 4:12, :] = pack(codes.flatten(-2), bits)
    scale_buf[..., 4:12, :] = scale.squeeze(-1)
    zero_buf[..., 4:12, :] = zero.squeeze(-1)
    ref = quantize_per_token(x, bits, group)
    assert torch.equal(codes_buf[..., 4:12, :], ref.codes)
    view = dataclasses.replace(ref, codes=codes_buf[..., 4:12, :], scale=scale_buf[..., 4:12, :],
                               zero=zero_buf[..., 4:12, :])
    assert torch.equal(dequantize(view), dequantize(ref))


# ----------------------------------------------------------------------------------------------- clip search


def _group_errors(xg: torch.Tensor, scale, zero, bits: int, eta: float = 0.0) -> torch.Tensor:
    codes = quantize_codes(xg, scale, zero, bits)
    return (dequantize_codes(codes, scale, zero, bits, torch.float32, eta=eta) - xg).square().sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("eta", [0.0, 0.045])
def test_clip_search_picks_the_first_best_ratio_of_every_group(bits: int, eta: float) -> None:
    xg = to_groups(_data((64, 256), seed=11), 64, "token")
    scale, zero = clipped_params(xg, bits, eta=eta)
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    errors, params = [], []
    for ratio in CLIP_RATIOS:  # one candidate at a time, as the search's definition reads
        inset = (1.0 - ratio) / 2 * (hi - lo)
        z = quant._round_stored(lo + inset, torch.float16, float("-inf"))
        s = quant._round_stored((hi - inset - z.float()).clamp_min(0) / (2**bits - 1), torch.float16, float("inf"))
        errors.append(_group_errors(xg, s, z, bits, eta))
        params.append((s, z))
    best = torch.stack(errors).argmin(0)
    expected_scale = torch.stack([s for s, _ in params]).squeeze(-1)
    expected_zero = torch.stack([z for _, z in params]).squeeze(-1)
    assert torch.equal(scale.squeeze(-1), expected_scale.gather(0, best[None]).squeeze(0))
    assert torch.equal(zero.squeeze(-1), expected_zero.gather(0, best[None]).squeeze(0))


def test_clip_search_lowers_the_error_of_gaussian_groups_by_about_a_third() -> None:
    xg = to_groups(torch.randn(256, 384, generator=torch.Generator().manual_seed(3)), 384, "token")
    plain = _group_errors(xg, *minmax_params(xg, 3), 3)
    searched = _group_errors(xg, *clipped_params(xg, 3), 3)
    assert bool((searched <= plain).all())
    assert 0.55 < float(searched.sum() / plain.sum()) < 0.8


def test_clip_search_keeps_constant_groups_exact_and_min_max_when_nothing_beats_it() -> None:
    constant = torch.full((4, 1, 32), 0.75)
    scale, zero = clipped_params(constant, 2)
    assert torch.equal(dequantize_codes(quantize_codes(constant, scale, zero, 2), scale, zero, 2), constant)
    two_values = torch.tensor([[-1.0, 3.0] * 8])  # min-max puts both on a level: error 0, the first ratio
    searched, plain = clipped_params(two_values, 2), minmax_params(two_values, 2)
    assert torch.equal(searched[0], plain[0]) and torch.equal(searched[1], plain[1])


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_clip_search_leaves_the_padding_of_a_ragged_group_out(axis: str) -> None:
    x = _data((40, 96), seed=5)
    if axis == "channel":
        x = x.T.contiguous()  # 96 tokens of 40 channels; round_trip pads the last group of 64 tokens
    layout = Layout(3, 64, axis, clip=True)
    out = layout.simulate(x)
    tail = x[..., 64:] if axis == "token" else x[64:]
    alone = Layout(3, 64, axis, clip=True).simulate(tail)
    assert torch.equal(out[..., 64:] if axis == "token" else out[64:], alone)


def test_clip_search_quantize_and_simulate_agree() -> None:
    x = _data((2, 64, 128), seed=8, dtype=torch.bfloat16)
    for axis in ("token", "channel"):
        layout = Layout(3, 32, axis, clip=True)
        q = layout.quantize(x)
        codes = layout.unpack(q.codes, x.shape[-1])
        assert torch.equal(layout.dequantize(codes, q.scale, q.zero, x.dtype), layout.simulate(x))
        assert not torch.equal(layout.simulate(x), Layout(3, 32, axis).simulate(x))


# ----------------------------------------------------------------------------------------------- calibration


def test_eta_zero_is_plain() -> None:
    x = _data((8, 128), seed=2)
    q = quantize_per_token(x, 2, 32)
    codes = unpack(q.codes, 2, 128).float().view(8, 4, 32)
    plain = (codes * q.scale.float().unsqueeze(-1) + q.zero.float().unsqueeze(-1)).view(8, 128)
    assert torch.equal(dequantize(q, eta=0.0), plain)
    assert torch.equal(dequantize(q), plain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eta", [0.0, 0.045])
def test_dequantizing_into_half_precision_rounds_the_float32_result_once(dtype, eta) -> None:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 4, (3, 8, 4, 16), dtype=torch.uint8, generator=g)
    scale = (torch.rand(3, 8, 1, 16, generator=g) * 3).half()
    zero = (torch.randn(3, 8, 1, 16, generator=g) * 10).half()
    out = dequantize_codes(codes, scale, zero, 2, dtype, eta=eta)
    assert out.dtype == dtype and out.shape == codes.shape
    assert torch.equal(out, dequantize_codes(codes, scale, zero, 2, torch.float32, eta=eta).to(dtype))


def test_eta_formula() -> None:
    codes = torch.tensor([0, 1, 2, 3], dtype=torch.uint8)
    scale, zero = torch.tensor(2.0), torch.tensor(-1.0)
    out = dequantize_codes(codes, scale, zero, 2, torch.float32, eta=0.045)
    z_hat, s_hat = -1.0 + 0.045 * 2.0 * 3, (1 - 0.09) * 2.0
    assert torch.allclose(out, z_hat + s_hat * torch.arange(4.0))


def test_eta_one_bit_relative_mse() -> None:
    # Relative MSE = mean((x - x̂)²) / var(x), both over the whole tensor (zero-mean data, so var ≈ mean(x²)).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 512, generator=g)
    rel = {}
    for eta in (0.0, 1 / 6):
        err = Layout(1, 32, "token", eta=eta).simulate(x) - x
        rel[eta] = float(err.pow(2).mean() / x.var())
    assert rel[0.0] == pytest.approx(1.96, rel=0.05)
    assert rel[1 / 6] == pytest.approx(0.68, rel=0.05)


# ----------------------------------------------------------------------------------------------- validation


def test_validation_messages() -> None:
    x = torch.randn(4, 32)
    for bad in (0, 5, 6, 16, 2.0):
        with pytest.raises(ValueError, match="1, 2, 3, 4, 8"):
            quantize_per_token(x, bad, 8)  # type: ignore[arg-type]
    for bad in (0, -1):
        with pytest.raises(ValueError, match=">= 1"):
            quantize_per_token(x, 2, bad)
    # Groups of channels may be ragged (tests/test_ragged.py); groups of tokens must tile them.
    with pytest.raises(ValueError, match="multiple"):
        quantize_per_channel(torch.randn(48, 4), 2, 32)
    with pytest.raises(ValueError, match="1, 2, 3, 4, 8"):
        packed_size(8, 7)
    with pytest.raises(ValueError, match="axis"):
        Layout(2, 8, "row")  # type: ignore[arg-type]


def test_public_names_exist() -> None:
    for name in quant.__all__:
        assert hasattr(quant, name)
