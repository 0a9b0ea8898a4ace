/* One decode step of attention straight from a KIVI-layout cache (per-channel keys, per-token values), on a CPU.
 *
 * Never writes the dequantized history: the keys' scales and zeros fold into the query, so their codes are unpacked
 * into registers, used, and dropped; values are dequantized a tile of rows at a time in L1, shared by the query rows
 * of their KV head. Rows
 * read in full precision (the residual window) come from the stream's ring instead; slots the mask excludes are
 * skipped, so the empty part of a span bucket costs nothing. D must be a multiple of 8, and so must per-token
 * value groups (vgroup): eight channels are one vector.
 *
 * Shapes (BH = batch * kv_heads, each with its own stride; R = query rows per KV head, D = head_dim, N = span):
 *   q [BH, R, D] float32 (row stride q_stride), multiplied here by the softmax scale q_scale
 *   keys: codes [BH][N][kbytes] uint8; scale, zero [BH][N / kgroup][D]; ring [BH][kring][D] float32
 *         (bits = 32: the rows themselves, float32, for a plain KV cache; no scale, zero or ring)
 *   values: codes [BH][N][vbytes] uint8; scale, zero [BH][N][vgroups] (group c / vgroup); ring [BH][vring][D]
 *   scale and zero as stored (float32, or float16 where half is set), calibrated here: s' = a s, z' = z + b s
 *   (XQuant-KV's eta: a = 1 - 2 eta, b = eta (2^bits - 1); a = 1, b = 0 without calibration)
 *   recent [N] uint8 (1: read from the ring, at row rows[n]), per stream; NULL when no slot is
 *   allowed [N] uint8: the mask of the one query position (every row of a KV head shares it)
 *   out [BH, R, D] float32
 * Work is split over threads by (BH, token block): scores, then softmax per row, then the weighted sum of values
 * with one accumulator per thread, summed at the end.
 *
 * Also here: what a cache stores of one decode token (plain_store for plain K/V, kivi_store for the KIVI layout,
 * store_key_group when the token closes its keys' group).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
static inline int thread_index(void) { return omp_get_thread_num(); }
#else
static inline int thread_index(void) { return 0; }
#endif

#define BLOCK 256  /* the most tokens of one work item */

/* Tokens per work item for `heads` rows of N tokens over `threads` threads: at most BLOCK, and as many items as
 * make their count a multiple of the threads, so that each thread gets the same number of equal items (with 256
 * per item, a 560-token span of one sequence would give one thread 512 tokens and the other 48). */
static int64_t block_size(int64_t N, int64_t heads, int threads) {
    int64_t blocks = (N + BLOCK - 1) / BLOCK;
    while (threads > 1 && (heads * blocks) % threads && blocks < N) blocks++;
    return (N + blocks - 1) / blocks;
}
#define MAX_DIM 512

typedef struct {
    const uint8_t *codes;
    int64_t code_stride;   /* bytes between BH rows of codes */
    int64_t row_bytes;     /* bytes of one token's codes */
    int bits;
    int64_t group;         /* keys: tokens per group; values: channels per group */
    int64_t groups;        /* values: groups per token (ceil(D / group)) */
    const void *scale, *zero;
    int64_t param_stride;  /* elements between BH rows of scale/zero */
    int half;              /* scale and zero are float16 */
    float cal_scale, cal_shift;
    const uint8_t *recent; /* NULL: nothing read from the ring */
    const int64_t *rows;
    const float *ring;
    int64_t ring_stride;   /* floats between BH rows of the ring */
} stream_t;

/* e^x for x <= 0, within 2 ulp of expf: Cody-Waite reduction to 2^k e^r, |r| <= ln2 / 2, and Cephes' degree-6
 * polynomial for e^r. Unlike libm's expf it vectorizes, and the softmax of a long history is mostly exponentials. */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float k = floorf(x * 1.44269504f + 0.5f);
    const float r = fmaf(k, 2.12194440e-4f, fmaf(-k, 0.693359375f, x));  /* fused: never reassociated */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t exponent = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &exponent, sizeof scale);
    return p * scale;
}

#ifdef __FLT16_MAX__
/* the compiler's half type: one instruction per eight values where the CPU has them (F16C, Arm's fp16) */
static inline float f16_to_f32(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, sizeof f);
    return (float)f;
}
#else
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1f) bits = sign | 0x7f800000u | (mantissa << 13);
    else if (exponent) bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    else {  /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

/* Eight floats as one vector (GCC's and clang's vector extensions: AVX on x86, NEON on Arm, without intrinsics).
 * The kernel needs D % 8 == 0 and, per token, value groups that are whole vectors (vgroup % 8 == 0). */
typedef float v8 __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#ifdef __FLT16_MAX__
typedef _Float16 v8h __attribute__((vector_size(16)));
#endif
#define LANES 8
#define MAX_CHUNKS (MAX_DIM / LANES)

static inline v8 load8(const float *p) { v8 x; memcpy(&x, p, sizeof x); return x; }
static inline void store8(float *p, v8 x) { memcpy(p, &x, sizeof x); }
/* The sum of a vector's lanes, halved by shuffles: written element by element, it compiles to a chain of scalar
 * extracts and adds. */
static inline float sum8(v8 x) {
    typedef float v4 __attribute__((vector_size(16)));
    const v4 half = __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
    return (half[0] + half[2]) + (half[1] + half[3]);
}

/* The codes at bit offsets `shifts` of `words` (one per lane), `bits` wide, as floats. */
static inline v8 shifted_codes(v8u words, v8u shifts, int bits) {
    return __builtin_convertvector((v8i)(words >> shifts & ((1u << bits) - 1)), v8);
}

/* Channels 8k .. 8k + 7 of a packed row as floats. Those eight codes fill `bits` consecutive bytes (code i of byte
 * j is channel j * 8 / bits + i, in bits i * bits and up), so one little-endian word (two for bytes), shifted per
 * lane, holds them all. `bits` is a constant wherever this is inlined. */
static inline __attribute__((always_inline)) v8 codes8(const uint8_t *restrict row, int64_t k, int bits) {
    const uint8_t *p = row + k * bits;
    const v8u lane = {0, 1, 2, 3, 4, 5, 6, 7};
    v8u words, shifts;
    if (bits == 8) {  /* two words of four codes */
        uint32_t low, high;
        memcpy(&low, p, sizeof low);
        memcpy(&high, p + 4, sizeof high);
        words = (v8u){low, low, low, low, high, high, high, high};
        shifts = (lane & 3) * 8;
    } else {
        uint32_t word = p[0];
        if (bits == 2) { uint16_t pair; memcpy(&pair, p, sizeof pair); word = pair; }
        if (bits == 4) memcpy(&word, p, sizeof word);
        words = (v8u){} + word;
        shifts = lane * (uint32_t)bits;
    }
    return shifted_codes(words, shifts, bits);
}

/* A whole packed row as chunks of eight floats: codes8 per chunk, or, for 1- and 2-bit codes, one word of four
 * bytes (four or two chunks) loaded and broadcast once. */
static inline __attribute__((always_inline)) void unpack_row(const uint8_t *restrict row, int bits, int64_t chunks,
                                                             v8 *restrict out) {
    int64_t c = 0;
    if (bits <= 2) {
        const int64_t per_word = 4 / bits;
        const v8u shifts = (v8u){0, 1, 2, 3, 4, 5, 6, 7} * (uint32_t)bits;
        for (; c + per_word <= chunks; c += per_word) {
            uint32_t word;
            memcpy(&word, row + c * bits, sizeof word);
            const v8u words = (v8u){} + word;
            for (int64_t i = 0; i < per_word; i++)  /* chunk c + i: the word's bits from 8 * bits * i */
                out[c + i] = shifted_codes(words, shifts + (uint32_t)(8 * bits * i), bits);
        }
    }
    for (; c < chunks; c++) out[c] = codes8(row, c, bits);
}

/* s[0..count), z[0..count) = the calibrated parameters from element `at` of a stream's scale and zero. float16
 * is widened eight at a time: one scalar conversion per element merges into its destination register, a false
 * dependency that chains the loop (a quarter of a 2-bit step's time in per-channel key groups). */
static inline void load_params(const stream_t *t, int64_t at, int64_t count, float *restrict s, float *restrict z) {
    const float a = t->cal_scale, b = t->cal_shift;
    int64_t i = 0;
    if (t->half) {
        const uint16_t *restrict scale = (const uint16_t *)t->scale + at;
        const uint16_t *restrict zero = (const uint16_t *)t->zero + at;
#ifdef __FLT16_MAX__
        for (; i + LANES <= count; i += LANES) {
            v8h raw, offset;
            memcpy(&raw, scale + i, sizeof raw);
            memcpy(&offset, zero + i, sizeof offset);
            const v8 widened = __builtin_convertvector(raw, v8);
            store8(s + i, a * widened);
            store8(z + i, __builtin_convertvector(offset, v8) + b * widened);
        }
#endif
        for (; i < count; i++) {
            const float raw = f16_to_f32(scale[i]);
            s[i] = a * raw;
            z[i] = f16_to_f32(zero[i]) + b * raw;
        }
    } else {
        const float *restrict scale = (const float *)t->scale + at;
        const float *restrict zero = (const float *)t->zero + at;
        for (; i < count; i++) {
            s[i] = a * scale[i];
            z[i] = zero[i] + b * scale[i];
        }
    }
}

/* Row n of head bh where it is held in float32: a plain stream's row, or the ring's copy of a recent token; NULL
 * where it must be read from its codes. */
static inline const float *exact_row(const stream_t *t, int64_t bh, int64_t n, int64_t D) {
    if (t->bits == 32) return (const float *)(t->codes + bh * t->code_stride + n * t->row_bytes);
    if (t->recent && t->recent[n]) return t->ring + bh * t->ring_stride + t->rows[n] * D;
    return NULL;
}

/* Scores s[r * N + n] = q_r . k_n of tokens [start, end) of head bh, q already scaled (q [R][D]). Quantized keys:
 * k = s (.) c + z per channel, with s and z shared by a group of tokens, so q . k = (q (.) s) . c + q . z, where
 * qs = q (.) s and qz = q . z are made once per group; codes are unpacked into registers and dropped. */
static inline __attribute__((always_inline)) void key_scores(const stream_t *restrict k, int bits, int64_t chunks,
        int64_t bh, int64_t start, int64_t end, int64_t R, int64_t N, int64_t D, const float *restrict q,
        const uint8_t *restrict allowed, float *restrict qs, float *restrict qz, float *restrict scores) {
    float scale[MAX_DIM], zero[MAX_DIM];
    int64_t group_end = start;  /* the first token past the group whose qs and qz are made */
    for (int64_t n = start; n < end; n++) {
        float *s = scores + n;
        if (!allowed[n]) {
            for (int64_t r = 0; r < R; r++) s[r * N] = -INFINITY;
            continue;
        }
        const float *key = exact_row(k, bh, n, D);
        if (key) {
            for (int64_t r = 0; r < R; r++) {
                v8 acc = {};
                for (int64_t c = 0; c < chunks; c++) acc += load8(q + r * D + c * LANES) * load8(key + c * LANES);
                s[r * N] = sum8(acc);
            }
            continue;
        }
        if (n >= group_end) {
            const int64_t group = n / k->group;
            load_params(k, bh * k->param_stride + group * D, D, scale, zero);
            for (int64_t r = 0; r < R; r++) {
                v8 dot = {};
                for (int64_t c = 0; c < chunks; c++) {
                    const v8 qr = load8(q + r * D + c * LANES);
                    dot += qr * load8(zero + c * LANES);
                    store8(qs + r * D + c * LANES, qr * load8(scale + c * LANES));
                }
                qz[r] = sum8(dot);
            }
            group_end = (group + 1) * k->group;
        }
        const uint8_t *row = k->codes + bh * k->code_stride + n * k->row_bytes;
        v8 codes[MAX_CHUNKS];
        unpack_row(row, bits, chunks, codes);
        for (int64_t r = 0; r < R; r++) {
            v8 acc = {};
            for (int64_t c = 0; c < chunks; c++) acc += load8(qs + r * D + c * LANES) * codes[c];
            s[r * N] = qz[r] + sum8(acc);
        }
    }
}

/* acc[r] += sum_n p[r][n] v_n over tokens [start, end) of head bh (p: the softmax of scores, rows N apart).
 * Quantized values (v = s_g c + z_g per token and group g of channels) are dequantized a row at a time into a tile
 * in L1, shared by the R query rows, and never written further. Tokens go TILE positions at a time: their scales
 * and zeros are contiguous, so they load as vectors, and each query row's accumulators stay in registers over a
 * tile instead of being loaded and stored for every token. */
#define TILE 8
#define SUM_CHUNKS 8
static inline __attribute__((always_inline)) void value_sums(const stream_t *restrict v, int bits, int64_t chunks,
        int64_t bh, int64_t start, int64_t end, int64_t R, int64_t N, int64_t D, const float *restrict p,
        const uint8_t *restrict allowed, float *restrict acc) {
    const int64_t per_group = v->group / LANES, groups = v->groups;
    float rows_tile[TILE][MAX_DIM], scale[TILE * MAX_CHUNKS], zero[TILE * MAX_CHUNKS];
    const float *rows[TILE];
    int64_t tokens[TILE];
    for (int64_t first = start; first < end; first += TILE) {
        const int64_t last = first + TILE < end ? first + TILE : end;
        if (bits != 32) load_params(v, bh * v->param_stride + first * groups, (last - first) * groups, scale, zero);
        int64_t count = 0;
        for (int64_t n = first; n < last; n++) {
            if (!allowed[n]) continue;
            const float *value = exact_row(v, bh, n, D);
            if (!value) {
                const float *s = scale + (n - first) * groups, *z = zero + (n - first) * groups;
                v8 codes[MAX_CHUNKS];
                unpack_row(v->codes + bh * v->code_stride + n * v->row_bytes, bits, chunks, codes);
                for (int64_t g = 0, c = 0; g < groups; g++) {  /* per group, as c / per_group is a division */
                    const int64_t last_chunk = c + per_group < chunks ? c + per_group : chunks;
                    for (; c < last_chunk; c++) store8(rows_tile[count] + c * LANES, codes[c] * s[g] + z[g]);
                }
                value = rows_tile[count];
            }
            rows[count] = value;
            tokens[count++] = n;
        }
        for (int64_t r = 0; r < R && count; r++) {
            float weights[TILE];
            for (int64_t t = 0; t < count; t++) weights[t] = p[r * N + tokens[t]];
            /* SUM_CHUNKS vectors of sums at a time: as many as stay in registers, however wide the row */
            for (int64_t c0 = 0; c0 < chunks; c0 += SUM_CHUNKS) {
                if (c0 + SUM_CHUNKS > chunks) {
                    for (int64_t c = c0; c < chunks; c++) {
                        v8 sum = load8(acc + r * D + c * LANES);
                        for (int64_t t = 0; t < count; t++) sum += weights[t] * load8(rows[t] + c * LANES);
                        store8(acc + r * D + c * LANES, sum);
                    }
                    break;
                }
                v8 sums[SUM_CHUNKS];
                for (int64_t c = 0; c < SUM_CHUNKS; c++) sums[c] = load8(acc + r * D + (c0 + c) * LANES);
                for (int64_t t = 0; t < count; t++)
                    for (int64_t c = 0; c < SUM_CHUNKS; c++) sums[c] += weights[t] * load8(rows[t] + (c0 + c) * LANES);
                for (int64_t c = 0; c < SUM_CHUNKS; c++) store8(acc + r * D + (c0 + c) * LANES, sums[c]);
            }
        }
    }
}

/* The largest of x[0..n): eight running maxima, vectors compared and blended (the scalar loop is a chain of
 * dependent max instructions, which the compiler does not vectorize where NaN is honoured). */
static inline float max_of(const float *restrict x, int64_t n) {
    v8 top = (v8){} - INFINITY;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const v8 next = load8(x + i);
        const v8i larger = next > top;
        top = (v8)(((v8i)next & larger) | ((v8i)top & ~larger));
    }
    float result = -INFINITY;
    for (int64_t lane = 0; lane < LANES; lane++) result = top[lane] > result ? top[lane] : result;
    for (; i < n; i++) result = x[i] > result ? x[i] : result;
    return result;
}

/* The softmax of each of `lines` rows of N scores, in place (slots not allowed get 0). Called by every thread of a
 * parallel region: the rows are shared among them. */
static void softmax_rows(float *scores, int64_t lines, int64_t N, const uint8_t *allowed) {
#pragma omp for schedule(static)
    for (int64_t line = 0; line < lines; line++) {
        float *s = scores + line * N, total = 0.f;
        const float top = max_of(s, N);
        for (int64_t n = 0; n < N; n++) { s[n] = allowed[n] ? exp_nonpositive(s[n] - top) : 0.f; total += s[n]; }
        const float inverse = 1.f / total;
        for (int64_t n = 0; n < N; n++) s[n] *= inverse;
    }
}

/* out[i] = the sum over threads of partial[t * stride + i], i < size: each thread's accumulators added up. */
static void sum_partials(const float *partial, int64_t stride, int threads, int64_t size, float *out) {
    for (int64_t i = 0; i < size; i++) {
        float total = 0.f;
        for (int t = 0; t < threads; t++) total += partial[(int64_t)t * stride + i];
        out[i] = total;
    }
}

/* The loops specialized by code width (32: plain rows, no codes) and, for the usual head sizes 64 and 128, by
 * vectors per row: constant trip counts let the compiler unroll them and keep a row's codes in registers. */
#define FOR_DIM(call, b) \
    switch (D) { \
    case 64: call(b, 8); break; \
    case 128: call(b, 16); break; \
    default: call(b, D / LANES); \
    }
#define FOR_BITS(call) \
    switch (bits) { \
    case 1: FOR_DIM(call, 1); break; \
    case 2: FOR_DIM(call, 2); break; \
    case 4: FOR_DIM(call, 4); break; \
    case 8: FOR_DIM(call, 8); break; \
    default: FOR_DIM(call, 32); \
    }

void rotate_half(int dtype, const float *x, const void *cos, const void *sin, int64_t D, void *out, int64_t at);

/* Stores one decode step's key and value rows [BH][D] at `slot` of plain float32 buffers [BH][capacity][D] (head
 * stride `head_stride` floats), the key rotated by the step's cos, sin [D]: what a plain cache writes per token. */
int plain_store(int64_t BH, int64_t D, const float *k, const float *v, const float *cos, const float *sin,
                float *keys, float *values, int64_t head_stride, int64_t slot) {
    if (D % 2) return 1;
    for (int64_t bh = 0; bh < BH; bh++) {
        rotate_half(0, k + bh * D, cos, sin, D, keys, bh * head_stride + slot * D);
        memcpy(values + bh * head_stride + slot * D, v + bh * D, sizeof(float) * D);
    }
    return 0;
}

/* The float16 next to x (finite, within float16's range) toward +inf (up) or -inf: x's magnitude truncated to
 * float16, stepped one unit away from zero where that lands on the wrong side of x. quant.py's _round_stored. */
static inline uint16_t f16_directed(float x, int up) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    const float magnitude = fabsf(x);
    uint32_t truncated;
    if (magnitude < 6.103515625e-05f) {  /* below the smallest normal float16: units of 2^-24, exact in float */
        truncated = (uint32_t)(magnitude * 16777216.0f);
    } else {
        uint32_t m;
        memcpy(&m, &magnitude, sizeof m);
        truncated = ((((m >> 23) & 0xffu) - 112u) << 10) | ((m >> 13) & 0x3ffu);
    }
    if (f16_to_f32((uint16_t)truncated) != magnitude && (sign ? !up : up)) truncated += 1;
    return (uint16_t)(sign | truncated);
}

/* The stored zero and scale of the range [low, high] at `levels` + 1 levels, as quant.py's _range_params: the
 * zero min rounded down and the scale (max - zero) / levels rounded up to float16, both clamped to its range. */
static inline void range_params(float low, float high, int levels, uint16_t *zero, uint16_t *scale) {
    low = low < -65504.f ? -65504.f : low > 65504.f ? 65504.f : low;
    *zero = f16_directed(low, 0);
    const float z = f16_to_f32(*zero), span = high - z > 0.f ? high - z : 0.f;
    const float step = span / (float)levels;
    *scale = f16_directed(step > 65504.f ? 65504.f : step, 1);
}

/* quant.py's quantize_codes: round((y - z) / s) clamped to [0, levels], 0 where the scale is 0. */
static inline uint8_t code_of(float y, float z, float s, int levels) {
    const float code = nearbyintf((y - z) / s);
    return s > 0.f ? (uint8_t)(code < 0.f ? 0.f : code > (float)levels ? (float)levels : code) : 0;
}

/* The codes q [D] of one token packed into D * bits / 8 bytes: code i of byte j in bits i * bits. */
static inline void pack_row(const uint8_t *restrict q, int64_t D, int bits, uint8_t *restrict codes) {
    const int per = 8 / bits;
    for (int64_t j = 0; j < D / per; j++) {
        unsigned byte = 0;
        for (int i = 0; i < per; i++) byte |= (unsigned)q[j * per + i] << (i * bits);
        codes[j] = (uint8_t)byte;
    }
}

/* One token y [D] quantized per token in groups of `group` channels (the last one ragged), as quant.py's
 * Layout.quantize does it. codes may be NULL (a layer that shares another's codes keeps only its scale and zero). */
static void quantize_token(const float *restrict y, int64_t D, int bits, int64_t group, uint8_t *restrict codes,
                           uint16_t *restrict scale, uint16_t *restrict zero) {
    const int levels = (1 << bits) - 1;
    uint8_t q[MAX_DIM];
    for (int64_t g = 0, first = 0; first < D; g++, first += group) {
        const int64_t last = first + group < D ? first + group : D;
        float low = y[first], high = y[first];
        for (int64_t d = first + 1; d < last; d++) {
            low = y[d] < low ? y[d] : low;
            high = y[d] > high ? y[d] : high;
        }
        range_params(low, high, levels, &zero[g], &scale[g]);
        const float z = f16_to_f32(zero[g]), s = f16_to_f32(scale[g]);
        for (int64_t d = first; d < last; d++) q[d] = code_of(y[d], z, s, levels);
    }
    if (codes) pack_row(q, D, bits, codes);
}

/* One closed group of per-channel keys, for every head [BH]: the G rows y [BH][G][D] (row stride D, head stride
 * ring_stride: the group's rows of the key ring) quantized per channel, as quant.py's Layout.quantize with axis
 * "channel" does it, into G consecutive token rows of codes [BH][..][D * bits / 8] (byte stride code_stride; NULL:
 * the layer shares another's codes) and one row of scale, zero [BH][..][D] float16 (stride param_stride). */
int store_key_group(int64_t BH, int64_t G, int64_t D, const float *ring, int64_t ring_stride, int bits,
                    uint8_t *codes, int64_t code_stride, uint16_t *scale, uint16_t *zero, int64_t param_stride) {
    if (D > MAX_DIM || (bits != 1 && bits != 2 && bits != 4 && bits != 8) || (D * bits) % 8 || G < 1) return 1;
    const int levels = (1 << bits) - 1;
    const int64_t row_bytes = D * bits / 8;
    float z[MAX_DIM], s[MAX_DIM];
    uint8_t q[MAX_DIM];
    for (int64_t bh = 0; bh < BH; bh++) {
        const float *y = ring + bh * ring_stride;
        uint16_t *zero_row = zero + bh * param_stride, *scale_row = scale + bh * param_stride;
        for (int64_t d = 0; d < D; d++) {
            float low = y[d], high = y[d];
            for (int64_t t = 1; t < G; t++) {
                const float x = y[t * D + d];
                low = x < low ? x : low;
                high = x > high ? x : high;
            }
            range_params(low, high, levels, &zero_row[d], &scale_row[d]);
            z[d] = f16_to_f32(zero_row[d]), s[d] = f16_to_f32(scale_row[d]);
        }
        if (!codes) continue;
        for (int64_t t = 0; t < G; t++) {
            for (int64_t d = 0; d < D; d++) q[d] = code_of(y[t * D + d], z[d], s[d], levels);
            pack_row(q, D, bits, codes + bh * code_stride + t * row_bytes);
        }
    }
    return 0;
}

/* What a KIVI-layout cache writes for one decode token of every head [BH]: the key k [BH][D], rotated by the
 * step's cos, sin [D] (cos NULL: as it is, XQuant's key latents), into row krow of the key ring (per-channel keys
 * wait there for their group to close); the value v [BH][D] quantized per token (quantize_token) into slot vslot
 * of codes [BH][..][D * vbits / 8] (byte stride vcode_stride between heads) and of scale, zero [BH][..][groups]
 * float16, and copied into row vrow of the value ring (vring NULL: none). */
int kivi_store(int64_t BH, int64_t D, const float *k, const float *cos, const float *sin, float *kring,
               int64_t kring_stride, int64_t krow, const float *v, int vbits, int64_t vgroup, uint8_t *vcodes,
               int64_t vcode_stride, uint16_t *vscale, uint16_t *vzero, int64_t vparam_stride, int64_t vslot,
               float *vring, int64_t vring_stride, int64_t vrow) {
    if (D % 2 || D > MAX_DIM || (vbits != 1 && vbits != 2 && vbits != 4 && vbits != 8) || (D * vbits) % 8) return 1;
    const int64_t groups = (D + vgroup - 1) / vgroup, row_bytes = D * vbits / 8;
    for (int64_t bh = 0; bh < BH; bh++) {
        if (cos) rotate_half(0, k + bh * D, cos, sin, D, kring, bh * kring_stride + krow * D);
        else memcpy(kring + bh * kring_stride + krow * D, k + bh * D, sizeof(float) * D);
        const float *value = v + bh * D;
        quantize_token(value, D, vbits, vgroup, vcodes ? vcodes + bh * vcode_stride + vslot * row_bytes : NULL,
                       vscale + bh * vparam_stride + vslot * groups, vzero + bh * vparam_stride + vslot * groups);
        if (vring) memcpy(vring + bh * vring_stride + vrow * D, value, sizeof(float) * D);
    }
    return 0;
}

int kv_decode_attention(int64_t BH, int64_t R, int64_t N, int64_t D, const float *query, int64_t q_stride,
                        float q_scale, const stream_t *keys, const stream_t *values, const uint8_t *allowed,
                        float *out, int threads) {
    const stream_t k = *keys, v = *values;
    if (D > MAX_DIM || D % LANES || R < 1 || N < 1) return 1;
    if (v.bits != 32 && (v.group % LANES || v.groups > MAX_CHUNKS)) return 1;
    const int64_t block = block_size(N, BH, threads), blocks = (N + block - 1) / block;
    const int64_t items = BH * blocks, size = BH * R * D;
    /* per thread: a dense copy of q times the softmax scale, qs and qz (keys), sums of p v (values) */
    const int64_t work_size = 2 * R * D + R + size;
    float *scores = malloc(sizeof(float) * BH * R * N);
    float *work = calloc((size_t)threads * work_size, sizeof(float));
    if (!scores || !work) { free(scores); free(work); return 2; }

#pragma omp parallel num_threads(threads)
    {
        float *q = work + (int64_t)thread_index() * work_size, *qs = q + R * D, *qz = qs + R * D;
        float *acc = qz + R;
        int64_t bh_loaded = -1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            const int64_t bh = item / blocks, start = (item % blocks) * block;
            const int64_t end = start + block < N ? start + block : N;
            if (bh != bh_loaded) {
                for (int64_t i = 0; i < R * D; i++) q[i] = query[bh * q_stride + i] * q_scale;
                bh_loaded = bh;
            }
            const int bits = k.bits;
#define KEYS(b, chunks) key_scores(&k, b, chunks, bh, start, end, R, N, D, q, allowed, qs, qz, scores + bh * R * N)
            FOR_BITS(KEYS)
#undef KEYS
        }
        softmax_rows(scores, BH * R, N, allowed);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            const int64_t bh = item / blocks, start = (item % blocks) * block;
            const int64_t end = start + block < N ? start + block : N;
            const int bits = v.bits;
#define VALUES(b, chunks) value_sums(&v, b, chunks, bh, start, end, R, N, D, scores + bh * R * N, allowed, \
                                    acc + bh * R * D)
            FOR_BITS(VALUES)
#undef VALUES
        }
    }
    sum_partials(work + 2 * R * D + R, work_size, threads, size, out);
    free(scores);
    free(work);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * One decode step of attention over XQuant's GQA latents (cache/xquant.py's XQuantGQALayer), on a CPU: the keys are
 * rebuilt from the per-channel quantized key latents REBUILD_ROWS tokens at a time, k_n = RoPE_n(L̂k_n · Mk), in L1,
 * and dropped after their scores; the values are absorbed: Σ_n p_n L̂v_n [C] per query head, summed straight from
 * the per-token value codes as value_sums sums a KV head's, then projected by that head's columns of Mv.
 *
 * Shapes (B sequences; H query heads over Hkv KV heads of D channels, R = H / Hkv; C latent channels; N = span):
 *   q [B][H][D] float32, multiplied here by q_scale
 *   keys: a stream of C-channel rows (codes [B][N][kbytes], scale, zero [B][N / kgroup][C], ring [B][kring][C])
 *   mk [C][Hkv * D] float32; cos, sin [N][D] float32: the RoPE tables of each slot's position
 *   values: a stream of C-channel rows quantized per token (scale, zero [B][N][vgroups])
 *   mv [C][Hkv * D] float32: the values' projection, which takes each head's Σ p L̂v [C] to its output
 *   allowed [N]; out [B][H][D] float32
 * Hkv * D must be a multiple of REBUILD_PANEL and D of 2 * LANES (the rotate-half pairs a vector with a vector).
 * tiles: rebuild keys and sum values on AMX where this build and Linux allow (matrix_tiles_ready), as exact as the
 * vectors: runs of code rows of key groups of at least TILE_GROUP tokens, value groups of whole tiles, H <= 16.
 */
#if defined(__AVX512F__)
typedef float vwide __attribute__((vector_size(64)));  /* the rebuild's vectors: the widest the CPU has */
#else
typedef float vwide __attribute__((vector_size(32)));
#endif
#define WIDE ((int64_t)(sizeof(vwide) / sizeof(float)))
#define REBUILD_ROWS 6  /* tokens whose keys are rebuilt together: one load of Mk serves six */
#define PANEL_VECTORS 4  /* output vectors per token and pass: 6 x 4 accumulators in registers */
#define REBUILD_PANEL (PANEL_VECTORS * WIDE)

static inline vwide loadw(const float *p) { vwide x; memcpy(&x, p, sizeof x); return x; }
static inline void storew(float *p, vwide x) { memcpy(p, &x, sizeof x); }
static inline float sumw(vwide x) {
#if defined(__AVX512F__)
    return sum8(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
#else
    return sum8(x);
#endif
}

/* keys[t][j] = Σ_c rows[t][c] mk[c][j] for REBUILD_ROWS rows (C channels; j < width). */
static void rebuild_keys(const float *const *rows, const float *restrict mk, int64_t C, int64_t width,
                         float *restrict keys) {
    for (int64_t j = 0; j < width; j += REBUILD_PANEL) {
        vwide acc[REBUILD_ROWS][PANEL_VECTORS] = {};
        for (int64_t c = 0; c < C; c++) {
            vwide m[PANEL_VECTORS];
            for (int64_t i = 0; i < PANEL_VECTORS; i++) m[i] = loadw(mk + c * width + j + i * WIDE);
            for (int64_t t = 0; t < REBUILD_ROWS; t++) {
                const float l = rows[t][c];
                for (int64_t i = 0; i < PANEL_VECTORS; i++) acc[t][i] += l * m[i];
            }
        }
        for (int64_t t = 0; t < REBUILD_ROWS; t++)
            for (int64_t i = 0; i < PANEL_VECTORS; i++) storew(keys + t * width + j + i * WIDE, acc[t][i]);
    }
}

/* AMX, where the CPU has it (Sapphire Rapids and later): the keys of up to TILE_TOKENS code rows of one group are rebuilt
 * on the matrix tiles. A key row is (c (.) s + z) Mk for its codes c, so with the group's Mk scaled per channel,
 * Ms = diag(s) Mk, it is c Ms + z Mk: the codes are small integers, exact in bfloat16, and Ms is carried by
 * SPLIT_TERMS bfloat16 matrices whose sum is Ms to float32's 24 bits, so the product, accumulated in float32, is
 * as exact as the vector path's. Ms (and z Mk) are made once per group and thread, then serve the group's tokens. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MATRIX_TILES 1
#define TILE_TOKENS 128  /* tokens rebuilt in one pass over Ms, 32 (two tiles of 16 rows) at a time */
#define TILE_GROUP 32    /* the shortest key group worth its Ms */
#define SPLIT_TERMS 3   /* bfloat16 terms of Ms: 3 x 8 significant bits */

/* Linux gives a process the tiles' state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). */
int matrix_tiles_ready(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config_t;

/* Eight tiles of 16 rows of 64 bytes (0-3 float32 accumulators in both uses, the others their operands). */
static void configure_tiles(void) {
    tile_config_t config = {.palette = 1};
    for (int i = 0; i < 8; i++) { config.bytes_per_row[i] = 64; config.rows[i] = 16; }
    _tile_loadconfig(&config);
}

typedef struct {
    uint16_t *codes;   /* [TILE_TOKENS][C] bfloat16 */
    uint16_t *packed;  /* Ms as the tiles read it: [SPLIT_TERMS][C / 2][width][2] bfloat16, channel pairs */
    float *shift;      /* [16][width]: z Mk in every row, where the accumulators start */
    float *keys;       /* [TILE_TOKENS][width] */
    float scale[MAX_DIM], zero[MAX_DIM];
    int64_t sequence, group;  /* whose Ms is packed */
} tile_work_t;

/* Ms = diag(s) Mk split into SPLIT_TERMS bfloat16 matrices, each the top half of what the previous ones left (a
 * truncation, exact to subtract), packed in channel pairs as tdpbf16ps reads its second operand (one 32-bit word per
 * column: channel c in the low half, c + 1 in the high half); shift = z Mk, in each of 16 rows. */
static void pack_scaled(const float *restrict mk, int64_t C, int64_t width, tile_work_t *w) {
    const __m512i top = _mm512_set1_epi32((int)0xffff0000u);
    const int64_t term = C / 2 * width * 2;
    const float *restrict scale = w->scale, *restrict zero = w->zero;
    uint16_t *restrict packed = w->packed;
    float *restrict shift = w->shift;  /* row 0 sums z Mk as Mk goes by; the other 15 copy it at the end */
    memset(shift, 0, sizeof(float) * width);
    for (int64_t c = 0; c < C; c += 2) {
        const __m512 s0 = _mm512_set1_ps(scale[c]), s1 = _mm512_set1_ps(scale[c + 1]);
        const __m512 z0 = _mm512_set1_ps(zero[c]), z1 = _mm512_set1_ps(zero[c + 1]);
        for (int64_t j = 0; j < width; j += 16) {
            const __m512 k0 = _mm512_loadu_ps(mk + c * width + j), k1 = _mm512_loadu_ps(mk + (c + 1) * width + j);
            _mm512_storeu_ps(shift + j, _mm512_fmadd_ps(z1, k1, _mm512_fmadd_ps(z0, k0, _mm512_loadu_ps(shift + j))));
            __m512 m0 = _mm512_mul_ps(s0, k0), m1 = _mm512_mul_ps(s1, k1);
            uint16_t *out = packed + (c / 2 * width + j) * 2;
            for (int t = 0; t < SPLIT_TERMS; t++, out += term) {
                const __m512i h0 = _mm512_and_si512(_mm512_castps_si512(m0), top);
                const __m512i h1 = _mm512_and_si512(_mm512_castps_si512(m1), top);
                _mm512_storeu_si512(out, _mm512_or_si512(h1, _mm512_srli_epi32(h0, 16)));
                m0 = _mm512_sub_ps(m0, _mm512_castsi512_ps(h0));
                m1 = _mm512_sub_ps(m1, _mm512_castsi512_ps(h1));
            }
        }
    }
    for (int64_t row = 1; row < 16; row++) memcpy(shift + row * width, shift, sizeof(float) * width);
}

/* A row's C codes as bfloat16 (small integers: exact). 4- and 2-bit codes spread to one per 16-bit lane, then
 * looked up in a table of bfloat16(0 .. 31); other widths through floats (bfloat16 is float32's top half). */
static inline __attribute__((always_inline)) void codes_to_bf16(const uint8_t *restrict row, int bits, int64_t chunks,
                                                                uint16_t *restrict out) {
    static const uint16_t small[32] = {  /* bfloat16(i) */
        0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150,
        0x4160, 0x4170, 0x4180, 0x4188, 0x4190, 0x4198, 0x41a0, 0x41a8, 0x41b0, 0x41b8, 0x41c0, 0x41c8, 0x41d0, 0x41d8,
        0x41e0, 0x41e8, 0x41f0, 0x41f8};
    const int64_t C = chunks * LANES;
    const __m512i table = _mm512_loadu_si512(small);
    if (bits == 4 && C % 32 == 0) {
        const __m512i low = _mm512_set1_epi32(0x0f), high = _mm512_set1_epi32(0xf0);
        for (int64_t i = 0; i < C; i += 32) {  /* byte j: channels 2j (low nibble), 2j + 1 */
            const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + i / 2)));
            const __m512i spread = _mm512_or_si512(_mm512_and_si512(bytes, low),
                                                   _mm512_slli_epi32(_mm512_and_si512(bytes, high), 12));
            _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(spread, table));
        }
        return;
    }
    if (bits == 2 && C % 32 == 0) {
        const __m512i two = _mm512_set1_epi64(3);
        for (int64_t i = 0; i < C; i += 32) {  /* byte j: channels 4j .. 4j + 3, from the low bits up */
            uint64_t eight;
            memcpy(&eight, row + i / 4, sizeof eight);
            const __m512i bytes = _mm512_cvtepu8_epi64(_mm_cvtsi64_si128((long long)eight));
            const __m512i spread = _mm512_or_si512(
                _mm512_or_si512(_mm512_and_si512(bytes, two), _mm512_slli_epi64(_mm512_and_si512(_mm512_srli_epi64(bytes, 2), two), 16)),
                _mm512_or_si512(_mm512_slli_epi64(_mm512_and_si512(_mm512_srli_epi64(bytes, 4), two), 32),
                                _mm512_slli_epi64(_mm512_srli_epi64(bytes, 6), 48)));
            _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(spread, table));
        }
        return;
    }
    v8 codes[MAX_CHUNKS];
    unpack_row(row, bits, chunks, codes);
    for (int64_t c = 0; c < chunks; c++) {
        const v8u top = (v8u)codes[c] >> 16;
        for (int64_t i = 0; i < LANES; i++) out[c * LANES + i] = (uint16_t)top[i];
    }
}

/* keys[t] = codes[t] Ms + z Mk for `rows` rows (a multiple of 32): 32 columns a pass, which all the rows share
 * while that slice of Ms is in L1. */
static void rebuild_on_tiles(const tile_work_t *w, int64_t C, int64_t width, int64_t rows) {
    const int64_t term = C / 2 * width * 2, code_bytes = C * 2, pair_bytes = width * 4, key_bytes = width * 4;
    for (int64_t j = 0; j < width; j += 32) {
        for (int64_t t = 0; t < rows; t += 32) {
            const uint16_t *codes = w->codes + t * C;
            float *keys = w->keys + t * width + j;
            _tile_loadd(0, w->shift + j, key_bytes);
            _tile_loadd(1, w->shift + j + 16, key_bytes);
            _tile_loadd(2, w->shift + j, key_bytes);
            _tile_loadd(3, w->shift + j + 16, key_bytes);
            for (int64_t c = 0; c < C; c += 32) {
                _tile_loadd(4, codes + c, code_bytes);
                _tile_loadd(5, codes + 16 * C + c, code_bytes);
                const uint16_t *ms = w->packed + c / 2 * width * 2 + j * 2;
                for (int s = 0; s < SPLIT_TERMS; s++, ms += term) {
                    _tile_loadd(6, ms, pair_bytes);
                    _tile_loadd(7, ms + 32, pair_bytes);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, keys, key_bytes);
            _tile_stored(1, keys + 16, key_bytes);
            _tile_stored(2, keys + 16 * width, key_bytes);
            _tile_stored(3, keys + 16 * width + 16, key_bytes);
        }
    }
}

static tile_work_t *tile_work(int64_t C, int64_t width) {
    tile_work_t *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    const size_t codes = sizeof(uint16_t) * TILE_TOKENS * C, packed = sizeof(uint16_t) * SPLIT_TERMS * C * width;
    const size_t floats = sizeof(float) * (16 + TILE_TOKENS) * width;
    char *base = aligned_alloc(64, (codes + packed + floats + 63) / 64 * 64);
    if (!base) { free(w); return NULL; }
    memset(base, 0, codes);  /* rows past a short tile's tokens: rebuilt and unused, but never NaN */
    w->codes = (uint16_t *)base;
    w->packed = (uint16_t *)(base + codes);
    w->shift = (float *)(base + codes + packed);
    w->keys = w->shift + 16 * width;
    w->sequence = w->group = -1;
    return w;
}

static void free_tile_work(tile_work_t *w) {
    if (w) { free(w->codes); free(w); }
}

/* Values on the tiles: a query head's output is Σ_n p_n (c_n s_ng + z_ng) = Σ_n (p_n s_ng) c_n + Σ_n p_n z_ng over
 * the channels of each group g, so with the codes c (exact in bfloat16) as one operand and p s (SPLIT_TERMS
 * bfloat16 terms, as the keys' Ms) as the other, the product is as exact as the vector path's. VALUE_TOKENS tokens
 * at a time; a run holding rows of the ring goes to the vectors. */
#define VALUE_TOKENS 128

typedef struct {
    uint16_t *pairs;    /* [VALUE_TOKENS / 2][C][2]: the codes of two tokens interleaved, as tdpbf16ps reads them */
    uint16_t *weights;  /* [groups][SPLIT_TERMS][16][VALUE_TOKENS]: p s of each head (rows past H stay 0) */
    float *sums;        /* [16][C] */
    float *shifts;      /* [16][groups]: Σ p z */
    float *scale, *zero;  /* [VALUE_TOKENS][groups] */
    int64_t groups;
} value_tile_t;

static value_tile_t *value_tile_work(int64_t C, int64_t groups) {
    value_tile_t *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    const size_t pairs = sizeof(uint16_t) * VALUE_TOKENS * C;
    const size_t weights = sizeof(uint16_t) * groups * SPLIT_TERMS * 16 * VALUE_TOKENS;
    const size_t floats = sizeof(float) * (16 * C + 16 * groups + 2 * VALUE_TOKENS * groups);
    char *base = aligned_alloc(64, (pairs + weights + floats + 63) / 64 * 64);
    if (!base) { free(w); return NULL; }
    memset(base, 0, pairs + weights + floats);
    w->pairs = (uint16_t *)base;
    w->weights = (uint16_t *)(base + pairs);
    w->sums = (float *)(base + pairs + weights);
    w->shifts = w->sums + 16 * C;
    w->scale = w->shifts + 16 * groups;
    w->zero = w->scale + VALUE_TOKENS * groups;
    w->groups = groups;
    return w;
}

static void free_value_tile_work(value_tile_t *w) {
    if (w) { free(w->pairs); free(w); }
}

/* Tokens [first, last) of sequence b, all read from codes (last - first <= VALUE_TOKENS), into w->sums, w->shifts. */
static void value_run_on_tiles(const stream_t *restrict v, int64_t b, int64_t first, int64_t last, int64_t H,
                               int64_t N, int64_t C, const float *restrict p, const uint8_t *restrict allowed,
                               value_tile_t *restrict w) {
    const int64_t groups = w->groups, count = last - first, padded = (count + 31) / 32 * 32;
    const int64_t chunks = C / LANES;
    const __m512i top = _mm512_set1_epi32((int)0xffff0000u);
    load_params(v, b * v->param_stride + first * groups, count * groups, w->scale, w->zero);
    uint16_t rows[2][MAX_DIM];
    for (int64_t pair = 0; pair < padded / 2; pair++) {
        for (int64_t i = 0; i < 2; i++) {
            const int64_t n = first + 2 * pair + i;
            if (n < last) codes_to_bf16(v->codes + b * v->code_stride + n * v->row_bytes, v->bits, chunks, rows[i]);
            else memset(rows[i], 0, sizeof(uint16_t) * C);  /* padding: its weight is 0 too */
        }
        const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                             39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
        uint16_t *out = w->pairs + pair * C * 2;
        for (int64_t c = 0; c < C; c += 32) {  /* channels c .. c + 31 of both tokens: two vectors of pairs */
            const __m512i a = _mm512_loadu_si512(rows[0] + c), z = _mm512_loadu_si512(rows[1] + c);
            _mm512_storeu_si512(out + 2 * c, _mm512_permutex2var_epi16(a, low, z));
            _mm512_storeu_si512(out + 2 * c + 32, _mm512_permutex2var_epi16(a, high, z));
        }
    }
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t n0 = 0; n0 < padded; n0 += 16) {
            float s[16], z[16];
            __mmask16 use = 0;
            for (int64_t i = 0; i < 16; i++) {
                const int64_t n = n0 + i;
                const int on = n < count && allowed[first + n];
                use |= (__mmask16)(on << i);
                s[i] = on ? w->scale[n * groups + g] : 0.f;
                z[i] = on ? w->zero[n * groups + g] : 0.f;
            }
            const __m512 scale = _mm512_loadu_ps(s), zero = _mm512_loadu_ps(z);
            for (int64_t h = 0; h < H; h++) {
                const __m512 weight = _mm512_maskz_loadu_ps(use, p + h * N + first + n0);
                w->shifts[h * groups + g] += _mm512_reduce_add_ps(_mm512_mul_ps(weight, zero));
                __m512 m = _mm512_mul_ps(weight, scale);
                uint16_t *out = w->weights + ((g * SPLIT_TERMS) * 16 + h) * VALUE_TOKENS + n0;
                for (int t = 0; t < SPLIT_TERMS; t++, out += 16 * VALUE_TOKENS) {
                    const __m512i kept = _mm512_and_si512(_mm512_castps_si512(m), top);
                    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(_mm512_srli_epi32(kept, 16)));
                    m = _mm512_sub_ps(m, _mm512_castsi512_ps(kept));
                }
            }
        }
    }
    const int64_t weight_bytes = VALUE_TOKENS * 2, pair_bytes = C * 4, sum_bytes = C * 4;
    for (int64_t j = 0; j < C;) {  /* up to four column tiles of one group (groups are whole tiles) at a time */
        const int64_t group_end = (j / v->group + 1) * v->group < C ? (j / v->group + 1) * v->group : C;
        const uint16_t *weights = w->weights + j / v->group * SPLIT_TERMS * 16 * VALUE_TOKENS;
        float *sums = w->sums + j;
        if (group_end - j >= 64) {
            _tile_loadd(0, sums, sum_bytes); _tile_loadd(1, sums + 16, sum_bytes);
            _tile_loadd(2, sums + 32, sum_bytes); _tile_loadd(3, sums + 48, sum_bytes);
            for (int64_t k = 0; k < padded; k += 32) {
                const uint16_t *codes = w->pairs + k / 2 * C * 2 + j * 2, *ws = weights + k;
                for (int t = 0; t < SPLIT_TERMS; t++, ws += 16 * VALUE_TOKENS) {
                    _tile_loadd(4, ws, weight_bytes);
                    _tile_loadd(6, codes, pair_bytes);
                    _tile_loadd(7, codes + 32, pair_bytes);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_loadd(6, codes + 64, pair_bytes);
                    _tile_loadd(7, codes + 96, pair_bytes);
                    _tile_dpbf16ps(2, 4, 6);
                    _tile_dpbf16ps(3, 4, 7);
                }
            }
            _tile_stored(0, sums, sum_bytes); _tile_stored(1, sums + 16, sum_bytes);
            _tile_stored(2, sums + 32, sum_bytes); _tile_stored(3, sums + 48, sum_bytes);
            j += 64;
        } else {
            _tile_loadd(0, sums, sum_bytes);
            for (int64_t k = 0; k < padded; k += 32) {
                const uint16_t *ws = weights + k;
                _tile_loadd(6, w->pairs + k / 2 * C * 2 + j * 2, pair_bytes);
                for (int t = 0; t < SPLIT_TERMS; t++, ws += 16 * VALUE_TOKENS) {
                    _tile_loadd(4, ws, weight_bytes);
                    _tile_dpbf16ps(0, 4, 6);
                }
            }
            _tile_stored(0, sums, sum_bytes);
            j += 16;
        }
    }
}

/* acc[h] (+)= Σ_n p[h][n] v_n over tokens [start, end) of sequence b: runs of code rows on the tiles, others (the
 * ring's rows) on vectors. */
static void values_on_tiles(const stream_t *restrict v, int64_t b, int64_t start, int64_t end, int64_t H, int64_t N,
                            int64_t C, const float *restrict p, const uint8_t *restrict allowed,
                            value_tile_t *restrict w, float *restrict acc) {
    for (int64_t first = start; first < end; first += VALUE_TOKENS) {
        const int64_t last = first + VALUE_TOKENS < end ? first + VALUE_TOKENS : end;
        int coded = 1;
        for (int64_t n = first; n < last && coded; n++) coded = !(v->recent && v->recent[n]);
        if (coded) value_run_on_tiles(v, b, first, last, H, N, C, p, allowed, w);
        else value_sums(v, v->bits, C / LANES, b, first, last, H, N, C, p, allowed, acc);
    }
    for (int64_t h = 0; h < H; h++)
        for (int64_t c = 0; c < C; c++) {
            acc[h * C + c] += w->sums[h * C + c] + w->shifts[h * w->groups + c / v->group];
            w->sums[h * C + c] = 0.f;
        }
    memset(w->shifts, 0, sizeof(float) * 16 * w->groups);
}
#else
int matrix_tiles_ready(void) { return 0; }
typedef struct tile_work tile_work_t;
typedef struct value_tile value_tile_t;
#endif

/* Scores of one rebuilt key (its KV head's D channels) for that head's R query rows, at slot n (cos, sin: its
 * RoPE tables; scores: row r at scores[r * N]). */
static inline __attribute__((always_inline)) void score_key(const float *restrict key, const float *restrict c_n,
        const float *restrict s_n, const float *restrict q, int64_t R, int64_t D, float *restrict rotated,
        float *restrict scores, int64_t N) {
    const int64_t half = D / 2;
    if (half % WIDE == 0) {  /* the usual heads: the widest vectors */
        for (int64_t i = 0; i < half; i += WIDE) {  /* rotate-half: (k1 c - k2 s, k2 c + k1 s) */
            const vwide k1 = loadw(key + i), k2 = loadw(key + half + i);
            storew(rotated + i, k1 * loadw(c_n + i) - k2 * loadw(s_n + i));
            storew(rotated + half + i, k2 * loadw(c_n + half + i) + k1 * loadw(s_n + half + i));
        }
        for (int64_t r = 0; r < R; r++) {
            const float *qr = q + r * D;
            vwide acc = {};
            for (int64_t c = 0; c < D; c += WIDE) acc += loadw(qr + c) * loadw(rotated + c);
            scores[r * N] = sumw(acc);
        }
        return;
    }
    for (int64_t i = 0; i < half; i += LANES) {
        const v8 k1 = load8(key + i), k2 = load8(key + half + i);
        store8(rotated + i, k1 * load8(c_n + i) - k2 * load8(s_n + i));
        store8(rotated + half + i, k2 * load8(c_n + half + i) + k1 * load8(s_n + half + i));
    }
    for (int64_t r = 0; r < R; r++) {
        const float *qr = q + r * D;
        v8 acc = {};
        for (int64_t c = 0; c < D; c += LANES) acc += load8(qr + c) * load8(rotated + c);
        scores[r * N] = sum8(acc);
    }
}

/* scores[h * N + n] for tokens [start, end) of sequence b: q_h . RoPE_n(L̂k_n Mk) over the KV head of h. Runs of
 * code rows within one group go to the tiles (`tiles` non-NULL), the rest REBUILD_ROWS at a time to the vectors. */
static inline __attribute__((always_inline)) void latent_scores(const stream_t *restrict k, int bits, int64_t chunks,
        int64_t b, int64_t start, int64_t end, int64_t H, int64_t Hkv, int64_t D, int64_t C, int64_t N,
        const float *restrict q, const float *restrict mk, const float *restrict cos, const float *restrict sin,
        const uint8_t *restrict allowed, float *restrict latents, float *restrict keys, tile_work_t *tiles,
        float *restrict scores) {
    const int64_t R = H / Hkv, width = Hkv * D;
    float scale[MAX_DIM], zero[MAX_DIM], rotated[MAX_DIM];
    int64_t group_end = start;  /* the first token past the group whose scale and zero are loaded */
    for (int64_t first = start; first < end;) {
#ifdef MATRIX_TILES
        if (tiles) {
            const int64_t group = first / k->group, group_last = (group + 1) * k->group;
            int64_t last = first + TILE_TOKENS < group_last ? first + TILE_TOKENS : group_last;
            last = last < end ? last : end;
            int coded = 1, any = 0;
            for (int64_t n = first; n < last; n++) {
                coded &= !(k->recent && k->recent[n]);
                any |= allowed[n];
            }
            if (coded) {
                if (any) {
                    if (tiles->sequence != b || tiles->group != group) {
                        load_params(k, b * k->param_stride + group * C, C, tiles->scale, tiles->zero);
                        pack_scaled(mk, C, width, tiles);
                        tiles->sequence = b, tiles->group = group;
                    }
                    for (int64_t n = first; n < last; n++)
                        codes_to_bf16(k->codes + b * k->code_stride + n * k->row_bytes, bits, chunks,
                                      tiles->codes + (n - first) * C);
                    rebuild_on_tiles(tiles, C, width, (last - first + 31) / 32 * 32);
                }
                for (int64_t n = first; n < last; n++) {
                    if (!allowed[n]) {
                        for (int64_t h = 0; h < H; h++) scores[h * N + n] = -INFINITY;
                        continue;
                    }
                    for (int64_t kh = 0; kh < Hkv; kh++)
                        score_key(tiles->keys + (n - first) * width + kh * D, cos + n * D, sin + n * D,
                                  q + kh * R * D, R, D, rotated, scores + kh * R * N + n, N);
                }
                first = last;
                continue;
            }
        }
#endif
        const int64_t last = first + REBUILD_ROWS < end ? first + REBUILD_ROWS : end;
        const float *rows[REBUILD_ROWS];
        int64_t tokens[REBUILD_ROWS], count = 0;
        for (int64_t n = first; n < last; n++) {
            if (!allowed[n]) {
                for (int64_t h = 0; h < H; h++) scores[h * N + n] = -INFINITY;
                continue;
            }
            const float *row = exact_row(k, b, n, C);
            if (!row) {
                if (n >= group_end) {
                    const int64_t group = n / k->group;
                    load_params(k, b * k->param_stride + group * C, C, scale, zero);
                    group_end = (group + 1) * k->group;
                }
                v8 codes[MAX_CHUNKS];
                unpack_row(k->codes + b * k->code_stride + n * k->row_bytes, bits, chunks, codes);
                float *dequantized = latents + count * C;
                for (int64_t c = 0; c < chunks; c++)
                    store8(dequantized + c * LANES, codes[c] * load8(scale + c * LANES) + load8(zero + c * LANES));
                row = dequantized;
            }
            rows[count] = row;
            tokens[count++] = n;
        }
        first = last;
        if (!count) continue;
        for (int64_t t = count; t < REBUILD_ROWS; t++) rows[t] = rows[0];  /* padding, rebuilt and unused */
        rebuild_keys(rows, mk, C, width, keys);
        for (int64_t t = 0; t < count; t++) {
            const int64_t n = tokens[t];
            for (int64_t kh = 0; kh < Hkv; kh++)
                score_key(keys + t * width + kh * D, cos + n * D, sin + n * D, q + kh * R * D, R, D, rotated,
                          scores + kh * R * N + n, N);
        }
    }
}

/* out[b][h] = mixed[b][h] [C] times the columns of h's KV head in mv [C][Hkv * D]: the absorbed values' projection
 * (a bias, where the model has one, is the caller's). */
static void project_values(const float *restrict mixed, const float *restrict mv, int64_t B, int64_t H, int64_t Hkv,
                           int64_t D, int64_t C, float *restrict out) {
    const int64_t R = H / Hkv, width = Hkv * D;
    for (int64_t bh = 0; bh < B * H; bh++) {
        const float *row = mixed + bh * C, *columns = mv + (bh % H) / R * D;
        float *y = out + bh * D;
        for (int64_t d = 0; d < D; d += LANES) {
            v8 acc = {};
            for (int64_t c = 0; c < C; c++) acc += row[c] * load8(columns + c * width + d);
            store8(y + d, acc);
        }
    }
}

int latent_decode_attention(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t C, int64_t N, const float *query,
                            float q_scale, const stream_t *keys, const float *mk, const float *cos, const float *sin,
                            const stream_t *values, const float *mv, const uint8_t *allowed, float *out, int threads,
                            int tiles) {
    const stream_t k = *keys, v = *values;
    if (C > MAX_DIM || C % LANES || D > MAX_DIM || D % (2 * LANES) || H % Hkv || (Hkv * D) % REBUILD_PANEL
        || N < 1 || v.group % LANES || v.groups > MAX_CHUNKS)
        return 1;
    if (k.bits != 1 && k.bits != 2 && k.bits != 4 && k.bits != 8) return 1;
    if (v.bits != 1 && v.bits != 2 && v.bits != 4 && v.bits != 8) return 1;
    const int64_t block = block_size(N, B, threads), blocks = (N + block - 1) / block;
    const int64_t items = B * blocks, size = B * H * C, chunks = C / LANES;
    /* per thread: q times the softmax scale, the latents and keys of one tile, sums of p v */
    const int64_t acc_offset = H * D + REBUILD_ROWS * C + REBUILD_ROWS * Hkv * D, work_size = acc_offset + size;
    float *scores = malloc(sizeof(float) * B * H * N), *mixed = malloc(sizeof(float) * size);
    float *work = calloc((size_t)threads * work_size, sizeof(float));
    if (!scores || !mixed || !work) { free(scores); free(mixed); free(work); return 2; }

#pragma omp parallel num_threads(threads)
    {
        float *q = work + (int64_t)thread_index() * work_size, *latents = q + H * D;
        float *keys = latents + REBUILD_ROWS * C, *acc = keys + REBUILD_ROWS * Hkv * D;
        int64_t b_loaded = -1;
        tile_work_t *tile = NULL;
#ifdef MATRIX_TILES
        /* the tiles want whole tiles of channels and columns; groups shorter than a tile would repack Ms too often */
        if (tiles && C % 32 == 0 && (Hkv * D) % 32 == 0 && k.group >= TILE_GROUP && (tile = tile_work(C, Hkv * D)))
            configure_tiles();
#endif
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            const int64_t b = item / blocks, start = (item % blocks) * block;
            const int64_t end = start + block < N ? start + block : N;
            if (b != b_loaded) {
                for (int64_t i = 0; i < H * D; i++) q[i] = query[b * H * D + i] * q_scale;
                b_loaded = b;
            }
#define SCORES(bits) latent_scores(&k, bits, chunks, b, start, end, H, Hkv, D, C, N, q, mk, cos, sin, allowed, \
                                   latents, keys, tile, scores + b * H * N)
            switch (k.bits) {
            case 1: SCORES(1); break;
            case 2: SCORES(2); break;
            case 4: SCORES(4); break;
            default: SCORES(8);
            }
#undef SCORES
        }
        softmax_rows(scores, B * H, N, allowed);
        value_tile_t *values_tile = NULL;
#ifdef MATRIX_TILES
        /* column tiles within one group of channels, and every head in one tile's rows */
        if (tiles && C % 32 == 0 && v.group % 16 == 0 && H <= 16 && (values_tile = value_tile_work(C, v.groups)) && !tile)
            configure_tiles();
#endif
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            const int64_t b = item / blocks, start = (item % blocks) * block;
            const int64_t end = start + block < N ? start + block : N;
#ifdef MATRIX_TILES
            if (values_tile) {
                values_on_tiles(&v, b, start, end, H, N, C, scores + b * H * N, allowed, values_tile, acc + b * H * C);
                continue;
            }
#endif
#define VALUES(bits) value_sums(&v, bits, chunks, b, start, end, H, N, C, scores + b * H * N, allowed, acc + b * H * C)
            switch (v.bits) {
            case 1: VALUES(1); break;
            case 2: VALUES(2); break;
            case 4: VALUES(4); break;
            default: VALUES(8);
            }
#undef VALUES
        }
#ifdef MATRIX_TILES
        if (tile || values_tile) _tile_release();
        free_tile_work(tile);
        free_value_tile_work(values_tile);
#endif
    }
    sum_partials(work + acc_offset, work_size, threads, size, mixed);
    project_values(mixed, mv, B, H, Hkv, D, C, out);
    free(scores);
    free(mixed);
    free(work);
    return 0;
}
