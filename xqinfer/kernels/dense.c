/* The dense part of a one-token decode step on a CPU: a Llama block around its attention, in two calls.
 *
 *   dense_attention_input: x = RMSNorm(h); q|k|v = x Wqkv^T; q rotated (RoPE)      -> x, q, k, v
 *   (the layer's cache attends: the caller's business)
 *   dense_block_output:    h1 = h + attn Wo^T; h2 = h1 + Wdown (silu(g) * u) where g|u = RMSNorm(h1) Wgu^T
 *
 * A decode step multiplies a few rows (R, one per sequence) by every weight matrix once, so it is a stream over the
 * weights: each thread reads a contiguous block of output rows W[o] (the checkpoint's [out, in] layout), four at a
 * time so that one load of x serves four independent accumulators. Doing a block's dozens of small torch ops (about
 * 10 us each of dispatch, 30 layers deep) in two calls is most of what makes a CPU step fast at short depth.
 *
 * dtype 0: every tensor float32; dtype 1: bfloat16, accumulated in float32 and rounded wherever torch's ops round,
 * so that results match the torch modules (arch/llama.py), which are the reference.
 * Shapes (all dense): h, x [R, d]; q [R, H, D]; k, v [R, Hkv, D]; cos, sin [D] (the one position of the step);
 * Wqkv [(H + 2 Hkv) D, d]; Wo [d, H D]; Wgu [2 F, d] (gate rows, then up rows); Wdown [d, F].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1 };
#define MAX_ROWS 16

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion (NaN stays NaN). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* v as the dtype holds it: the rounding of a torch op that writes a tensor of that dtype. */
static inline float fit(int dtype, float v) { return dtype == BF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

static inline float load(int dtype, const void *p, int64_t i) {
    return dtype == F32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

static inline void store(int dtype, void *p, int64_t i, float v) {
    if (dtype == F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = f32_to_bf16(v);
}

/* acc[r] = x . W[r] for the rows of one block (four, or fewer at the end); both weight types. */
#define DOT_BLOCK(NAME, WEIGHT, LOAD)                                                                             \
    static void NAME(const float *x, const WEIGHT *w, int64_t in, int64_t rows, float *acc) {                    \
        if (rows == 4) {                                                                                         \
            const WEIGHT *w0 = w, *w1 = w + in, *w2 = w + 2 * in, *w3 = w + 3 * in;                             \
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;                                                        \
            for (int64_t i = 0; i < in; i++) {                                                                   \
                const float xi = x[i];                                                                           \
                a0 += xi * LOAD(w0[i]);                                                                          \
                a1 += xi * LOAD(w1[i]);                                                                          \
                a2 += xi * LOAD(w2[i]);                                                                          \
                a3 += xi * LOAD(w3[i]);                                                                          \
            }                                                                                                    \
            acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;                                                  \
            return;                                                                                              \
        }                                                                                                        \
        for (int64_t r = 0; r < rows; r++) {                                                                     \
            const WEIGHT *wr = w + r * in;                                                                       \
            float a = 0.f;                                                                                       \
            for (int64_t i = 0; i < in; i++) a += x[i] * LOAD(wr[i]);                                            \
            acc[r] = a;                                                                                          \
        }                                                                                                        \
    }
#define AS_IS(v) (v)
DOT_BLOCK(dot_block_f32, float, AS_IS)
DOT_BLOCK(dot_block_bf16, uint16_t, bf16_to_f32)

/* acc[0..rows) = x . W[o + j], rows <= 4 */
static inline void dot_block(int dtype, const float *x, const void *w, int64_t o, int64_t in, int64_t rows,
                             float *acc) {
    if (dtype == F32) dot_block_f32(x, (const float *)w + o * in, in, rows, acc);
    else dot_block_bf16(x, (const uint16_t *)w + o * in, in, rows, acc);
}

/* y = fit(x W^T) [R, out], shared among the threads of the enclosing parallel region (ends with a barrier). */
static void linear_phase(int dtype, int64_t R, int64_t in, int64_t out, const float *x, const void *w, float *y) {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < (out + 3) / 4; b++) {
        const int64_t o = 4 * b, rows = out - o < 4 ? out - o : 4;
        float acc[4];
        for (int64_t r = 0; r < R; r++) {  /* later rows find the block in cache */
            dot_block(dtype, x + r * in, w, o, in, rows, acc);
            for (int64_t j = 0; j < rows; j++) y[r * out + o + j] = fit(dtype, acc[j]);
        }
    }
}

/* y = silu(x Wg^T) * (x Wu^T) [R, F] for W = [Wg; Wu], as linear_phase. */
static void swiglu_phase(int dtype, int64_t R, int64_t in, int64_t F, const float *x, const void *w, float *y) {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < (F + 3) / 4; b++) {
        const int64_t o = 4 * b, rows = F - o < 4 ? F - o : 4;
        float gate[4], up[4];
        for (int64_t r = 0; r < R; r++) {
            dot_block(dtype, x + r * in, w, o, in, rows, gate);
            dot_block(dtype, x + r * in, w, F + o, in, rows, up);
            for (int64_t j = 0; j < rows; j++) {
                const float g = fit(dtype, gate[j]);
                y[r * F + o + j] = fit(dtype, fit(dtype, g / (1.f + expf(-g))) * fit(dtype, up[j]));
            }
        }
    }
}

/* y = weight * fit(x / rms(x)), one row (torch's RMSNorm: normalized in float32, cast, then the gain). */
static void rms_norm_row(int dtype, const float *x, const void *weight, float eps, int64_t dim, float *y) {
    float sum = 0.f;
    for (int64_t i = 0; i < dim; i++) sum += x[i] * x[i];
    const float inv = 1.f / sqrtf(sum / (float)dim + eps);
    for (int64_t i = 0; i < dim; i++) y[i] = fit(dtype, load(dtype, weight, i) * fit(dtype, x[i] * inv));
}

/* Every product and sum rounded on its own, never fused into one multiply-add: bit for bit what torch's separate
 * ops give, which a quantized cache needs (a key one ulp off can flip a code). */
#ifdef __clang__
#define UNFUSED
#define UNFUSED_BODY _Pragma("clang fp contract(off)")
#else
#define UNFUSED __attribute__((optimize("fp-contract=off")))
#define UNFUSED_BODY
#endif

/* out[at + i] = RoPE of x [D] (rotate-half: x cos + (-x2, x1) sin), rounded as rope.apply_rotary's ops round;
 * kv_attention.c rotates the keys it stores with it too. */
UNFUSED void rotate_half(int dtype, const float *x, const void *cos, const void *sin, int64_t D, void *out,
                         int64_t at) {
    UNFUSED_BODY
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        const float c1 = load(dtype, cos, i), c2 = load(dtype, cos, half + i);
        const float s1 = load(dtype, sin, i), s2 = load(dtype, sin, half + i);
        store(dtype, out, at + i, fit(dtype, x[i] * c1) - fit(dtype, x[half + i] * s1));
        store(dtype, out, at + half + i, fit(dtype, x[half + i] * c2) + fit(dtype, x[i] * s2));
    }
}

/* out = RoPE(x) for rows x [N, D] at one position (cos, sin [D]): a decode step's keys, for caches that store them
 * rotated. */
int dense_rotate(int dtype, int64_t N, int64_t D, const void *x, const void *cos, const void *sin, void *out) {
    if (D % 2 || (dtype != F32 && dtype != BF16)) return 1;
    float *row = malloc(sizeof(float) * D);
    if (!row) return 2;
    for (int64_t n = 0; n < N; n++) {
        for (int64_t i = 0; i < D; i++) row[i] = load(dtype, x, n * D + i);
        rotate_half(dtype, row, cos, sin, D, out, n * D);
    }
    free(row);
    return 0;
}

/* y = x . W^T: [R, in] x [out, in] -> [R, out] (the output matrix of a step, or any product of a few rows) */
int dense_linear(int dtype, int64_t R, int64_t in, int64_t out, const void *x, const void *w, void *y,
                 int threads) {
    if (R < 1 || R > MAX_ROWS || (dtype != F32 && dtype != BF16)) return 1;
    float *x32 = malloc(sizeof(float) * R * in), *y32 = malloc(sizeof(float) * R * out);
    if (!x32 || !y32) { free(x32); free(y32); return 2; }
    for (int64_t i = 0; i < R * in; i++) x32[i] = load(dtype, x, i);
#pragma omp parallel num_threads(threads)
    linear_phase(dtype, R, in, out, x32, w, y32);
    for (int64_t i = 0; i < R * out; i++) store(dtype, y, i, y32[i]);
    free(x32), free(y32);
    return 0;
}

int dense_attention_input(int dtype, int64_t R, int64_t d, int64_t H, int64_t Hkv, int64_t D, const void *h,
                          const void *norm_weight, float eps, const void *wqkv, const void *cos, const void *sin,
                          void *x_out, void *q_out, void *k_out, void *v_out, int threads) {
    if (R < 1 || R > MAX_ROWS || D % 2 || (dtype != F32 && dtype != BF16)) return 1;
    const int64_t qd = H * D, kvd = Hkv * D, n = qd + 2 * kvd;
    float *x = malloc(sizeof(float) * R * d), *qkv = malloc(sizeof(float) * R * n);
    if (!x || !qkv) { free(x); free(qkv); return 2; }
    for (int64_t i = 0; i < R * d; i++) x[i] = load(dtype, h, i);
    for (int64_t r = 0; r < R; r++) rms_norm_row(dtype, x + r * d, norm_weight, eps, d, x + r * d);
    for (int64_t i = 0; i < R * d; i++) store(dtype, x_out, i, x[i]);
#pragma omp parallel num_threads(threads)
    linear_phase(dtype, R, d, n, x, wqkv, qkv);
    for (int64_t r = 0; r < R; r++) {
        const float *row = qkv + r * n;
        for (int64_t head = 0; head < H; head++)
            rotate_half(dtype, row + head * D, cos, sin, D, q_out, (r * H + head) * D);
        for (int64_t i = 0; i < kvd; i++) {
            store(dtype, k_out, r * kvd + i, row[qd + i]);
            store(dtype, v_out, r * kvd + i, row[qd + kvd + i]);
        }
    }
    free(x), free(qkv);
    return 0;
}

int dense_block_output(int dtype, int64_t R, int64_t d, int64_t qd, int64_t F, const void *h, const void *attn,
                       const void *wo, const void *norm_weight, float eps, const void *wgu, const void *wdown,
                       void *out, int threads) {
    if (R < 1 || R > MAX_ROWS || (dtype != F32 && dtype != BF16)) return 1;
    float *a = malloc(sizeof(float) * R * qd), *h1 = malloc(sizeof(float) * R * d);
    float *x = malloc(sizeof(float) * R * d), *act = malloc(sizeof(float) * R * F), *y = malloc(sizeof(float) * R * d);
    if (!a || !h1 || !x || !act || !y) { free(a); free(h1); free(x); free(act); free(y); return 2; }
    for (int64_t i = 0; i < R * qd; i++) a[i] = load(dtype, attn, i);
    /* One team for the three products; the residual and the norm between them are one thread's (d floats). */
#pragma omp parallel num_threads(threads)
    {
        linear_phase(dtype, R, qd, d, a, wo, h1);
#pragma omp single
        for (int64_t r = 0; r < R; r++) {
            for (int64_t i = 0; i < d; i++) h1[r * d + i] = fit(dtype, load(dtype, h, r * d + i) + h1[r * d + i]);
            rms_norm_row(dtype, h1 + r * d, norm_weight, eps, d, x + r * d);
        }
        swiglu_phase(dtype, R, d, F, x, wgu, act);
        linear_phase(dtype, R, F, d, act, wdown, y);
    }
    for (int64_t i = 0; i < R * d; i++) store(dtype, out, i, h1[i] + y[i]);
    free(a), free(h1), free(x), free(act), free(y);
    return 0;
}
