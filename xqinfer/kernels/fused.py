"""Triton kernels: one decode step of XQuant attention straight from the quantized latents (flash-decoding style).

What is fused (`reference.py` has the math, which this reproduces). Three launches, none of which writes the
dequantized latents, K or V to memory:

  1. `_key_scores_kernel`, per (sequence, block of KV_BLOCK KV heads, slice of the sequence), tile by tile:
       unpack + dequantize the key latents [BLOCK_N, BLOCK_C] (or take the ring rows of recent tokens)
       -> K tile += L̂k tile · Mk[c-chunk, the block's head columns]   tl.dot on tensor cores, fp32, looping over C
       -> RoPE at the tokens' positions (rotate-half on the two halves of K, kept as two accumulators)
       -> scores of the query heads of those KV heads, scaled, masked; online (max, sum) of the softmax
       -> raw scores to an fp32 scratch [B, H, span] (4·H bytes per token, 16x less than K), (max, sum) per slice
  2. `_value_mix_kernel`, per (sequence, slice, chunk of BLOCK_CV latent channels), tile by tile:
       p = exp(score - max) for all H query heads -> acc [H, BLOCK_CV] += p · L̂v tile, value codes dequantized
       on the fly -> the slice's unnormalized partial output [B, H, splits, C]
  3. `_combine_kernel`: out = Σ_s e^{m_s - M} acc_s / Σ_s e^{m_s - M} l_s per (sequence, query head, channels).

Why this split of the work:
- The key rebuild dominates: 2·C·D flops per token and KV head (2·span·C·kv_dim per layer). Dequantizing a latent
  costs a handful of ALU instructions, the same order as its share of tensor-core time for one head, so a program
  rebuilds KV_BLOCK heads from each dequantized tile (the heads' columns side by side: one wider tl.dot). The score
  dot then takes a block-diagonal q (query head r only sees its own KV head's columns).
- The value latents are shared by every head, so their weighted sum runs once for all H heads ([H, BLOCK_N] ·
  [BLOCK_N, BLOCK_CV], a proper tensor-core shape), instead of once per KV head. It needs the scores of all heads,
  hence the second kernel; and chunking over C keeps its accumulator small (C = 1024 latents would not fit in
  registers, and Triton cannot slice a register tensor dynamically).
- At batch 1 there are only 8 KV heads, far fewer than the 132 SMs of an H100/H200: `splits` programs per
  (sequence, KV block) each take a contiguous slice of tiles, and the combine kernel merges their (max, sum, acc)
  exactly (flash-decoding).

Packed codes are one little-endian bit stream per token row for every width (`quant.pack`: 8/b codes per byte LSB
first, and the 3-bit layout of 8 codes in a 24-bit little-endian word is the same stream), so channel c's code sits
at bit c·b of its row.

Requirements of this path (`supported()` says whether they hold): head_dim a power of two >= 32 (the two RoPE
halves are tl.dot operands of width >= 16), q/mk/cos/sin/exact in one float dtype (mk and the tables are cast
otherwise), CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import KernelConfig, Override, QuantizedHistory, _mask2, _q3, check_inputs

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
    token ([B, span, ceil(C/G)]: channel c's group is c // GROUP, and the last group of a row is ragged when GROUP
    does not divide C). Tokens flagged recent in the override take their exact (full-precision) rows instead.
    Tiles start at multiples of their size, so when a group covers whole tiles (the usual G = 128 case) the scales
    of a tile are one row (per channel) or one column (per token): a vector load instead of a 2-D gather. A ragged last
    group leaves every group boundary at a multiple of GROUP, so a tile still never straddles two groups (its
    channels past C are masked).
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
def _key_scores_kernel(
    q_ptr, stride_qb, stride_qh,
    kc_ptr, ks_ptr, kz_ptr, stride_kcb, stride_kct, stride_ksb, stride_kst,
    mk_ptr, stride_mkc, stride_mkn,
    cos_ptr, sin_ptr, stride_rt,
    mask_ptr, stride_mb,
    rec_ptr, ex_ptr, row_ptr, stride_eb, stride_et,
    scores_ptr, m_ptr, l_ptr,
    span, C, split_len, splits, sm_scale, eta, KEY_BYTES,
    KV_HEADS: tl.constexpr, KV_BLOCK: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, HALF: tl.constexpr,
    KEY_BITS: tl.constexpr, KEY_GROUP: tl.constexpr, KEY_PER_CHANNEL: tl.constexpr, CALIBRATED: tl.constexpr,
    OVERRIDE: tl.constexpr, OVERRIDE_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    pid = tl.program_id(0)  # b * (KV_HEADS // KV_BLOCK) + block of KV heads
    split = tl.program_id(1)
    # int64: b · (a cache's batch stride) can exceed 2^31 at long capacities and large batches.
    b = (pid // (KV_HEADS // KV_BLOCK)).to(tl.int64)
    kv0 = (pid % (KV_HEADS // KV_BLOCK)) * KV_BLOCK
    start = split * split_len
    stop = tl.minimum(start + split_len, span)
    dtype = mk_ptr.dtype.element_ty  # the model dtype: tensor-core operands are rounded to it (`_rounded`)

    # Columns of the K halves: KV head kv0 + j // HALF, dimension j % HALF (and + HALF for the upper half).
    j = tl.arange(0, KV_BLOCK * HALF)
    jd = j % HALF
    jh = j // HALF
    col_lo = ((kv0 + jh) * 2 * HALF + jd) * stride_mkn
    col_hi = col_lo + HALF * stride_mkn
    # Query rows: the GROUP query heads of each of the block's KV heads, padded to a tl.dot-friendly count. q is
    # block-diagonal over those columns: row r (head kv0·GROUP + r) is zero outside its KV head's columns.
    r = tl.arange(0, ROWS)
    r_ok = r < KV_BLOCK * GROUP
    heads = kv0 * GROUP + r
    own = r_ok[:, None] & ((r // GROUP)[:, None] == jh[None, :])
    q_cols = q_ptr + b * stride_qb + heads[:, None] * stride_qh + jd[None, :]
    q_lo = _rounded(tl.load(q_cols, mask=own, other=0.0), dtype, EMULATE)
    q_hi = _rounded(tl.load(q_cols + HALF, mask=own, other=0.0), dtype, EMULATE)

    n = tl.arange(0, BLOCK_N)
    cc = tl.arange(0, BLOCK_C)
    score_rows = scores_ptr + (b * KV_HEADS * GROUP + heads) * span  # scratch [B, H, span]
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    for t0 in range(start, stop, BLOCK_N):
        tok = t0 + n
        tok_ok = tok < stop
        allowed = tok_ok & (tl.load(mask_ptr + b * stride_mb + tok, mask=tok_ok, other=0) != 0)
        k_lo = tl.zeros([BLOCK_N, KV_BLOCK * HALF], tl.float32)
        k_hi = tl.zeros([BLOCK_N, KV_BLOCK * HALF], tl.float32)
        # Mk's columns for the block (C x KV_BLOCK·D: 256 KiB per head at C = 1024, D = 128 in bf16) do not fit in
        # shared memory: they stream through in BLOCK_C-row chunks, re-read from L2 by every tile.
        for c0 in range(0, C, BLOCK_C):
            chan = c0 + cc
            c_ok = chan < C
            lat = _latent_tile(kc_ptr, ks_ptr, kz_ptr, b, t0, tok, tok_ok, c0, chan, c_ok,
                               stride_kcb, stride_kct, stride_ksb, stride_kst,
                               rec_ptr, ex_ptr, row_ptr, stride_eb, stride_et, KEY_BYTES, eta,
                               KEY_BITS, KEY_GROUP, KEY_PER_CHANNEL, CALIBRATED, OVERRIDE, OVERRIDE_ROWS,
                               BLOCK_N, BLOCK_C)
            # Latents are read in the model dtype (as QuantStream.read returns them) and are a tensor-core operand.
            lat = _rounded(lat, dtype, EMULATE)
            mk_rows = mk_ptr + chan[:, None] * stride_mkc
            mk_lo = tl.load(mk_rows + col_lo[None, :], mask=c_ok[:, None], other=0.0)
            mk_hi = tl.load(mk_rows + col_hi[None, :], mask=c_ok[:, None], other=0.0)
            k_lo = tl.dot(lat, _rounded(mk_lo, dtype, EMULATE), k_lo, input_precision=PRECISION)
            k_hi = tl.dot(lat, _rounded(mk_hi, dtype, EMULATE), k_hi, input_precision=PRECISION)
        # RoPE, rotate-half: [lo, hi] -> [lo·cos_lo - hi·sin_lo, hi·cos_hi + lo·sin_hi].
        table = tok[:, None] * stride_rt + jd[None, :]
        cos_lo = tl.load(cos_ptr + table, mask=tok_ok[:, None], other=0.0)
        sin_lo = tl.load(sin_ptr + table, mask=tok_ok[:, None], other=0.0)
        r_lo = _rounded(k_lo * cos_lo.to(tl.float32) - k_hi * sin_lo.to(tl.float32), dtype, EMULATE)
        cos_hi = tl.load(cos_ptr + table + HALF, mask=tok_ok[:, None], other=0.0)
        sin_hi = tl.load(sin_ptr + table + HALF, mask=tok_ok[:, None], other=0.0)
        r_hi = _rounded(k_hi * cos_hi.to(tl.float32) + k_lo * sin_hi.to(tl.float32), dtype, EMULATE)
        s = tl.dot(q_lo, tl.trans(r_lo), input_precision=PRECISION)
        s = tl.dot(q_hi, tl.trans(r_hi), s, input_precision=PRECISION)  # [ROWS, BLOCK_N]
        # Masked slots may hold garbage (NaN included): where() replaces them, whatever they computed to.
        s = tl.where(allowed[None, :], s * sm_scale, float("-inf"))
        tl.store(score_rows[:, None] + tok[None, :], s, mask=r_ok[:, None] & tok_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: keep exp() away from -inf - -inf
        l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), axis=1)
        m_i = m_new
    stat = (b * KV_HEADS * GROUP + heads) * splits + split  # [B, H, splits]
    tl.store(m_ptr + stat, m_i, mask=r_ok)
    tl.store(l_ptr + stat, l_i, mask=r_ok)


@triton.jit
def _value_mix_kernel(
    vc_ptr, vs_ptr, vz_ptr, stride_vcb, stride_vct, stride_vsb, stride_vst,
    mask_ptr, stride_mb,
    rec_ptr, ex_ptr, row_ptr, stride_eb, stride_et,
    scores_ptr, m_ptr, acc_ptr,
    span, C, split_len, splits, eta, VALUE_BYTES,
    HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr,
    CALIBRATED: tl.constexpr, OVERRIDE: tl.constexpr, OVERRIDE_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_CV: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    c0 = tl.program_id(2) * BLOCK_CV
    start = split * split_len
    stop = tl.minimum(start + split_len, span)
    h = tl.arange(0, HEADS_PAD)
    h_ok = h < HEADS
    stat = (b * HEADS + h) * splits + split
    m = tl.load(m_ptr + stat, mask=h_ok, other=float("-inf"))
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    score_rows = scores_ptr + (b * HEADS + h) * span
    n = tl.arange(0, BLOCK_N)
    chan = c0 + tl.arange(0, BLOCK_CV)
    c_ok = chan < C
    acc = tl.zeros([HEADS_PAD, BLOCK_CV], tl.float32)
    for t0 in range(start, stop, BLOCK_N):
        tok = t0 + n
        tok_ok = tok < stop
        allowed = tok_ok & (tl.load(mask_ptr + b * stride_mb + tok, mask=tok_ok, other=0) != 0)
        s = tl.load(score_rows[:, None] + tok[None, :], mask=h_ok[:, None] & tok_ok[None, :], other=float("-inf"))
        p = tl.exp(s - m_ref[:, None])  # 0 on masked slots (score -inf)
        v = _latent_tile(vc_ptr, vs_ptr, vz_ptr, b, t0, tok, tok_ok, c0, chan, c_ok,
                         stride_vcb, stride_vct, stride_vsb, stride_vst,
                         rec_ptr, ex_ptr, row_ptr, stride_eb, stride_et, VALUE_BYTES, eta,
                         VALUE_BITS, VALUE_GROUP, False, CALIBRATED, OVERRIDE, OVERRIDE_ROWS, BLOCK_N, BLOCK_CV)
        # 0 · (garbage inf/NaN of an empty slot) would be NaN: zero masked values too.
        v = tl.where(allowed[:, None], v, 0.0)
        acc = tl.dot(_rounded(p, DTYPE, EMULATE), _rounded(v, DTYPE, EMULATE), acc, input_precision=PRECISION)
    out = acc_ptr + (stat * C)[:, None] + chan[None, :]  # [B, H, splits, C]
    tl.store(out, acc, mask=h_ok[:, None] & c_ok[None, :])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, splits, C, SPLIT_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                    EMULATE: tl.constexpr):
    """out[b, h, c] = Σ_s e^{m_s - M} acc_s[c] / Σ_s e^{m_s - M} l_s, M = max_s m_s; zeros when nothing is allowed."""
    row = tl.program_id(0)  # b * H + h
    chan = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    c_ok = chan < C
    top = tl.full([SPLIT_BLOCK], float("-inf"), tl.float32)
    for s0 in range(0, splits, SPLIT_BLOCK):
        s = s0 + tl.arange(0, SPLIT_BLOCK)
        top = tl.maximum(top, tl.load(m_ptr + row * splits + s, mask=s < splits, other=float("-inf")))
    top = tl.max(top, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK], tl.float32)
    denom = tl.zeros([SPLIT_BLOCK], tl.float32)
    for s0 in range(0, splits, SPLIT_BLOCK):
        s = s0 + tl.arange(0, SPLIT_BLOCK)
        s_ok = s < splits
        w = tl.exp(tl.load(m_ptr + row * splits + s, mask=s_ok, other=float("-inf")) - top)  # 0: nothing allowed
        denom += w * tl.load(l_ptr + row * splits + s, mask=s_ok, other=0.0)
        acc = tl.load(acc_ptr + (row * splits + s)[:, None] * C + chan[None, :], mask=s_ok[:, None] & c_ok[None, :],
                      other=0.0)
        total += tl.sum(w[:, None] * acc, axis=0)
    denom = tl.sum(denom, axis=0)
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
    if q3.dtype not in _TL_DTYPES:
        return f"dtype {q3.dtype} is not fp16, bf16 or fp32"
    if q3.is_cuda != (not INTERPRETED) or mk.device != q3.device:
        where = "CPU tensors under TRITON_INTERPRET=1" if INTERPRETED else "CUDA tensors"
        return f"the Triton path needs {where}; got {q3.device}"
    return None


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _resolve(config: KernelConfig | None, span: int, channels: int, batch: int, kv_heads: int,
             device: torch.device) -> dict:
    """The tiling, `config`'s fields where given.

    GPU defaults: 128-token tiles, 64-channel steps, one KV head per program, 8 warps, 2 stages. Each token tile
    re-reads the head's Mk columns from L2 (C·D·2 bytes), so the rebuild does BLOCK_N flops per byte of L2
    traffic: 128 rather than 64 keeps it clear of the L2 bandwidth. ptxas for sm_90 reports 248-254 registers and
    no spill for every width at this tiling (64-token tiles with 4 warps: 251-254, no spill; two KV heads per
    program spill). In the interpreter, whose cost is per operation: few big tiles, two KV heads per program.
    """
    config = config or KernelConfig()
    gpu = device.type == "cuda"
    block_n = config.block_n or (128 if gpu else 32)
    block_c = config.block_c or min(64, max(16, _pow2(channels)))
    block_cv = config.block_cv or min(64, max(16, _pow2(channels)))
    for name, value in (("block_n", block_n), ("block_c", block_c), ("block_cv", block_cv)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16; got {value}")
    kv_block = config.kv_block or (2 if not gpu and kv_heads % 2 == 0 else 1)
    if kv_block < 1 or kv_block & (kv_block - 1) or kv_heads % kv_block:
        raise ValueError(f"kv_block must be a power of two dividing the {kv_heads} KV heads; got {kv_block}")
    tiles = -(-span // block_n)
    if config.splits is not None:
        splits = config.splits
    elif gpu:
        # About two programs of the key kernel per SM, at least 2 tiles each (so the partial outputs, one C-row per
        # query head and slice, stay small next to the codes read).
        programs = batch * kv_heads // kv_block
        splits = min(-(-2 * _sm_count(device.index or 0) // programs), max(1, tiles // 2))
    else:
        splits = min(2, tiles)
    splits = max(1, min(splits, tiles, MAX_SPLITS))
    tiles_per_split = -(-tiles // splits)
    splits = -(-tiles // tiles_per_split)  # no empty slice
    return {"block_n": block_n, "block_c": block_c, "block_cv": block_cv, "kv_block": kv_block, "splits": splits,
            "split_len": tiles_per_split * block_n,
            "num_warps": config.num_warps or (8 if gpu and block_n >= 128 else 4),
            "num_stages": config.num_stages or (2 if gpu else 1)}


def _override_args(override: Override | None, like: Tensor, dtype: torch.dtype) -> tuple[list, bool, bool]:
    """([recent, exact, rows, stride_b, stride_t], present, has rows) for a kernel; dummies when absent."""
    if override is None:
        return [like, like, like, 0, 0], False, False
    exact = override.exact
    if exact.dtype != dtype:
        exact = exact.to(dtype)
    if exact.stride(-1) != 1:
        exact = exact.contiguous()
    recent = override.recent.contiguous().view(torch.uint8)
    rows = override.rows.contiguous() if override.rows is not None else like
    return [recent, exact, rows, exact.stride(0), exact.stride(1)], True, override.rows is not None


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass
class KernelCall:
    """One kernel launch: what `kernel[grid](*args, **meta, **options)` takes (also what a compile check needs)."""

    kernel: object
    grid: tuple[int, ...]
    args: list
    meta: dict  # the constexpr arguments
    options: dict  # num_warps, num_stages


@dataclass
class Launch:
    calls: list[KernelCall]
    out: Tensor

    def run(self) -> Tensor:
        for call in self.calls:
            call.kernel[call.grid](*call.args, **call.meta, **call.options)
        return self.out


def prepare(q: Tensor, keys: QuantizedHistory, values: QuantizedHistory, mk: Tensor, cos: Tensor, sin: Tensor,
            mask: Tensor, group: int, *, eta: float = 0.0, key_axis: str = "channel", scale: float | None = None,
            config: KernelConfig | None = None) -> Launch:
    """Validates, allocates the scratch and the output, and lays out the three launches (no device check)."""
    shapes = check_inputs(q, keys, values, mk, cos, sin, mask, group, key_axis)
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
    mask_stride = allowed.stride(0) if allowed.shape[0] > 1 else 0
    key_codes, key_scale, key_zero = map(_last_contiguous, (keys.codes, keys.scale, keys.zero))
    value_codes, value_scale, value_zero = map(_last_contiguous, (values.codes, values.scale, values.zero))
    tiling = _resolve(config, span, c, b, hkv, q3.device)
    splits, split_len, kv_block = tiling["splits"], tiling["split_len"], tiling["kv_block"]

    f32 = dict(dtype=torch.float32, device=q3.device)
    scores = torch.empty(b, h, span, **f32)
    m = torch.empty(b, h, splits, **f32)
    sums = torch.empty(b, h, splits, **f32)
    acc = torch.empty(b, h, splits, c, **f32)
    out = torch.empty(b, h, c, dtype=dtype, device=q3.device)
    key_ov, k_over, k_rows = _override_args(keys.override, allowed, dtype)
    value_ov, v_over, v_rows = _override_args(values.override, allowed, dtype)
    emulate = INTERPRETED and dtype == torch.bfloat16
    # fp32 inputs: exact fp32 products (tf32 would cost ~1e-3 relative error); 16-bit inputs: tensor cores anyway.
    precision = "ieee" if dtype == torch.float32 else "tf32"

    key_scores = KernelCall(
        _key_scores_kernel, (b * hkv // kv_block, splits),
        [q3, q3.stride(0), q3.stride(1),
         key_codes, key_scale, key_zero, key_codes.stride(0), key_codes.stride(1), key_scale.stride(0),
         key_scale.stride(1),
         mk, mk.stride(0), mk.stride(1), cos, sin, cos.stride(0), allowed, mask_stride, *key_ov,
         scores, m, sums, span, c, split_len, splits, 1.0 / math.sqrt(d) if scale is None else scale, float(eta),
         key_codes.shape[-1]],
        dict(KV_HEADS=hkv, KV_BLOCK=kv_block, GROUP=group_size, ROWS=max(16, _pow2(kv_block * group_size)),
             HALF=d // 2, KEY_BITS=keys.bits, KEY_GROUP=shapes.key_group, KEY_PER_CHANNEL=key_axis == "channel",
             CALIBRATED=eta != 0.0, OVERRIDE=k_over, OVERRIDE_ROWS=k_rows, BLOCK_N=tiling["block_n"],
             BLOCK_C=tiling["block_c"], PRECISION=precision, EMULATE=emulate),
        dict(num_warps=tiling["num_warps"], num_stages=tiling["num_stages"]),
    )
    value_mix = KernelCall(
        _value_mix_kernel, (b, splits, triton.cdiv(c, tiling["block_cv"])),
        [value_codes, value_scale, value_zero, value_codes.stride(0), value_codes.stride(1), value_scale.stride(0),
         value_scale.stride(1), allowed, mask_stride, *value_ov,
         scores, m, acc, span, c, split_len, splits, float(eta), value_codes.shape[-1]],
        dict(HEADS=h, HEADS_PAD=max(16, _pow2(h)), VALUE_BITS=values.bits, VALUE_GROUP=shapes.value_group,
             CALIBRATED=eta != 0.0, OVERRIDE=v_over, OVERRIDE_ROWS=v_rows, BLOCK_N=tiling["block_n"],
             BLOCK_CV=tiling["block_cv"], DTYPE=_TL_DTYPES[dtype], PRECISION=precision, EMULATE=emulate),
        dict(num_warps=4, num_stages=tiling["num_stages"]),
    )
    block = min(128, max(16, _pow2(c)))
    combine = KernelCall(
        _combine_kernel, (b * h, triton.cdiv(c, block)), [m, sums, acc, out, splits, c],
        {"SPLIT_BLOCK": min(8, max(2, _pow2(splits))), "BLOCK": block, "EMULATE": emulate}, {"num_warps": 4},
    )
    return Launch([key_scores, value_mix, combine], out)


def fused_latent_attention(q: Tensor, keys: QuantizedHistory, values: QuantizedHistory, mk: Tensor, cos: Tensor,
                           sin: Tensor, mask: Tensor, group: int, *, eta: float = 0.0, key_axis: str = "channel",
                           scale: float | None = None, config: KernelConfig | None = None) -> Tensor:
    """The fused Triton path of `latent_attention_reference` (same arguments, same result up to rounding).

    Raises ValueError when `supported()` gives a reason; allocates only the scratch (scores, per-slice partials) and
    the output, and never synchronizes with the host, so it can be captured in a CUDA graph.
    """
    reason = supported(q, mk)
    if reason is not None:
        raise ValueError(f"fused latent attention is not available here: {reason}")
    return prepare(q, keys, values, mk, cos, sin, mask, group, eta=eta, key_axis=key_axis, scale=scale,
                   config=config).run()


def fused_x_attention(q: Tensor, x: QuantizedHistory, wk_t: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, group: int,
                      *, eta: float = 0.0, scale: float | None = None, config: KernelConfig | None = None) -> Tensor:
    """The fused path of `x_attention_reference` (MHA XQuant: X per token, K = RoPE(X̂·Wkᵀ), output p·X̂)."""
    return fused_latent_attention(q, x, x, wk_t, cos, sin, mask, group, eta=eta, key_axis="token", scale=scale,
                                  config=config)
