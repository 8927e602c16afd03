/* CPU kernels for decoding (lm/cpu_kernels.py builds and loads this file): matrix-vector products in
   float32 and int8, one transformer block, and the whole model for one new token per sample.

   Decoding a token reads every weight once, so its speed is the rate at which the cores stream the
   weights from memory; everything else in the step is a few thousand numbers per layer. PyTorch
   spends microseconds of dispatch on each of the ~30 small operations per block, which at batch 1
   came to as much as a third of the step for a 91M-parameter model. Here a whole token (embedding,
   every block, final norm, head) is one call.

   Linear layers, y[m, n] = x[m, :] . w[n, :] (+ bias[n]):
   - float32: rows of w read once, dot products 16 floats at a time (AVX-512; 8 with AVX2).
   - int8: w quantized per output row (y = x_scale[m] * w_scale[n] * integer dot), each activation
     row quantized on the fly with one scale, as llama.cpp's Q8_0 and PyTorch's dynamic quantization
     do. vpdpbusd (AVX-512 VNNI) multiplies unsigned by signed bytes, so activations are stored offset
     by 128 (0..255) and 128 * sum(w[n, :]) (precomputed) is taken off again.
   Output rows are split between threads with OpenMP; linked against the libgomp PyTorch has loaded,
   the same worker threads serve PyTorch's operations and these. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LM_KERNEL "avx512-vnni"
#define LM_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#define LM_KERNEL "avx2"
#else
#define LM_KERNEL "portable"
#endif

const char *lm_kernel_name(void) { return LM_KERNEL; }

typedef struct {
    const float *weight;     /* float32 (out, in), or NULL for an int8 layer */
    const int8_t *quantized; /* int8 (out, padded_in) */
    const float *scale;      /* (out) */
    const int32_t *row_sum;  /* (out) */
    const float *bias;       /* (out) or NULL */
    int64_t in, out, padded_in;
} lm_linear_t;

typedef struct {
    int64_t d_model, n_head, d_head, d_ff, context;
    int32_t norm; /* 0 LayerNorm, 1 RMSNorm */
    int32_t mlp;  /* 0 GELU (tanh approximation), 1 SwiGLU, 2 ReLU squared */
    float eps;
    const float *norm1_weight, *norm1_bias, *norm2_weight, *norm2_bias; /* biases NULL for RMSNorm */
    const float *q_norm_weight, *k_norm_weight;                          /* NULL without QK-norm */
    lm_linear_t qkv, proj, gate, fc, down;                                /* gate unused unless SwiGLU */
} lm_block_t;

typedef struct {
    int64_t n_layer, d_model, vocab, context, n_head, d_head;
    int32_t norm; /* the final norm: 0 LayerNorm, 1 RMSNorm */
    float eps;
    const float *token_embedding;    /* (vocab, d_model) */
    const float *position_embedding; /* (context, d_model): learned or sinusoidal, or NULL */
    const float *rope_cos, *rope_sin; /* (context, d_head), or NULL */
    const float *norm_weight, *norm_bias;
    const lm_block_t *blocks; /* n_layer of them */
    lm_linear_t head;
} lm_model_t;

/* ---- dot products ------------------------------------------------------------------------- */

static float dot_f32(const float *a, const float *b, int64_t k) {
    int64_t i = 0;
    float total = 0.0f;
#if defined(__AVX512F__)
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    for (; i + 64 <= k; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= k; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    for (; i + 32 <= k; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    total = _mm_cvtss_f32(h);
#endif
    for (; i < k; i++) total += a[i] * b[i];
    return total;
}

/* sum_i xu[i] * w[i]: xu unsigned (activations offset by 128), w signed; k a multiple of 64. */
static int32_t dot_u8_s8(const uint8_t *xu, const int8_t *w, int64_t k) {
#if defined(LM_VNNI)
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 128 <= k; i += 128) {
        acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(xu + i), _mm512_loadu_si512(w + i));
        acc1 = _mm512_dpbusd_epi32(acc1, _mm512_loadu_si512(xu + i + 64), _mm512_loadu_si512(w + i + 64));
    }
    for (; i < k; i += 64) acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(xu + i), _mm512_loadu_si512(w + i));
    return _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1));
#elif defined(__AVX2__)
    /* maddubs adds two u8 x s8 products into an int16, which 255 * 127 * 2 would overflow: split the
       unsigned bytes into low and high nibbles (0..15 each) and weigh the high sums by 16. */
    const __m256i low_mask = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256i acc_low = _mm256_setzero_si256(), acc_high = _mm256_setzero_si256();
    for (int64_t i = 0; i < k; i += 32) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xu + i));
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + i));
        __m256i xl = _mm256_and_si256(xv, low_mask);
        __m256i xh = _mm256_and_si256(_mm256_srli_epi16(xv, 4), low_mask);
        acc_low = _mm256_add_epi32(acc_low, _mm256_madd_epi16(_mm256_maddubs_epi16(xl, wv), ones));
        acc_high = _mm256_add_epi32(acc_high, _mm256_madd_epi16(_mm256_maddubs_epi16(xh, wv), ones));
    }
    __m256i acc = _mm256_add_epi32(acc_low, _mm256_slli_epi32(acc_high, 4));
    __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4e));
    sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xb1));
    return _mm_cvtsi128_si32(sum);
#else
    int32_t acc = 0;
    for (int64_t i = 0; i < k; i++) acc += (int32_t)xu[i] * (int32_t)w[i];
    return acc;
#endif
}


/* Four rows at a time share each load of x, and the next four rows are prefetched as these are read
   (measured on a 2-core Xeon over a 12 x 768 model's matrices: 4.17 ms per token against 5.43 for
   one row at a time in int8, 19.9 against 24.1 in float32; the prefetch took int8 to 4.09). */
#if defined(LM_VNNI)
static void dot4_u8_s8(const uint8_t *xu, const int8_t *w, int64_t k, int32_t out[4]) { /* rows w, w + k, .. */
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512(), a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 64) {
        __m512i xv = _mm512_loadu_si512(xu + i);
        _mm_prefetch((const char *)(w + 4 * k + i), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + 5 * k + i), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + 6 * k + i), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + 7 * k + i), _MM_HINT_T0);
        a0 = _mm512_dpbusd_epi32(a0, xv, _mm512_loadu_si512(w + i));
        a1 = _mm512_dpbusd_epi32(a1, xv, _mm512_loadu_si512(w + k + i));
        a2 = _mm512_dpbusd_epi32(a2, xv, _mm512_loadu_si512(w + 2 * k + i));
        a3 = _mm512_dpbusd_epi32(a3, xv, _mm512_loadu_si512(w + 3 * k + i));
    }
    out[0] = _mm512_reduce_add_epi32(a0); out[1] = _mm512_reduce_add_epi32(a1);
    out[2] = _mm512_reduce_add_epi32(a2); out[3] = _mm512_reduce_add_epi32(a3);
}
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
static float sum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* Four weight rows against two activation rows: each load of w serves two rows of x, each load of x
   four rows of w (8 accumulators, 2 x vectors and a w vector: 11 of AVX2's 16 registers). */
static void dot4x2_f32(const float *x0, const float *x1, const float *w, int64_t k, float out0[4], float out1[4]) {
    __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps(), a02 = _mm256_setzero_ps(), a03 = _mm256_setzero_ps();
    __m256 a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps(), a12 = _mm256_setzero_ps(), a13 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m256 u = _mm256_loadu_ps(x0 + i), v = _mm256_loadu_ps(x1 + i);
        __m256 wv = _mm256_loadu_ps(w + i);
        a00 = _mm256_fmadd_ps(u, wv, a00); a10 = _mm256_fmadd_ps(v, wv, a10);
        wv = _mm256_loadu_ps(w + k + i);
        a01 = _mm256_fmadd_ps(u, wv, a01); a11 = _mm256_fmadd_ps(v, wv, a11);
        wv = _mm256_loadu_ps(w + 2 * k + i);
        a02 = _mm256_fmadd_ps(u, wv, a02); a12 = _mm256_fmadd_ps(v, wv, a12);
        wv = _mm256_loadu_ps(w + 3 * k + i);
        a03 = _mm256_fmadd_ps(u, wv, a03); a13 = _mm256_fmadd_ps(v, wv, a13);
    }
    out0[0] = sum8(a00); out0[1] = sum8(a01); out0[2] = sum8(a02); out0[3] = sum8(a03);
    out1[0] = sum8(a10); out1[1] = sum8(a11); out1[2] = sum8(a12); out1[3] = sum8(a13);
    for (; i < k; i++)
        for (int q = 0; q < 4; q++) { out0[q] += x0[i] * w[q * k + i]; out1[q] += x1[i] * w[q * k + i]; }
}

#define LM_DOT4X2_F32 1
#define TILE_ROWS 8
#endif
#if defined(__AVX512F__)
static void dot4_f32(const float *x, const float *w, int64_t k, float out[4]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        __m512 xv = _mm512_loadu_ps(x + i);
        a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + i), a0);
        a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + k + i), a1);
        a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 2 * k + i), a2);
        a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 3 * k + i), a3);
    }
    out[0] = _mm512_reduce_add_ps(a0); out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2); out[3] = _mm512_reduce_add_ps(a3);
    for (; i < k; i++) { out[0] += x[i] * w[i]; out[1] += x[i] * w[k + i]; out[2] += x[i] * w[2 * k + i]; out[3] += x[i] * w[3 * k + i]; }
}
#endif

/* ---- linear layers -------------------------------------------------------------------------- */

/* One activation row to offset int8 (uint8, value + 128), zero-padded to `padded`; returns its scale. */
static float quantize_row(const float *x, uint8_t *out, int64_t k, int64_t padded) {
    float max_abs = 0.0f;
    for (int64_t i = 0; i < k; i++) {
        float a = fabsf(x[i]);
        max_abs = a > max_abs ? a : max_abs;
    }
    float scale = max_abs / 127.0f;
    float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    for (int64_t i = 0; i < k; i++) out[i] = (uint8_t)((int32_t)lrintf(x[i] * inverse) + 128);
    memset(out + k, 128, (size_t)(padded - k));
    return scale;
}

/* y (m, out) = x (m, in) through the layer. `scratch`: m * padded_in bytes + m floats (int8 only). */
void lm_linear(const lm_linear_t *layer, const float *x, float *y, int64_t m, uint8_t *scratch) {
    const int64_t n = layer->out, k = layer->in;
    if (layer->weight != NULL) {
#if defined(LM_DOT4X2_F32)
        /* A server's full batch: tiles of 4 weight rows x 2 activation rows, which took 0.73x the time of
           the loop below at m = 8 over a 12 x 768 model's products on a Zen 4 (37.7 against 51.5 ms, one
           thread). Below TILE_ROWS the loop below, which reads each weight row in order, was as fast or
           faster (the tiles read four rows at once, 3 KB apart, which the prefetchers follow worse). */
        if (m >= TILE_ROWS && n % 4 == 0) {
            #pragma omp parallel for schedule(static)
            for (int64_t j = 0; j < n; j += 4) {
                float d0[4], d1[4];
                int64_t r = 0;
                for (; r + 2 <= m; r += 2) {
                    dot4x2_f32(x + r * k, x + (r + 1) * k, layer->weight + j * k, k, d0, d1);
                    for (int q = 0; q < 4; q++) {
                        y[r * n + j + q] = d0[q] + (layer->bias ? layer->bias[j + q] : 0.0f);
                        y[(r + 1) * n + j + q] = d1[q] + (layer->bias ? layer->bias[j + q] : 0.0f);
                    }
                }
                if (r < m) { /* an odd row out pairs with itself: faster than four single dot products */
                    dot4x2_f32(x + r * k, x + r * k, layer->weight + j * k, k, d0, d1);
                    for (int q = 0; q < 4; q++) y[r * n + j + q] = d0[q] + (layer->bias ? layer->bias[j + q] : 0.0f);
                }
            }
            return;
        }
#endif
#if defined(__AVX512F__)
        if (m == 1 && n % 4 == 0) {
            #pragma omp parallel for schedule(static)
            for (int64_t j = 0; j < n; j += 4) {
                float d[4];
                dot4_f32(x, layer->weight + j * k, k, d);
                for (int q = 0; q < 4; q++) y[j + q] = d[q] + (layer->bias ? layer->bias[j + q] : 0.0f);
            }
            return;
        }
#endif
        #pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < n; j++) {
            const float b = layer->bias ? layer->bias[j] : 0.0f;
            for (int64_t r = 0; r < m; r++) y[r * n + j] = dot_f32(x + r * k, layer->weight + j * k, k) + b;
        }
        return;
    }
    const int64_t padded = layer->padded_in;
    uint8_t *xq = scratch;
    float *x_scale = (float *)(scratch + ((m * padded + 63) / 64) * 64);
    for (int64_t r = 0; r < m; r++) x_scale[r] = quantize_row(x + r * k, xq + r * padded, k, padded);
#if defined(LM_VNNI)
    if (m == 1 && n % 4 == 0) {
        #pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < n; j += 4) {
            int32_t d[4];
            dot4_u8_s8(xq, layer->quantized + j * padded, padded, d);
            for (int q = 0; q < 4; q++)
                y[j + q] = (float)(d[q] - 128 * layer->row_sum[j + q]) * x_scale[0] * layer->scale[j + q] + (layer->bias ? layer->bias[j + q] : 0.0f);
        }
        return;
    }
#endif
    #pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; j++) {
        const int8_t *row = layer->quantized + j * padded;
        const float row_scale = layer->scale[j], b = layer->bias ? layer->bias[j] : 0.0f;
        const int32_t offset = 128 * layer->row_sum[j];
        for (int64_t r = 0; r < m; r++) {
            int32_t dot = dot_u8_s8(xq + r * padded, row, padded) - offset;
            y[r * n + j] = (float)dot * x_scale[r] * row_scale + b;
        }
    }
}

/* ---- one block for one new token per sample ------------------------------------------------------ */

static void layer_norm(const float *x, float *out, int64_t d, const float *w, const float *b, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (int64_t i = 0; i < d; i++) mean += x[i];
    mean /= (float)d;
    for (int64_t i = 0; i < d; i++) var += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.0f / sqrtf(var / (float)d + eps);
    for (int64_t i = 0; i < d; i++) out[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

static void rms_norm(const float *x, float *out, int64_t d, const float *w, float eps) {
    float squares = 0.0f;
    for (int64_t i = 0; i < d; i++) squares += x[i] * x[i];
    const float inv = 1.0f / sqrtf(squares / (float)d + eps);
    for (int64_t i = 0; i < d; i++) out[i] = x[i] * inv * w[i];
}

static void norm(const lm_block_t *b, int which, const float *x, float *out) {
    const float *w = which == 1 ? b->norm1_weight : b->norm2_weight;
    if (b->norm == 1) rms_norm(x, out, b->d_model, w, b->eps);
    else layer_norm(x, out, b->d_model, w, which == 1 ? b->norm1_bias : b->norm2_bias, b->eps);
}

/* Rotate pairs (x_i, x_{i+d/2}) by the position's angle: the GPT-NeoX / Llama layout of lm.model. */
static void rope(float *x, const float *cos_row, const float *sin_row, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float first = x[i], second = x[i + half];
        x[i] = first * cos_row[i] - second * sin_row[i];
        x[i + half] = second * cos_row[i + half] + first * sin_row[i + half];
    }
}

/* x (batch, d_model) is updated in place; keys and values: this layer's cache, (rows >= batch, n_head,
   context, d_head), sample r in row r; positions (batch): where each sample's token goes (samples of one
   batch may sit at different positions: a server's sequences do); rope_cos and rope_sin: the rotary
   angles (context, d_head), NULL without rotary positions.
   work: batch * (6 * d_model + 2 * d_ff + n_head * context) floats; scratch (int8 layers' quantized
   activations): cpu_kernels.scratch_bytes(batch, max(d_model, d_ff)) bytes, 64-byte aligned. */
static void block_step(const lm_block_t *b, float *x, int64_t batch, float *keys, float *values,
                       const int64_t *positions, const float *rope_cos, const float *rope_sin, float *work,
                       uint8_t *scratch) {
    const int64_t d = b->d_model, heads = b->n_head, dh = b->d_head, ff = b->d_ff, T = b->context;
    float *h = work, *qkv = h + batch * d, *attended = qkv + batch * 3 * d, *out = attended + batch * d;
    float *hidden = out + batch * d, *gate = hidden + batch * ff, *scores = gate + batch * ff;
    const float scale = 1.0f / sqrtf((float)dh);

    for (int64_t r = 0; r < batch; r++) norm(b, 1, x + r * d, h + r * d);
    lm_linear(&b->qkv, h, qkv, batch, scratch);
    #pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < batch * heads; task++) {
        const int64_t r = task / heads, head = task % heads;
        const int64_t position = positions[r];
        float *q = qkv + r * 3 * d + head * dh, *k = q + d, *v = q + 2 * d;
        if (b->q_norm_weight) {
            rms_norm(q, q, dh, b->q_norm_weight, b->eps);
            rms_norm(k, k, dh, b->k_norm_weight, b->eps);
        }
        if (rope_cos) {
            rope(q, rope_cos + position * dh, rope_sin + position * dh, dh);
            rope(k, rope_cos + position * dh, rope_sin + position * dh, dh);
        }
        float *cached_keys = keys + (r * heads + head) * T * dh, *cached_values = values + (r * heads + head) * T * dh;
        memcpy(cached_keys + position * dh, k, (size_t)dh * sizeof(float));
        memcpy(cached_values + position * dh, v, (size_t)dh * sizeof(float));
        float *p = scores + task * T, largest = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t <= position; t++) {
            p[t] = dot_f32(q, cached_keys + t * dh, dh) * scale;
            largest = p[t] > largest ? p[t] : largest;
        }
        for (int64_t t = 0; t <= position; t++) {
            p[t] = expf(p[t] - largest);
            total += p[t];
        }
        float *y = attended + r * d + head * dh;
        memset(y, 0, (size_t)dh * sizeof(float));
        for (int64_t t = 0; t <= position; t++) {
            const float weight = p[t] / total, *row = cached_values + t * dh;
            for (int64_t i = 0; i < dh; i++) y[i] += weight * row[i];
        }
    }
    lm_linear(&b->proj, attended, out, batch, scratch);
    for (int64_t i = 0; i < batch * d; i++) x[i] += out[i];

    for (int64_t r = 0; r < batch; r++) norm(b, 2, x + r * d, h + r * d);
    lm_linear(&b->fc, h, hidden, batch, scratch);
    if (b->mlp == 1) {
        lm_linear(&b->gate, h, gate, batch, scratch);
        #pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < batch * ff; i++) hidden[i] *= gate[i] / (1.0f + expf(-gate[i]));
    } else if (b->mlp == 2) {
        for (int64_t i = 0; i < batch * ff; i++) hidden[i] = hidden[i] > 0.0f ? hidden[i] * hidden[i] : 0.0f;
    } else {
        const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
        #pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < batch * ff; i++) {
            const float u = hidden[i];
            /* tanh(z) = 1 - 2 / (1 + e^2z): glibc's expf is several times faster than its tanhf */
            hidden[i] = 0.5f * u * (2.0f - 2.0f / (1.0f + expf(2.0f * c * (u + 0.044715f * u * u * u))));
        }
    }
    lm_linear(&b->down, hidden, out, batch, scratch);
    for (int64_t i = 0; i < batch * d; i++) x[i] += out[i];
}

/* One new token per sample through the whole model: embedding, every block, final norm, output head.
   ids and positions (batch): each sample's token and the position it takes; keys and values: the cache,
   (n_layer, cache_rows, n_head, context, d_head), sample r in row r (cache_rows >= batch: a server's
   cache has a row for every slot, the active ones first); logits (batch, vocab); x: batch * d_model
   floats of room; work and scratch as for block_step. Returns 0; without touching anything, 1 when an
   id is outside the vocabulary, 2 when a position is outside the context. */
int lm_decode_token(const lm_model_t *m, const int64_t *ids, const int64_t *positions, int64_t batch,
                    int64_t cache_rows, float *keys, float *values, float *logits, float *x, float *work,
                    uint8_t *scratch) {
    const int64_t d = m->d_model, layer_floats = cache_rows * m->n_head * m->context * m->d_head;
    for (int64_t r = 0; r < batch; r++) {
        if (ids[r] < 0 || ids[r] >= m->vocab) return 1;
        if (positions[r] < 0 || positions[r] >= m->context) return 2;
    }
    for (int64_t r = 0; r < batch; r++) {
        memcpy(x + r * d, m->token_embedding + ids[r] * d, (size_t)d * sizeof(float));
        if (m->position_embedding)
            for (int64_t i = 0; i < d; i++) x[r * d + i] += m->position_embedding[positions[r] * d + i];
    }
    for (int64_t layer = 0; layer < m->n_layer; layer++)
        block_step(&m->blocks[layer], x, batch, keys + layer * layer_floats, values + layer * layer_floats,
                   positions, m->rope_cos, m->rope_sin, work, scratch);
    float *h = work;
    for (int64_t r = 0; r < batch; r++) {
        if (m->norm == 1) rms_norm(x + r * d, h + r * d, d, m->norm_weight, m->eps);
        else layer_norm(x + r * d, h + r * d, d, m->norm_weight, m->norm_bias, m->eps);
    }
    lm_linear(&m->head, h, logits, batch, scratch);
    return 0;
}
