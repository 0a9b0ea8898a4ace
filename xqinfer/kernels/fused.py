"""Triton kernels: one decode step of XQuant attention straight from the quantized latents (flash-decoding style).

What is fused (see `reference.py` for the math, which this reproduces): per (sequence, KV head, slice of tokens),

  phase 1, for every tile of BLOCK_N tokens of the slice:
      unpack + dequantize the key latents [BLOCK_N, BLOCK_C] (or take the exact ring rows of recent tokens)
      -> K tile += L̂k tile · Mk[c-chunk, head columns]        tl.dot, fp32 accumulation, looping over C
      -> RoPE at the tokens' positions (rotate-half, done on the two halves of K, which are two accumulators)
      -> scores of the GQA group of query heads, scaled, masked; online (max, sum) of the softmax
      -> the raw scores of the slice go to a small fp32 scratch [B, H, span] (4·H bytes per token)
  phase 2, for every chunk of BLOCK_CV latent channels, over the same tiles:
      p = exp(score - max) -> acc [group, BLOCK_CV] += p · L̂v tile, the value codes dequantized on the fly
      -> the slice's unnormalized partial output [B, H, splits, C] and its (max, sum)
  combine kernel: out = Σ_s e^{m_s - M} acc_s / Σ_s e^{m_s - M} l_s, per (sequence, query head, channel chunk).

Neither the dequantized latents nor K nor V ever reach memory; what does is the scores (16x smaller than K for
Llama-3.1-8B) and one fp32 row of C per (query head, slice).

Why two phases in one program rather than one online-softmax pass: the accumulator of the value side is
[group, C] with C = 1024 latent channels, and updating it every tile needs the whole [BLOCK_N, C] value tile in
registers at once (Triton has no dynamic slicing of a register tensor). Keeping the scores of the slice in an
L2-resident scratch instead lets the value pass run chunk by chunk over C with a [group, BLOCK_CV] accumulator,
while the expensive part, the key rebuild (2·C·D flops per token and KV head), is done exactly once.

Why split over the sequence: at batch 1 there are only Hkv = 8 (sequence, KV head) pairs, far fewer than the 132 SMs
of an H100/H200; `splits` programs per pair each take a contiguous slice of tiles, and the combine kernel merges
their (max, sum, acc) exactly.

Packed codes are one little-endian bit stream per token row for every width (`quant.pack`: 8/b codes per byte LSB
first, and the 3-bit layout of 8 codes in a 24-bit little-endian word is the same stream), so channel c's code sits
at bit c·b of its row: one byte load (two for 3 bits, whose codes may straddle a byte), a shift and a mask.

Requirements of this path (`supported()` says whether they hold): head_dim a power of two >= 32 (the two RoPE
halves are tl.dot operands of width >= 16), q/mk/cos/sin/exact in one float dtype (mk and the tables are cast
otherwise), CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import KernelConfig, Override, _mask2, _q3, check_inputs

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SPLITS = 256


# ----------------------------------------------------------------------------------------------- device helpers


@triton.jit
def _unpack(row_ptr, tok_ok, c0, chan, ok, ROW_BYTES, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_CH: tl.constexpr):
    """Codes [BLOCK_N, BLOCK_CH] (int32) of channels `chan` = c0 + [0, BLOCK_CH) from packed rows at `row_ptr` [N].

    Channel c's code is bits [c·b, c·b + b) of the row's little-endian bit stream. For 8, 4 and 2 bits a chunk is
    whole bytes (c0 is a multiple of BLOCK_CH): one load per byte, split into its 8/b codes with shifts and
    interleaved back into channel order with tl.join (innermost join = lowest bits = the even channel). 3-bit codes
    may straddle bytes: one (or two) byte loads per code.
    """
    if BITS == 8:
        return tl.load(row_ptr[:, None] + chan[None, :], mask=ok, other=0).to(tl.int32)
    if BITS == 4 or BITS == 2:
        per: tl.constexpr = 8 // BITS
        byte = c0 // per + tl.arange(0, BLOCK_CH // per)
        load_ok = tok_ok[:, None] & (byte < ROW_BYTES)[None, :]
        word = tl.load(row_ptr[:, None] + byte[None, :], mask=load_ok, other=0).to(tl.int32)
        if BITS == 4:
            codes = tl.join(word & 15, word >> 4)  # [N, CH/2, 2]: channels 2j, 2j + 1
        else:
            # [N, CH/4, 2, 2] indexed (j, h, k): channel 4j + 2h + k sits at bits 2·(2h + k)
            codes = tl.join(tl.join(word & 3, (word >> 4) & 3), tl.join((word >> 2) & 3, word >> 6))
        return tl.reshape(codes, (BLOCK_N, BLOCK_CH))
    bit = chan * BITS
    byte = bit // 8
    shift = (bit % 8)[None, :]
    ptr = row_ptr[:, None] + byte[None, :]
    word = tl.load(ptr, mask=ok, other=0).to(tl.int32)
    if BITS == 3:
        # A 3-bit code may straddle two bytes; the second byte is loaded only when it exists in the row.
        straddles = ok & ((byte + 1) < ROW_BYTES)[None, :]
        word = word | (tl.load(ptr + 1, mask=straddles, other=0).to(tl.int32) << 8)
    return (word >> shift) & ((1 << BITS) - 1)


@triton.jit
def _latent_tile(
    codes_ptr, scale_ptr, zero_ptr, b, t0, tok, tok_ok, c0, chan, c_ok,
    stride_cb, stride_ct, stride_sb, stride_st,
    rec_ptr, exact_ptr, rows_ptr, stride_eb, stride_et,
    ROW_BYTES, eta,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, CALIBRATED: tl.constexpr,
    OVERRIDE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CH: tl.constexpr,
):
    """Dequantized latents [N, CH] (fp32, codes·s + z) of tokens `tok` = t0 + [0, N) and channels `chan` of seq `b`.

    PER_CHANNEL: one scale/zero per GROUP tokens of a channel ([B, span/G, C]); otherwise per GROUP channels of a
    token ([B, span, C/G]). Tokens flagged recent in the override take their exact (full-precision) rows instead.
    Tiles start at multiples of their size, so when a group covers whole tiles (the usual G = 128 case) the scales
    of a tile are one row (per channel) or one column (per token): a vector load instead of a 2-D gather.
    """
    ok = tok_ok[:, None] & c_ok[None, :]
    codes = _unpack(codes_ptr + b * stride_cb + tok * stride_ct, tok_ok, c0, chan, ok, ROW_BYTES, BITS, BLOCK_N,
                    BLOCK_CH)
    if PER_CHANNEL:
        if GROUP % BLOCK_N == 0:
            param = (b * stride_sb + (t0 // GROUP) * stride_st + chan)[None, :]
            param_ok = c_ok[None, :]
        else:
            param = b * stride_sb + (tok // GROUP)[:, None] * stride_st + chan[None, :]
            param_ok = ok
    else:
        if GROUP % BLOCK_CH == 0:
            param = (b * stride_sb + tok * stride_st + c0 // GROUP)[:, None]
            param_ok = tok_ok[:, None]
        else:
            param = b * stride_sb + tok[:, None] * stride_st + (chan // GROUP)[None, :]
            param_ok = ok
    s = tl.load(scale_ptr + param, mask=param_ok, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + param, mask=param_ok, other=0.0).to(tl.float32)
    if CALIBRATED:  # XQuant-KV's data-free calibration (quant.calibrated_params)
        z = z + (eta * ((1 << BITS) - 1)) * s
        s = (1.0 - 2.0 * eta) * s
    values = codes.to(tl.float32) * s + z
    if OVERRIDE:
        recent = tl.load(rec_ptr + tok, mask=tok_ok, other=0) != 0
        if ROWS:
            row = tl.load(rows_ptr + tok, mask=tok_ok & recent, other=0)
        else:
            row = tok
        take = ok & recent[:, None]
        exact = tl.load(exact_ptr + b * stride_eb + row[:, None] * stride_et + chan[None, :], mask=take, other=0.0)
        values = tl.where(take, exact.to(tl.float32), values)
    return values


@triton.jit
def _rounded(x, dtype, EMULATE: tl.constexpr):
    """x rounded (to nearest even) to the model dtype, as a tl.dot operand.

    EMULATE (only under TRITON_INTERPRET=1 with bf16): Triton 3.9's CPU interpreter truncates fp32 -> bf16 casts
    and multiplies bf16 blocks as their raw uint16 bits. There the rounding is done on the fp32 bits and the value
    stays in fp32, where products of bf16 values are exact, as on tensor cores. A GPU never takes this branch.
    """
    if EMULATE:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _latent_attention_split_kernel(
    q_ptr, stride_qb, stride_qh,
    kc_ptr, ks_ptr, kz_ptr, stride_kcb, stride_kct, stride_ksb, stride_kst,
    vc_ptr, vs_ptr, vz_ptr, stride_vcb, stride_vct, stride_vsb, stride_vst,
    mk_ptr, stride_mkc, stride_mkn,
    cos_ptr, sin_ptr, stride_rt,
    mask_ptr, stride_mb,
    krec_ptr, kex_ptr, krow_ptr, stride_keb, stride_ket,
    vrec_ptr, vex_ptr, vrow_ptr, stride_veb, stride_vet,
    scores_ptr, m_ptr, l_ptr, acc_ptr,
    span, C, split_len, splits, sm_scale, eta, KEY_BYTES, VALUE_BYTES,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HALF: tl.constexpr,
    KEY_BITS: tl.constexpr, KEY_GROUP: tl.constexpr, KEY_PER_CHANNEL: tl.constexpr,
    VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr, CALIBRATED: tl.constexpr,
    KEY_OVERRIDE: tl.constexpr, KEY_ROWS: tl.constexpr, VALUE_OVERRIDE: tl.constexpr, VALUE_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CV: tl.constexpr, PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    pid = tl.program_id(0)  # b * KV_HEADS + kv head
    split = tl.program_id(1)
    # int64: b · (a cache's batch stride) can exceed 2^31 at long capacities and large batches.
    b = (pid // KV_HEADS).to(tl.int64)
    kvh = pid % KV_HEADS
    start = split * split_len
    stop = tl.minimum(start + split_len, span)
    dtype = mk_ptr.dtype.element_ty  # the model dtype: tensor-core operands are rounded to it (`_rounded`)

    # The GQA group of query heads of this KV head, padded to a tl.dot-friendly row count (padded rows are zero
    # and never stored).
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, HALF)
    q_rows = q_ptr + b * stride_qb + heads * stride_qh
    q_lo = _rounded(tl.load(q_rows[:, None] + d[None, :], mask=g_ok[:, None], other=0.0), dtype, EMULATE)
    q_hi = _rounded(tl.load(q_rows[:, None] + HALF + d[None, :], mask=g_ok[:, None], other=0.0), dtype, EMULATE)
    # The head's columns of Mk, split in the two RoPE halves: K_lo = L̂k·Mk[:, lo], K_hi = L̂k·Mk[:, hi], so that
    # rotate-half needs no data movement between registers.
    col_lo = (kvh * 2 * HALF + d) * stride_mkn
    col_hi = (kvh * 2 * HALF + HALF + d) * stride_mkn

    n = tl.arange(0, BLOCK_N)
    cc = tl.arange(0, BLOCK_C)
    score_rows = scores_ptr + (b * KV_HEADS * GROUP + heads) * span  # scratch [B, H, span]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)

    # ---- phase 1: rebuild K tile by tile, scores, online (max, sum) ------------------------------------------
    for t0 in range(start, stop, BLOCK_N):
        tok = t0 + n
        tok_ok = tok < stop
        allowed = tok_ok & (tl.load(mask_ptr + b * stride_mb + tok, mask=tok_ok, other=0) != 0)
        k_lo = tl.zeros([BLOCK_N, HALF], tl.float32)
        k_hi = tl.zeros([BLOCK_N, HALF], tl.float32)
        # Mk for one head is C x D (256 KiB at C = 1024, D = 128 in bf16): too big for shared memory, so it streams
        # through in BLOCK_C-row chunks, re-read from L2 by every tile; each chunk feeds BLOCK_N·BLOCK_C·D MACs.
        for c0 in range(0, C, BLOCK_C):
            chan = c0 + cc
            c_ok = chan < C
            lat = _latent_tile(kc_ptr, ks_ptr, kz_ptr, b, t0, tok, tok_ok, c0, chan, c_ok,
                               stride_kcb, stride_kct, stride_ksb, stride_kst,
                               krec_ptr, kex_ptr, krow_ptr, stride_keb, stride_ket, KEY_BYTES, eta,
                               KEY_BITS, KEY_GROUP, KEY_PER_CHANNEL, CALIBRATED, KEY_OVERRIDE, KEY_ROWS,
                               BLOCK_N, BLOCK_C)
            # Latents are read in the model dtype (as QuantStream.read returns them) and are a tensor-core operand.
            lat = _rounded(lat, dtype, EMULATE)
            mk_rows = mk_ptr + chan[:, None] * stride_mkc
            mk_lo = tl.load(mk_rows + col_lo[None, :], mask=c_ok[:, None], other=0.0)
            mk_hi = tl.load(mk_rows + col_hi[None, :], mask=c_ok[:, None], other=0.0)
            k_lo = tl.dot(lat, _rounded(mk_lo, dtype, EMULATE), k_lo, input_precision=PRECISION)
            k_hi = tl.dot(lat, _rounded(mk_hi, dtype, EMULATE), k_hi, input_precision=PRECISION)
        # RoPE, rotate-half: [lo, hi] -> [lo·cos_lo - hi·sin_lo, hi·cos_hi + lo·sin_hi].
        table = tok[:, None] * stride_rt + d[None, :]
        cos_lo = tl.load(cos_ptr + table, mask=tok_ok[:, None], other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_ptr + table + HALF, mask=tok_ok[:, None], other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_ptr + table, mask=tok_ok[:, None], other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + table + HALF, mask=tok_ok[:, None], other=0.0).to(tl.float32)
        r_lo = _rounded(k_lo * cos_lo - k_hi * sin_lo, dtype, EMULATE)
        r_hi = _rounded(k_hi * cos_hi + k_lo * sin_hi, dtype, EMULATE)
        s = tl.dot(q_lo, tl.trans(r_lo), input_precision=PRECISION)
        s = tl.dot(q_hi, tl.trans(r_hi), s, input_precision=PRECISION)  # [GROUP_PAD, BLOCK_N]
        # Masked slots may hold garbage (NaN included): where() replaces them, whatever they computed to.
        s = tl.where(allowed[None, :], s * sm_scale, float("-inf"))
        tl.store(score_rows[:, None] + tok[None, :], s, mask=g_ok[:, None] & tok_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: keep exp() away from -inf - -inf
        l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), axis=1)
        m_i = m_new

    # The value pass reads back scores that other threads of this program wrote.
    tl.debug_barrier()
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    stat = (b * KV_HEADS * GROUP + heads) * splits + split  # [B, H, splits]
    tl.store(m_ptr + stat, m_i, mask=g_ok)
    tl.store(l_ptr + stat, l_i, mask=g_ok)

    # ---- phase 2: p · L̂v, one BLOCK_CV chunk of latent channels at a time ------------------------------------
    cv = tl.arange(0, BLOCK_CV)
    for c0 in range(0, C, BLOCK_CV):
        chan = c0 + cv
        c_ok = chan < C
        acc = tl.zeros([GROUP_PAD, BLOCK_CV], tl.float32)
        for t0 in range(start, stop, BLOCK_N):
            tok = t0 + n
            tok_ok = tok < stop
            allowed = tok_ok & (tl.load(mask_ptr + b * stride_mb + tok, mask=tok_ok, other=0) != 0)
            s = tl.load(score_rows[:, None] + tok[None, :], mask=g_ok[:, None] & tok_ok[None, :],
                        other=float("-inf"))
            p = tl.exp(s - m_ref[:, None])
            v = _latent_tile(vc_ptr, vs_ptr, vz_ptr, b, t0, tok, tok_ok, c0, chan, c_ok,
                             stride_vcb, stride_vct, stride_vsb, stride_vst,
                             vrec_ptr, vex_ptr, vrow_ptr, stride_veb, stride_vet, VALUE_BYTES, eta,
                             VALUE_BITS, VALUE_GROUP, False, CALIBRATED, VALUE_OVERRIDE, VALUE_ROWS,
                             BLOCK_N, BLOCK_CV)
            # p is 0 on masked slots, but 0 · (garbage inf/NaN) is NaN: zero their values too.
            v = tl.where(allowed[:, None], v, 0.0)
            acc = tl.dot(_rounded(p, dtype, EMULATE), _rounded(v, dtype, EMULATE), acc, input_precision=PRECISION)
        out = acc_ptr + (stat * C)[:, None] + chan[None, :]  # [B, H, splits, C]
        tl.store(out, acc, mask=g_ok[:, None] & c_ok[None, :])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, splits, C, SPLITS_PAD: tl.constexpr, BLOCK: tl.constexpr,
                    EMULATE: tl.constexpr):
    """out[b, h, c] = Σ_s e^{m_s - M} acc_s[c] / Σ_s e^{m_s - M} l_s, M = max_s m_s; zeros when nothing is allowed."""
    row = tl.program_id(0)  # b * H + h
    chan = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    c_ok = chan < C
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < splits
    m = tl.load(m_ptr + row * splits + s, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + row * splits + s, mask=s_ok, other=0.0)
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(m - top)  # 0 for splits that allowed nothing (m = -inf)
    denom = tl.sum(w * l, axis=0)
    acc = tl.load(acc_ptr + (row * splits + s)[:, None] * C + chan[None, :], mask=s_ok[:, None] & c_ok[None, :],
                  other=0.0)
    total = tl.sum(w[:, None] * acc, axis=0)
    out = tl.where(denom > 0, total / tl.where(denom > 0, denom, 1.0), 0.0)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * C + chan, _rounded(out, dtype, EMULATE).to(dtype), mask=c_ok)


# ----------------------------------------------------------------------------------------------- host side


def supported(q: Tensor, mk: Tensor) -> str | None:
    """None when the fused path can run on these tensors, else the reason it cannot (the caller falls back)."""
    q3 = _q3(q)
    head_dim = q3.shape[-1]
    if head_dim < 32 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 32"
    if q3.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q3.dtype} is not fp16, bf16 or fp32"
    if q3.is_cuda != (not INTERPRETED) or mk.device != q3.device:
        where = "CPU tensors under TRITON_INTERPRET=1" if INTERPRETED else "CUDA tensors"
        return f"the Triton path needs {where}; got {q3.device}"
    return None


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _resolve(config: KernelConfig | None, span: int, channels: int, units: int, device: torch.device) -> dict:
    """Tiling with defaults: 64x64 tiles on a GPU; in the interpreter, whose cost is per operation, few big tiles."""
    config = config or KernelConfig()
    gpu = device.type == "cuda"
    block_n = config.block_n or (64 if gpu else 32)
    block_c = config.block_c or min(64, max(16, _pow2(channels)))
    block_cv = config.block_cv or min(64, max(16, _pow2(channels)))
    for name, value in (("block_n", block_n), ("block_c", block_c), ("block_cv", block_cv)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16; got {value}")
    tiles = -(-span // block_n)
    if config.splits is not None:
        splits = config.splits
    elif gpu:
        # About two programs per SM over all (sequence, KV head) pairs, at least 4 tiles each (so the partial
        # outputs, one C-row per query head and slice, stay small next to the codes read).
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = min(-(-2 * sms // units), max(1, tiles // 4))
    else:
        splits = min(2, tiles)
    splits = max(1, min(splits, tiles, MAX_SPLITS))
    tiles_per_split = -(-tiles // splits)
    splits = -(-tiles // tiles_per_split)  # no empty slice
    return dict(block_n=block_n, block_c=block_c, block_cv=block_cv, splits=splits,
                split_len=tiles_per_split * block_n,
                num_warps=config.num_warps or 4, num_stages=config.num_stages or (2 if gpu else 1))


def _override_args(override: Override | None, like: Tensor, dtype: torch.dtype) -> tuple:
    """(recent, exact, rows, stride_b, stride_t, has, has_rows) for the kernel; dummies when absent."""
    if override is None:
        return like, like, like, 0, 0, False, False
    exact = override.exact
    if exact.dtype != dtype:
        exact = exact.to(dtype)
    if exact.stride(-1) != 1:
        exact = exact.contiguous()
    recent = override.recent.contiguous().view(torch.uint8)
    rows = override.rows.contiguous() if override.rows is not None else like
    return recent, exact, rows, exact.stride(0), exact.stride(1), True, override.rows is not None


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def fused_latent_attention(
    q: Tensor,
    key_codes: Tensor,
    key_scale: Tensor,
    key_zero: Tensor,
    key_bits: int,
    value_codes: Tensor,
    value_scale: Tensor,
    value_zero: Tensor,
    value_bits: int,
    mk: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    group: int,
    *,
    key_override: Override | None = None,
    value_override: Override | None = None,
    eta: float = 0.0,
    key_axis: str = "channel",
    config: KernelConfig | None = None,
) -> Tensor:
    """The fused Triton path of `latent_attention_reference` (same arguments, same result up to rounding).

    Raises ValueError when `supported()` gives a reason; allocates only the scratch (scores, per-slice partials) and
    the output, and never synchronizes with the host, so it can be captured in a CUDA graph.
    """
    shapes = check_inputs(q, key_codes, key_scale, key_zero, key_bits, value_codes, value_scale, value_zero,
                          value_bits, mk, cos, sin, mask, group, key_override, value_override, key_axis)
    reason = supported(q, mk)
    if reason is not None:
        raise ValueError(f"fused latent attention is not available here: {reason}")
    q3 = _q3(q)
    dtype = q3.dtype
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    b, h, hkv, d, span, c = (shapes.batch, shapes.heads, shapes.kv_heads, shapes.head_dim, shapes.span,
                             shapes.channels)
    group_size = h // hkv
    mk = mk if mk.dtype == dtype else mk.to(dtype)
    cos = (cos if cos.dtype == dtype else cos.to(dtype)).contiguous()
    sin = (sin if sin.dtype == dtype else sin.to(dtype)).contiguous()
    allowed = _mask2(mask, b, span).contiguous().view(torch.uint8)
    key_codes, key_scale, key_zero = map(_last_contiguous, (key_codes, key_scale, key_zero))
    value_codes, value_scale, value_zero = map(_last_contiguous, (value_codes, value_scale, value_zero))
    tiling = _resolve(config, span, c, b * hkv, q3.device)
    splits = tiling["splits"]

    f32 = dict(dtype=torch.float32, device=q3.device)
    scores = torch.empty(b, h, span, **f32)
    m = torch.empty(b, h, splits, **f32)
    l = torch.empty(b, h, splits, **f32)
    acc = torch.empty(b, h, splits, c, **f32)
    out = torch.empty(b, h, c, dtype=dtype, device=q3.device)
    krec, kex, krow, keb, ket, k_over, k_rows = _override_args(key_override, allowed, dtype)
    vrec, vex, vrow, veb, vet, v_over, v_rows = _override_args(value_override, allowed, dtype)

    _latent_attention_split_kernel[(b * hkv, splits)](
        q3, q3.stride(0), q3.stride(1),
        key_codes, key_scale, key_zero, key_codes.stride(0), key_codes.stride(1), key_scale.stride(0),
        key_scale.stride(1),
        value_codes, value_scale, value_zero, value_codes.stride(0), value_codes.stride(1), value_scale.stride(0),
        value_scale.stride(1),
        mk, mk.stride(0), mk.stride(1),
        cos, sin, cos.stride(0),
        allowed, allowed.stride(0) if allowed.shape[0] > 1 else 0,
        krec, kex, krow, keb, ket,
        vrec, vex, vrow, veb, vet,
        scores, m, l, acc,
        span, c, tiling["split_len"], splits, 1.0 / math.sqrt(d), float(eta), key_codes.shape[-1],
        value_codes.shape[-1],
        KV_HEADS=hkv, GROUP=group_size, GROUP_PAD=max(16, _pow2(group_size)), HALF=d // 2,
        KEY_BITS=key_bits, KEY_GROUP=shapes.key_group, KEY_PER_CHANNEL=key_axis == "channel",
        VALUE_BITS=value_bits, VALUE_GROUP=shapes.value_group, CALIBRATED=eta != 0.0,
        KEY_OVERRIDE=k_over, KEY_ROWS=k_rows, VALUE_OVERRIDE=v_over, VALUE_ROWS=v_rows,
        BLOCK_N=tiling["block_n"], BLOCK_C=tiling["block_c"], BLOCK_CV=tiling["block_cv"],
        # fp32 inputs: exact fp32 products (tf32 would cost ~1e-3 relative error); 16-bit inputs: tensor cores.
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        EMULATE=INTERPRETED and dtype == torch.bfloat16,
        num_warps=tiling["num_warps"], num_stages=tiling["num_stages"],
    )
    block = min(128, max(16, _pow2(c)))
    _combine_kernel[(b * h, triton.cdiv(c, block))](m, l, acc, out, splits, c, SPLITS_PAD=max(2, _pow2(splits)),
                                                    BLOCK=block, EMULATE=INTERPRETED and dtype == torch.bfloat16)
    return out


def fused_x_attention(
    q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    wk_t: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    group: int,
    *,
    override: Override | None = None,
    eta: float = 0.0,
    config: KernelConfig | None = None,
) -> Tensor:
    """The fused path of `x_attention_reference` (MHA XQuant: X per token, K = RoPE(X̂·Wkᵀ), output p·X̂)."""
    return fused_latent_attention(q, codes, scale, zero, bits, codes, scale, zero, bits, wk_t, cos, sin, mask, group,
                                  key_override=override, value_override=override, eta=eta, key_axis="token",
                                  config=config)
