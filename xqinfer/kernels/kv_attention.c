/* One decode step of attention straight from a KIVI-layout cache (per-channel keys, per-token values), on a CPU.
 *
 * Never writes the dequantized history: each cached row is unpacked and dequantized into a buffer of head_dim
 * floats that stays in L1, used, and dropped. Rows read in full precision (the residual window) come from the
 * stream's ring instead; slots the mask excludes are skipped, so the empty part of a span bucket costs nothing.
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

#define BLOCK 256
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

/* s[0..count), z[0..count) = the calibrated parameters from element `at` of a stream's scale and zero */
static inline void load_params(const stream_t *t, int64_t at, int64_t count, float *s, float *z) {
    for (int64_t i = 0; i < count; i++) {
        const float raw_s = t->half ? f16_to_f32(((const uint16_t *)t->scale)[at + i]) : ((const float *)t->scale)[at + i];
        const float raw_z = t->half ? f16_to_f32(((const uint16_t *)t->zero)[at + i]) : ((const float *)t->zero)[at + i];
        s[i] = t->cal_scale * raw_s;
        z[i] = raw_z + t->cal_shift * raw_s;
    }
}

/* lut[b * per + i]: code i of byte b, as a float (bits 1, 2, 4) */
static float LUT1[256 * 8], LUT2[256 * 4], LUT4[256 * 2];

__attribute__((constructor)) static void make_luts(void) {
    for (int b = 0; b < 256; b++) {
        for (int i = 0; i < 8; i++) LUT1[b * 8 + i] = (float)((b >> i) & 1);
        for (int i = 0; i < 4; i++) LUT2[b * 4 + i] = (float)((b >> (2 * i)) & 3);
        for (int i = 0; i < 2; i++) LUT4[b * 2 + i] = (float)((b >> (4 * i)) & 15);
    }
}

/* dst[0..D) (+ padding up to the last byte's codes) = the codes of one packed row, as floats (constant-size
 * copies from the tables, which the compiler turns into vector moves) */
static inline void unpack_row(const uint8_t *restrict src, int bits, int64_t row_bytes, float *restrict dst) {
    switch (bits) {
    case 8: for (int64_t j = 0; j < row_bytes; j++) dst[j] = (float)src[j]; break;
    case 4: for (int64_t j = 0; j < row_bytes; j++) memcpy(dst + 2 * j, LUT4 + 2 * (int64_t)src[j], 2 * sizeof(float)); break;
    case 2: for (int64_t j = 0; j < row_bytes; j++) memcpy(dst + 4 * j, LUT2 + 4 * (int64_t)src[j], 4 * sizeof(float)); break;
    default: for (int64_t j = 0; j < row_bytes; j++) memcpy(dst + 8 * j, LUT1 + 8 * (int64_t)src[j], 8 * sizeof(float));
    }
}

/* codes[i * row_bytes + j] = code i of byte j: a packed row unpacked in the order its bit fields sit in */
static inline void unpack_permuted(const uint8_t *restrict packed, int64_t row_bytes, int bits,
                                   float *restrict codes) {
    const int per = 8 / bits, mask = (1 << bits) - 1;
    for (int i = 0; i < per; i++)
        for (int64_t j = 0; j < row_bytes; j++) codes[i * row_bytes + j] = (float)((packed[j] >> (i * bits)) & mask);
}

/* Row n of head bh where it is held in float32: a plain stream's row, or the ring's copy of a recent token; NULL
 * where it must be read from its codes. */
static inline const float *exact_row(const stream_t *t, int64_t bh, int64_t n, int64_t D) {
    if (t->bits == 32) return (const float *)(t->codes + bh * t->code_stride + n * t->row_bytes);
    if (t->recent && t->recent[n]) return t->ring + bh * t->ring_stride + t->rows[n] * D;
    return NULL;
}

/* The value row of token n of head bh, dequantized into dst[0..D) unless it is held exactly. */
static inline const float *value_row(const stream_t *v, int64_t bh, int64_t n, int64_t D, float *dst) {
    const float *exact = exact_row(v, bh, n, D);
    if (exact) return exact;
    unpack_row(v->codes + bh * v->code_stride + n * v->row_bytes, v->bits, v->row_bytes, dst);
    float s[MAX_DIM], z[MAX_DIM];
    load_params(v, bh * v->param_stride + n * v->groups, v->groups, s, z);
    float *restrict row = dst;
    for (int64_t g = 0; g < v->groups; g++) {
        const int64_t end = (g + 1) * v->group < D ? (g + 1) * v->group : D;
        const float scale = s[g], zero = z[g];
        for (int64_t d = g * v->group; d < end; d++) row[d] = row[d] * scale + zero;
    }
    return dst;
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

int kv_decode_attention(int64_t BH, int64_t R, int64_t N, int64_t D, const float *query, int64_t q_stride,
                        float q_scale,
                        const uint8_t *kcodes, int64_t kcode_stride, int64_t krow_bytes, int kbits, int64_t kgroup,
                        const void *kscale, const void *kzero, int64_t kparam_stride, int khalf, float kcal_scale,
                        float kcal_shift, const uint8_t *krecent,
                        const int64_t *krows, const float *kring, int64_t kring_stride, const uint8_t *vcodes,
                        int64_t vcode_stride, int64_t vrow_bytes, int vbits, int64_t vgroup, int64_t vgroups,
                        const void *vscale, const void *vzero, int64_t vparam_stride, int vhalf, float vcal_scale,
                        float vcal_shift, const uint8_t *vrecent,
                        const int64_t *vrows, const float *vring, int64_t vring_stride, const uint8_t *allowed,
                        float *out, int threads) {
    if (D > MAX_DIM || R < 1 || N < 1) return 1;
    /* the softmax scale, applied once to a dense copy of q */
    float *q = malloc(sizeof(float) * BH * R * D);
    if (!q) return 2;
    for (int64_t bh = 0; bh < BH; bh++)
        for (int64_t i = 0; i < R * D; i++) q[bh * R * D + i] = query[bh * q_stride + i] * q_scale;
    q_stride = R * D;
    const stream_t k = {kcodes, kcode_stride, krow_bytes, kbits, kgroup, 0, kscale, kzero, kparam_stride, khalf,
                        kcal_scale, kcal_shift, krecent, krows, kring, kring_stride};
    const stream_t v = {vcodes, vcode_stride, vrow_bytes, vbits, vgroup, vgroups, vscale, vzero, vparam_stride,
                        vhalf, vcal_scale, vcal_shift, vrecent, vrows, vring, vring_stride};
    const int64_t blocks = (N + BLOCK - 1) / BLOCK, items = BH * blocks;
    /* Quantized keys: the scale folds into the query once per group of tokens (qs = q * s, qz = q . z), and codes
     * are unpacked in the order their bit fields sit in (code i of every byte, then code i + 1), which vectorizes;
     * qs is laid out in that order too, so only the order of a dot product's terms changes. */
    const int per = kbits == 32 ? 1 : 8 / kbits;
    const int64_t width = krow_bytes * per, work_size = R * width + R + width;
    float *scores = malloc(sizeof(float) * BH * R * N);
    float *partial = calloc((size_t)threads * BH * R * D, sizeof(float));
    float *work = malloc(sizeof(float) * threads * work_size);
    if (!scores || !partial || !work) { free(q); free(scores); free(partial); free(work); return 2; }

#pragma omp parallel num_threads(threads)
    {
        float row[MAX_DIM + 8], scale[MAX_DIM], zero[MAX_DIM];
        float *qs = work + (int64_t)thread_index() * work_size, *qz = qs + R * width, *codes = qz + R;
        int64_t group_loaded = -1, bh_loaded = -1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            const int64_t bh = item / blocks, start = (item % blocks) * BLOCK;
            const int64_t end = start + BLOCK < N ? start + BLOCK : N;
            for (int64_t n = start; n < end; n++) {
                float *s = scores + bh * R * N + n;
                if (!allowed[n]) {
                    for (int64_t r = 0; r < R; r++) s[r * N] = -INFINITY;
                    continue;
                }
                const float *key = exact_row(&k, bh, n, D);
                if (key) {
                    for (int64_t r = 0; r < R; r++) {
                        const float *qr = q + bh * q_stride + r * D;
                        float dot = 0.f;
                        for (int64_t d = 0; d < D; d++) dot += qr[d] * key[d];
                        s[r * N] = dot;
                    }
                    continue;
                }
                const int64_t group = n / k.group;
                if (group != group_loaded || bh != bh_loaded) {
                    load_params(&k, bh * k.param_stride + group * D, D, scale, zero);
                    for (int64_t r = 0; r < R; r++) {
                        const float *qr = q + bh * q_stride + r * D;
                        float dot = 0.f;
                        for (int64_t d = 0; d < D; d++) dot += qr[d] * zero[d];
                        qz[r] = dot;
                        for (int64_t i = 0; i < per; i++)
                            for (int64_t j = 0; j < krow_bytes; j++) {
                                const int64_t c = j * per + i;
                                qs[r * width + i * krow_bytes + j] = c < D ? qr[c] * scale[c] : 0.f;
                            }
                    }
                    group_loaded = group, bh_loaded = bh;
                }
                unpack_permuted(k.codes + bh * k.code_stride + n * k.row_bytes, krow_bytes, kbits, codes);
                for (int64_t r = 0; r < R; r++) {
                    const float *restrict qr = qs + r * width, *restrict unpacked = codes;
                    float dot = qz[r];
                    for (int64_t p = 0; p < width; p++) dot += qr[p] * unpacked[p];
                    s[r * N] = dot;
                }
            }
        }
        /* softmax of each (bh, r) row, in place */
#pragma omp for schedule(static)
        for (int64_t line = 0; line < BH * R; line++) {
            float *s = scores + line * N, top = -INFINITY, total = 0.f;
            for (int64_t n = 0; n < N; n++) top = s[n] > top ? s[n] : top;
            for (int64_t n = 0; n < N; n++) { s[n] = allowed[n] ? exp_nonpositive(s[n] - top) : 0.f; total += s[n]; }
            const float inverse = 1.f / total;
            for (int64_t n = 0; n < N; n++) s[n] *= inverse;
        }
        float *acc = partial + (int64_t)thread_index() * BH * R * D;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            const int64_t bh = item / blocks, start = (item % blocks) * BLOCK;
            const int64_t end = start + BLOCK < N ? start + BLOCK : N;
            for (int64_t n = start; n < end; n++) {
                if (!allowed[n]) continue;
                const float *restrict value = value_row(&v, bh, n, D, row);
                for (int64_t r = 0; r < R; r++) {
                    const float p = scores[bh * R * N + r * N + n];
                    float *restrict o = acc + (bh * R + r) * D;
                    for (int64_t d = 0; d < D; d++) o[d] += p * value[d];
                }
            }
        }
    }
    const int64_t size = BH * R * D;
    memcpy(out, partial, sizeof(float) * size);
    for (int t = 1; t < threads; t++)
        for (int64_t i = 0; i < size; i++) out[i] += partial[(int64_t)t * size + i];
    free(q);
    free(scores);
    free(partial);
    free(work);
    return 0;
}
