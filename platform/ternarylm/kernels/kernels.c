#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { TERNARY = 0, INT8 = 1 };

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static int32_t ternary_dot_avx512(const uint8_t *w, const int8_t *a, int k) {
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i acc = _mm512_setzero_si512();
    for (int i = 0; i < k; i += 256, w += 64, a += 256) {
        __m512i p = _mm512_loadu_si512(w);
        for (int s = 0; s < 4; s++, p = _mm512_srli_epi16(p, 2))
            acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(p, mask),
                                      _mm512_loadu_si512(a + 64 * s));
    }
    return _mm512_reduce_add_epi32(acc);
}

/* Four rows (row_bytes apart) against one token: independent accumulators keep the core busy
   while each waits on its dot products, and the token's bytes are loaded once for all four. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void ternary_dot4_avx512(const uint8_t *w, size_t row_bytes, const int8_t *a, int k,
                                int32_t *out) {
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                      _mm512_setzero_si512()};
    for (int i = 0; i < k; i += 256, w += 64, a += 256) {
        __m512i p[4];
        for (int r = 0; r < 4; r++) p[r] = _mm512_loadu_si512(w + r * row_bytes);
        for (int s = 0; s < 4; s++) {
            __m512i x = _mm512_loadu_si512(a + 64 * s);
            for (int r = 0; r < 4; r++) {
                acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_and_si512(p[r], mask), x);
                p[r] = _mm512_srli_epi16(p[r], 2);
            }
        }
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_epi32(acc[r]);
}

/* u8 x s8 pairs summed to s16 cannot saturate here: |d a + d a| <= 2 * 2 * 128. */
__attribute__((target("avx2")))
static int32_t ternary_dot_avx2(const uint8_t *w, const int8_t *a, int k) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    for (int i = 0; i < k; i += 256, w += 64, a += 256) {
        for (int h = 0; h < 64; h += 32) {
            __m256i p = _mm256_loadu_si256((const __m256i *)(w + h));
            for (int s = 0; s < 4; s++, p = _mm256_srli_epi16(p, 2)) {
                __m256i x = _mm256_loadu_si256((const __m256i *)(a + h + 64 * s));
                __m256i pairs = _mm256_maddubs_epi16(_mm256_and_si256(p, mask), x);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
            }
        }
    }
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4e));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xb1));
    return _mm_cvtsi128_si32(r);
}

/* sum_k w_k (a_k + 128): flipping the sign bit of a turns it into the unsigned a + 128. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static int32_t int8_dot_avx512(const uint8_t *w, const int8_t *a, int k) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc = _mm512_setzero_si512();
    for (int i = 0; i < k; i += 64)
        acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(_mm512_loadu_si512(a + i), flip),
                                  _mm512_loadu_si512(w + i));
    return _mm512_reduce_add_epi32(acc);
}

/* 2: AVX-512 VNNI, 1: AVX2, 0: neither. */
int cpu_level(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) return 2;
    return __builtin_cpu_supports("avx2") ? 1 : 0;
}

/* torch's quantize_activations, operation for operation:
   scale = max(max_k |x_k|, 1e-5) / qmax; a_k = clamp(round_half_even(x_k / scale), -qmax-1, qmax).
   Pads a to kp with zeros; returns the scale and sets *sum = sum_k a_k. */
static float quantize_row(const float *x, int k, int kp, int qmax, int8_t *a, int32_t *sum) {
    float amax = 0.0f;
    for (int i = 0; i < k; i++) amax = fmaxf(amax, fabsf(x[i]));
    float scale = fmaxf(amax, 1e-5f) / (float)qmax;
    int32_t s = 0;
    for (int i = 0; i < k; i++) {
        a[i] = (int8_t)fminf(fmaxf(nearbyintf(x[i] / scale), (float)(-qmax - 1)), (float)qmax);
        s += a[i];
    }
    for (int i = k; i < kp; i++) a[i] = 0;
    *sum = s;
    return scale;
}

/* y [m, n] = (x [m, k] quantized) . (weight row n) * a_scale * w_scale[n]; rows of kp weights.
   w_sum: per-row code sums (int8 format only). Returns 1 when out of memory. */
int quantized_linear(const float *x, int m, int k, const uint8_t *w, const int32_t *w_sum,
                     const float *w_scale, int n, int kp, int format, int qmax, float *y,
                     int threads, int level) {
    int8_t *a = malloc((size_t)m * kp);
    float *a_scale = malloc(sizeof(float) * m);
    int32_t *a_sum = malloc(sizeof(int32_t) * m);
    if (!a || !a_scale || !a_sum) { free(a); free(a_scale); free(a_sum); return 1; }
    for (int i = 0; i < m; i++)
        a_scale[i] = quantize_row(x + (size_t)i * k, k, kp, qmax, a + (size_t)i * kp, &a_sum[i]);
    int32_t (*dot)(const uint8_t *, const int8_t *, int) =
        format == INT8 ? int8_dot_avx512 : level == 2 ? ternary_dot_avx512 : ternary_dot_avx2;
    size_t row_bytes = format == INT8 ? (size_t)kp : (size_t)kp / 4;
    /* A second thread pays off only on enough work to amortise waking it. */
    int parallel = (long)n * kp * m >= 1L << 20;
    /* One token on 2-bit rows (decoding): rows four at a time, the rest one by one below.
       (Four int8 rows at a time measured twice as slow as one: those rows stream from memory.) */
    int quads = m == 1 && format == TERNARY && level == 2 ? n / 4 : 0;
    #pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
    for (int g = 0; g < quads; g++) {
        int32_t d[4];
        ternary_dot4_avx512(w + (size_t)4 * g * row_bytes, row_bytes, a, kp, d);
        for (int r = 0; r < 4; r++)
            y[4 * g + r] = (float)(d[r] - a_sum[0]) * (a_scale[0] * w_scale[4 * g + r]);
    }
    #pragma omp parallel for num_threads(threads) schedule(static) if (parallel && !quads)
    for (int j = 4 * quads; j < n; j++) {
        for (int i = 0; i < m; i++) {
            int32_t d = dot(w + j * row_bytes, a + (size_t)i * kp, kp);
            d -= format == INT8 ? 128 * w_sum[j] : a_sum[i];
            y[(size_t)i * n + j] = (float)d * (a_scale[i] * w_scale[j]);
        }
    }
    free(a); free(a_scale); free(a_sum);
    return 0;
}

/* Training's fake quantization, torch's float operations exactly (quantizers.py):
   out = clamp(round_half_even(x / d), lo, hi) * s. NaN propagates as in torch (max/min return
   their second operand when either is NaN). One pass where torch makes five, single-threaded:
   a second OpenMP pool beside torch's would spin on the cores torch's threads are using. */
__attribute__((target("avx2")))
static void fake_quantize_span(const float *x, float *out, long n, float d, float s, float lo,
                               float hi) {
    const __m256 vd = _mm256_set1_ps(d), vs = _mm256_set1_ps(s);
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), vd),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_min_ps(vhi, _mm256_max_ps(vlo, q));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(q, vs));
    }
    for (; i < n; i++) {
        float q = nearbyintf(x[i] / d);
        out[i] = (q < lo ? lo : q > hi ? hi : q) * s;
    }
}

/* mean |x|, summed in double (eight lanes): the absmean scale of training and packing alike. */
__attribute__((target("avx2")))
float abs_mean(const float *x, long n) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask);
        lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    double lanes[4], sum = 0.0;
    _mm256_storeu_pd(lanes, _mm256_add_pd(lo, hi));
    for (int j = 0; j < 4; j++) sum += lanes[j];
    for (; i < n; i++) sum += fabsf(x[i]);
    return (float)(sum / (double)n);
}

/* An absmean ternary weight, dequantized: gamma = abs_mean(x) (returned),
   out = clamp(round(x / (gamma + eps)), -1, 1) * gamma, as AbsMean.dequantized in torch. */
__attribute__((target("avx2")))
float fake_quantize_absmean(const float *x, long n, float eps, float *out) {
    float gamma = abs_mean(x, n);
    fake_quantize_span(x, out, n, gamma + eps, gamma, -1.0f, 1.0f);
    return gamma;
}

/* Activations, per token (row of k): scale = max(max_k |x_k|, 1e-5) / qmax, codes in
   [-qmax - 1, qmax], as quantizers.activation_codes. A NaN in a row makes its scale NaN. */
__attribute__((target("avx2")))
void fake_quantize_rows(const float *x, long m, long k, int qmax, float *out) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (long r = 0; r < m; r++, x += k, out += k) {
        __m256 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
        long i = 0;
        for (; i + 8 <= k; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));
            vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float lanes[8], amax = 0.0f;
        int nan = _mm256_movemask_ps(vnan) != 0;
        _mm256_storeu_ps(lanes, vmax);
        for (int j = 0; j < 8; j++) amax = lanes[j] > amax ? lanes[j] : amax;
        for (; i < k; i++) {
            nan |= x[i] != x[i];
            amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        }
        float scale = nan ? NAN : fmaxf(amax, 1e-5f) / (float)qmax;
        fake_quantize_span(x, out, k, scale, scale, (float)(-qmax - 1), (float)qmax);
    }
}

/* One decoded token through one block (batch 1, KV cache), as inference.PackedBlock computes it
   with torch, in one call: at this size torch's per-operation cost, not the weights, is most of
   a block's time. Floating-point operations follow torch's order (no FMA contraction: the
   library is built with -ffp-contract=off); sums may round differently (~1e-7). */
typedef struct {
    const uint8_t *w; const int32_t *w_sum; const float *w_scale;
    int n, k, kp, format, qmax;
} linear_t;

typedef struct {
    linear_t qkv, o, gate_up, down;
    const float *attn_norm, *mlp_norm, *attn_sub_norm, *mlp_sub_norm;  /* sub norms: bitnet */
    float eps, sub_eps;
    int width, heads, hidden, relu2;  /* relu2: ReLU^2 gate (bitnet), else SiLU */
} block_t;

static void rms_norm(const float *x, const float *w, float eps, int n, float *y) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    float r = 1.0f / sqrtf(sum / (float)n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

static int apply(const linear_t *l, const float *x, float *y, int threads, int level) {
    return quantized_linear(x, 1, l->k, l->w, l->w_sum, l->w_scale, l->n, l->kp, l->format,
                            l->qmax, y, threads, level);
}

/* Half rotation (model.apply_rope) of each head's D values at one position. */
static void rope(float *x, int heads, int d, const float *cos, const float *sin) {
    for (int h = 0; h < heads; h++, x += d)
        for (int i = 0; i < d / 2; i++) {
            float x1 = x[i], x2 = x[i + d / 2];
            x[i] = x1 * cos[i] - x2 * sin[i];
            x[i + d / 2] = x1 * sin[i] + x2 * cos[i];
        }
}

/* x [width] in place. keys, values: this block's cache [heads, seq_len, D]; pos: this token's
   position. scratch: 5 width + 3 hidden + seq_len floats. Returns 1 when out of memory. */
int decode_block(const block_t *b, float *x, float *keys, float *values, int seq_len, int pos,
                 const float *cos, const float *sin, float *scratch, int threads, int level) {
    int c = b->width, d = c / b->heads, hd = b->hidden;
    float *h = scratch, *qkv = h + c, *y = qkv + 3 * c, *gu = y + c, *act = gu + 2 * hd,
          *p = act + hd;
    rms_norm(x, b->attn_norm, b->eps, c, h);
    if (apply(&b->qkv, h, qkv, threads, level)) return 1;
    rope(qkv, b->heads, d, cos, sin);
    rope(qkv + c, b->heads, d, cos, sin);
    float scale = 1.0f / sqrtf((float)d);
    for (int head = 0; head < b->heads; head++) {
        float *k = keys + (size_t)head * seq_len * d, *v = values + (size_t)head * seq_len * d;
        const float *q = qkv + head * d;
        for (int i = 0; i < d; i++) {
            k[(size_t)pos * d + i] = qkv[c + head * d + i];
            v[(size_t)pos * d + i] = qkv[2 * c + head * d + i];
        }
        float top = -INFINITY, total = 0.0f;
        for (int j = 0; j <= pos; j++) {
            float dot = 0.0f;
            for (int i = 0; i < d; i++) dot += q[i] * scale * k[(size_t)j * d + i];
            p[j] = dot;
            top = fmaxf(top, dot);
        }
        for (int j = 0; j <= pos; j++) total += (p[j] = expf(p[j] - top));
        float *out = y + head * d;
        for (int i = 0; i < d; i++) out[i] = 0.0f;
        for (int j = 0; j <= pos; j++) {
            float weight = p[j] / total;
            for (int i = 0; i < d; i++) out[i] += weight * v[(size_t)j * d + i];
        }
    }
    if (b->attn_sub_norm) {
        rms_norm(y, b->attn_sub_norm, b->sub_eps, c, h);
        memcpy(y, h, sizeof(float) * c);
    }
    if (apply(&b->o, y, h, threads, level)) return 1;
    for (int i = 0; i < c; i++) x[i] += h[i];
    rms_norm(x, b->mlp_norm, b->eps, c, h);
    if (apply(&b->gate_up, h, gu, threads, level)) return 1;
    for (int i = 0; i < hd; i++) {
        float g = gu[i], a = b->relu2 ? fmaxf(g, 0.0f) * fmaxf(g, 0.0f) : g / (1.0f + expf(-g));
        act[i] = a * gu[hd + i];
    }
    if (b->mlp_sub_norm) {
        rms_norm(act, b->mlp_sub_norm, b->sub_eps, hd, gu);
        memcpy(act, gu, sizeof(float) * hd);
    }
    if (apply(&b->down, act, h, threads, level)) return 1;
    for (int i = 0; i < c; i++) x[i] += h[i];
    return 0;
}
