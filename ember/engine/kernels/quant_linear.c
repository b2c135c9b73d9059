/* Quantized linear layers over a few rows (decode, small batches) on CPU: ember/engine/native.py
 * builds and loads this file; the quantized modules of ember/quant (linear.py, gguf_linear.py,
 * their layouts in native_layout.py) call it through native.quant_linear.
 *
 *   y (M, N) = x (M, K) @ dequant(W)^T + bias           bias may be NULL
 *
 * The weight stays quantized in memory: row after row, each row a run of blocks of 32 weights
 * with their scale(s) beside them, so that a row streams from one place:
 *
 *   fmt  name  bytes/block  a weight is      block layout
 *   0    I8    32 (no scale) q * rscale[n]    int8 q[32]; rows of any K (ember's per-channel INT8)
 *   1    Q8_0  34            d * q            fp16 d, int8 q[32]                (GGUF, as stored)
 *   2    Q4_0  18            d * (q - 8)      fp16 d, 16 bytes of 4-bit q       (GGUF, as stored)
 *   3    Q4_1  20            d * q + m        fp16 d, fp16 m, 16 bytes          (GGUF, as stored)
 *   4    Q4Z   20            d * (q - z)      fp16 d, int8 z, 1 spare, 16 bytes (GPTQ/AWQ/RTN, repacked)
 *   5    NF4   20            a * NF4[q]       fp32 a, 16 bytes                  (bitsandbytes, repacked)
 *
 * 4-bit blocks keep GGUF's nibble order: byte j holds weight j in its low nibble, j + 16 in
 * its high one. K of the blocked formats is a multiple of 32 (the caller pads x with zeros).
 *
 * Arithmetic: the activations stay fp32 and each block is dequantized in registers to fp32
 * (integers converted exactly, then scaled) and multiplied with FMA, so a product differs from
 * the dequantize-then-matmul reference only in the order of its fp32 additions and greedy
 * tokens stay those of the PyTorch path. Quantizing the activations to int8 for integer dot
 * products, as llama.cpp does, would round every activation to 8 bits (an error the reference
 * does not have) in exchange for fewer instructions per weight. The price of fp32 is compute:
 * measured at batch 1 on one core of the development machine (weights streamed from beyond the
 * caches), I8 / Q8_0 reach ~9-10 G weights/s, the 4-bit formats ~11-13, NF4 ~7 (its table
 * lookup), against ~3.5 for fp32 at 14 GB/s: a core converts slower than memory delivers the
 * 4-bit bytes, so these kernels gain on fp32 with every core added until memory binds.
 *
 * Two strategies, as kernels/linear.c:
 *   one row    four weight rows at a time: the x block is loaded once, each row's block decoded
 *              to four vectors of eight fp32, dotted with it, and the block's sum scaled into a
 *              vector accumulator; Q4_1's offset adds m * sum(x block), the block sums of x
 *              computed once per call. Rows 8 ahead are prefetched.
 *   2-8 rows   as one row, each block decoded once and dotted with every x row (speculative
 *              verification, small batches); fp32 activations
 *   9+ rows    a panel of EMBER_PANEL_ROWS weight rows is dequantized into fp32 scratch (per
 *              thread, cache-resident) and multiplied with every x row by linear.c's tile kernel
 *              (x transposed once). The panel's values are exactly the reference's dequantized
 *              weights, so the results are those of the fp32 kernel on them, bit for bit.
 * Output rows are spread over torch's OpenMP threads; each output is computed by one thread in
 * a fixed order, so results do not depend on the thread count.
 *
 * The decoders use AVX2 (and F16C for the fp16 scales) where the compiler targets them, else
 * portable C that computes the same values.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

typedef float vf __attribute__((vector_size(32), aligned(4))); /* aligned(4): unaligned loads */

enum { F_I8, F_Q8_0, F_Q4_0, F_Q4_1, F_Q4Z, F_NF4 };
#define EMBER_INT8_ACT 0x100 /* or-ed into fmt: one-row products on int8 activations (below) */

/* Bytes per block of 32 weights. */
static inline int64_t block_bytes(const int fmt) {
    return fmt == F_I8 ? 32 : fmt == F_Q8_0 ? 34 : fmt == F_Q4_0 ? 18 : 20;
}

/* Bytes of one weight row of K weights. */
static inline int64_t row_bytes(const int fmt, int64_t K) {
    return fmt == F_I8 ? K : K / 32 * block_bytes(fmt);
}

/* bitsandbytes' NF4 values, as fp32 bit patterns (ember/quant/nf4.py's NF4_CODE). */
static const float NF4[16] = {
    -0x1.0p+0f, -0x1.647362p-1f, -0x1.0cd66p-1f, -0x1.946540p-2f, -0x1.23449ap-2f, -0x1.7a6a7ep-3f,
    -0x1.74f0e2p-4f, 0.0f, 0x1.45f5fep-4f, 0x1.4995c6p-3f, 0x1.f809bap-3f, 0x1.5a0674p-2f,
    0x1.c34970p-2f, 0x1.200f56p-1f, 0x1.722766p-1f, 0x1.0p+0f};

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = h >> 10 & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f)
        bits = sign | 0x7f800000u | man << 13;
    else if (exp)
        bits = sign | (exp + 112) << 23 | man << 13;
    else if (man == 0)
        bits = sign;
    else { /* subnormal half: normal in fp32 */
        uint32_t m = man, shift = 0;
        while (!(m & 0x400)) m <<= 1, shift++;
        bits = sign | (113 - shift) << 23 | (m & 0x3ff) << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* One block's 32 weights before scaling, in order, as four vectors of eight (exact integers or
 * NF4 values); *d its scale (1 for I8, whose scale is per row), *m Q4_1's offset. fmt is a
 * constant at every call site, so each format compiles to its own straight-line code. */
static inline __attribute__((always_inline)) void decode(const int fmt, const uint8_t *b, vf w[4], float *d,
                                                         float *m) {
#ifdef __AVX2__
    if (fmt == F_I8 || fmt == F_Q8_0) {
        const uint8_t *q = fmt == F_I8 ? b : b + 2;
        for (int i = 0; i < 4; i++)
            w[i] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i))));
    } else {
        const __m128i raw = _mm_loadu_si128((const __m128i *)(b + (fmt == F_Q4_0 ? 2 : 4)));
        const __m128i m4 = _mm_set1_epi8(0x0f);
        __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
        if (fmt == F_Q4_0 || fmt == F_Q4Z) {
            const __m128i z = _mm_set1_epi8(fmt == F_Q4_0 ? 8 : (int8_t)b[2]);
            lo = _mm_sub_epi8(lo, z);
            hi = _mm_sub_epi8(hi, z);
        }
        const __m128i part[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
        if (fmt == F_NF4) {
            /* 16-entry lookup: the low three bits pick within each half of the table, bit 3
             * (moved to the sign bit) picks the half. */
            const __m256 t0 = _mm256_loadu_ps(NF4), t1 = _mm256_loadu_ps(NF4 + 8);
            for (int i = 0; i < 4; i++) {
                const __m256i idx = _mm256_cvtepu8_epi32(part[i]);
                w[i] = (vf)_mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
            }
        } else {
            for (int i = 0; i < 4; i++) w[i] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[i]));
        }
    }
#else
    float t[32];
    if (fmt == F_I8 || fmt == F_Q8_0) {
        const int8_t *q = (const int8_t *)(fmt == F_I8 ? b : b + 2);
        for (int i = 0; i < 32; i++) t[i] = (float)q[i];
    } else {
        const uint8_t *q = b + (fmt == F_Q4_0 ? 2 : 4);
        const int z = fmt == F_Q4_0 ? 8 : fmt == F_Q4Z ? (int8_t)b[2] : 0;
        for (int j = 0; j < 16; j++) {
            const int lo = q[j] & 0x0f, hi = q[j] >> 4;
            t[j] = fmt == F_NF4 ? NF4[lo] : (float)(lo - z);
            t[j + 16] = fmt == F_NF4 ? NF4[hi] : (float)(hi - z);
        }
    }
    memcpy(w, t, sizeof t);
#endif
    if (fmt == F_I8)
        *d = 1.0f;
    else if (fmt == F_NF4)
        memcpy(d, b, 4);
    else
        *d = half_to_float(b);
    *m = fmt == F_Q4_1 ? half_to_float(b + 2) : 0.0f;
}

static inline float hsum(vf a) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += a[i];
    return s;
}

/* ---- one row ------------------------------------------------------------------------------ */
#define GROUP 4    /* weight rows per pass, sharing each x block */
#define AHEAD 8    /* prefetch distance in weight rows */
#define PARALLEL_MIN (1 << 16) /* multiply-adds below which a product stays on one thread */

/* out[r] = x . row r of w (unscaled by I8's row scale), r < R. pf: the same place R rows ahead
 * of each row, prefetched (NULL: none). */
static inline __attribute__((always_inline)) void dot_rows(const int fmt, const int R, const uint8_t *w, int64_t rb,
                                                           const float *x, const float *xsum, int64_t K,
                                                           const uint8_t *pf, float *out) {
    const int64_t bb = block_bytes(fmt), nb = K / 32;
    vf acc[GROUP];
    float off[GROUP];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) acc[r] = (vf){0}, off[r] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const vf *xb = (const vf *)(x + 32 * b);
        const vf x0 = xb[0], x1 = xb[1], x2 = xb[2], x3 = xb[3];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            if (pf) __builtin_prefetch(pf + r * rb + b * bb, 0, 2);
            vf q[4];
            float d, m;
            decode(fmt, w + r * rb + b * bb, q, &d, &m);
            const vf s = q[0] * x0 + q[1] * x1 + q[2] * x2 + q[3] * x3;
            if (fmt == F_I8)
                acc[r] += s;
            else
                acc[r] += s * d;
            if (fmt == F_Q4_1) off[r] += m * xsum[b];
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        float a = hsum(acc[r]) + off[r];
        if (fmt == F_I8) /* rows of any length: the last K % 32 weights */
            for (int64_t t = nb * 32; t < K; t++) a += x[t] * (float)(int8_t)w[r * rb + t];
        out[r] = a;
    }
}

/* ---- one row, int8 activations (fmt | EMBER_INT8_ACT) ---------------------------------------
 * llama.cpp's way for batch-1 decode: x is quantized per block of 32 to int8 (dx = max|x| / 127,
 * xq = round(x / dx), kept with the exact fp32 block sum), and each weight block meets its x
 * block in an integer dot product (AVX2: maddubs of unsigned weights, or |w| with x carrying w's
 * sign, then madd into eight int32 lanes), scaled once per block by d * dx. Integer sums are
 * exact, so every build computes the same block dots; the only error against the fp32 path is
 * x's rounding to 8 bits (at most dx / 2 per activation). NF4 has no integer codes and keeps
 * the fp32 path. */
static void quantize_x(const float *x, int64_t nb, int8_t *xq, float *dx, float *xsum, int32_t *isum) {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f, s = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float a = xb[i] < 0 ? -xb[i] : xb[i];
            amax = a > amax ? a : amax;
            s += xb[i];
        }
        const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t t = 0;
        for (int i = 0; i < 32; i++) {
            const float v = xb[i] * inv;
            const int32_t q = (int32_t)(v < 0 ? v - 0.5f : v + 0.5f); /* round half away, |q| <= 127 */
            xq[32 * b + i] = (int8_t)q;
            t += q;
        }
        dx[b] = d, xsum[b] = s, isum[b] = t;
    }
}

#ifdef __AVX2__
/* Eight int32 partial sums of a weight block's integer codes times an x block (4-bit codes
 * unsigned 0..15; I8/Q8_0 signed). */
static inline __attribute__((always_inline)) __m256i block_idot(const int fmt, const uint8_t *b, __m256i xv) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (fmt == F_I8 || fmt == F_Q8_0) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(fmt == F_I8 ? b : b + 2));
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
    }
    const __m128i raw = _mm_loadu_si128((const __m128i *)(b + (fmt == F_Q4_0 ? 2 : 4)));
    const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);
}
#endif

/* The integer dot of one block, portable: the same exact sum the AVX2 lanes add up to. */
static inline int32_t block_idot_c(const int fmt, const uint8_t *b, const int8_t *xq) {
    int32_t t = 0;
    if (fmt == F_I8 || fmt == F_Q8_0) {
        const int8_t *w = (const int8_t *)(fmt == F_I8 ? b : b + 2);
        for (int i = 0; i < 32; i++) t += (int32_t)w[i] * xq[i];
    } else {
        const uint8_t *q = b + (fmt == F_Q4_0 ? 2 : 4);
        for (int j = 0; j < 16; j++) t += (int32_t)(q[j] & 0x0f) * xq[j] + (int32_t)(q[j] >> 4) * xq[j + 16];
    }
    return t;
}

static inline __attribute__((always_inline)) void idot_rows(const int fmt, const int R, const uint8_t *w, int64_t rb,
                                                            const int8_t *xq, const float *dx, const float *xsum,
                                                            const int32_t *isum, const float *x, int64_t K,
                                                            const uint8_t *pf, float *out) {
    const int64_t bb = block_bytes(fmt), nb = K / 32;
#ifdef __AVX2__
    __m256 acc[GROUP];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
#else
    float acc[GROUP];
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
#endif
    float off[GROUP];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) off[r] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
#ifdef __AVX2__
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
#endif
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w + r * rb + b * bb;
            if (pf) __builtin_prefetch(pf + r * rb + b * bb, 0, 2);
            const float d = fmt == F_I8 ? 1.0f : half_to_float(blk);
            const float scale = d * dx[b];
#ifdef __AVX2__
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_idot(fmt, blk, xv)), _mm256_set1_ps(scale), acc[r]);
#else
            acc[r] += (float)block_idot_c(fmt, blk, xq + 32 * b) * scale;
#endif
            if (fmt == F_Q4_0)
                off[r] -= 8.0f * scale * (float)isum[b];
            else if (fmt == F_Q4Z)
                off[r] -= (float)(int8_t)blk[2] * scale * (float)isum[b];
            else if (fmt == F_Q4_1)
                off[r] += half_to_float(blk + 2) * xsum[b];
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
#ifdef __AVX2__
        float a = hsum((vf)acc[r]) + off[r];
#else
        float a = acc[r] + off[r];
#endif
        if (fmt == F_I8) /* rows of any length: the last K % 32 weights in fp32 */
            for (int64_t t = nb * 32; t < K; t++) a += x[t] * (float)(int8_t)w[r * rb + t];
        out[r] = a;
    }
}

/* One row through all N weight rows, GROUP at a time; int8_act: on the int8-rounded x (above). */
static inline __attribute__((always_inline)) void matvec(const int fmt, const int int8_act, const uint8_t *W,
                                                         const float *rscale, const float *bias, const float *x,
                                                         float *y, int64_t N, int64_t K, float *scratch) {
    const int64_t rb = row_bytes(fmt, K), groups = (N + GROUP - 1) / GROUP, nb = K / 32;
    float *dx = scratch, *xsum = int8_act ? dx + nb : scratch;
    int32_t *isum = (int32_t *)(dx + 2 * nb);
    int8_t *xq = (int8_t *)(isum + nb);
    if (int8_act) {
        quantize_x(x, nb, xq, dx, xsum, isum); /* ends in the omp for's barrier: every thread sees all of xq */
    } else if (fmt == F_Q4_1) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; b++) {
            float s = 0.0f;
            for (int i = 0; i < 32; i++) s += x[32 * b + i];
            xsum[b] = s;
        }
    }
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < groups; gi++) {
        const int64_t n0 = gi * GROUP;
        const uint8_t *w = W + n0 * rb;
        const uint8_t *pf = n0 + AHEAD + GROUP <= N ? w + AHEAD * rb : 0;
        float out[GROUP];
        int R = GROUP;
        if (n0 + GROUP <= N) {
            if (int8_act)
                idot_rows(fmt, GROUP, w, rb, xq, dx, xsum, isum, x, K, pf, out);
            else
                dot_rows(fmt, GROUP, w, rb, x, xsum, K, pf, out);
        } else {
            R = (int)(N - n0);
            for (int r = 0; r < R; r++) {
                if (int8_act)
                    idot_rows(fmt, 1, w + r * rb, rb, xq, dx, xsum, isum, x, K, 0, out + r);
                else
                    dot_rows(fmt, 1, w + r * rb, rb, x, xsum, K, 0, out + r);
            }
        }
        for (int r = 0; r < R; r++) {
            float v = fmt == F_I8 ? out[r] * rscale[n0 + r] : out[r];
            y[n0 + r] = bias ? v + bias[n0 + r] : v;
        }
    }
}

/* ---- a few rows (2..FEW_ROWS): speculative verification, small decode batches ------------------
 * Each weight block is decoded and scaled once (dequant_rows' values) and meets every x row in
 * four multiply-adds: the decode cost, which bounds the one-row path, is shared, so a step
 * verifying k speculative drafts costs about twice a plain decode step, not k + 1 times. The
 * results equal the one-row path's up to rounding (its sums run in another order, Q4_1's offset
 * meets the block sum of x there): ~1e-6 relative. */
#define FEW_ROWS 8  /* x rows sharing each decoded block (acc: FEW_GROUP x FEW_ROWS vectors) */
#define FEW_GROUP 2 /* weight rows per pass */

static inline __attribute__((always_inline)) void dot_rows_few(const int fmt, const int R, const int M,
                                                               const uint8_t *w, int64_t rb, const float *x,
                                                               int64_t K, const uint8_t *pf, float *out) {
    const int64_t bb = block_bytes(fmt), nb = K / 32;
    vf acc[FEW_GROUP][FEW_ROWS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < M; j++) acc[r][j] = (vf){0};
    for (int64_t b = 0; b < nb; b++) {
        vf q[FEW_GROUP][4];
        for (int r = 0; r < R; r++) {
            if (pf) __builtin_prefetch(pf + r * rb + b * bb, 0, 2);
            float d, m;
            decode(fmt, w + r * rb + b * bb, q[r], &d, &m);
            /* the block's weights scaled once (dequant_rows' values), then four multiply-adds per x row */
            if (fmt != F_I8)
                for (int i = 0; i < 4; i++) q[r][i] = fmt == F_Q4_1 ? q[r][i] * d + m : q[r][i] * d;
        }
        for (int j = 0; j < M; j++) {
            const vf *xb = (const vf *)(x + j * K + 32 * b);
            const vf x0 = xb[0], x1 = xb[1], x2 = xb[2], x3 = xb[3];
            for (int r = 0; r < R; r++) {
                vf a = acc[r][j];
                a += q[r][0] * x0;
                a += q[r][1] * x1;
                a += q[r][2] * x2;
                a += q[r][3] * x3;
                acc[r][j] = a;
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < M; j++) {
            float a = hsum(acc[r][j]);
            if (fmt == F_I8)
                for (int64_t t = nb * 32; t < K; t++) a += x[j * K + t] * (float)(int8_t)w[r * rb + t];
            out[r * FEW_ROWS + j] = a;
        }
}

static inline __attribute__((always_inline)) void few_rows(const int fmt, const uint8_t *W, const float *rscale,
                                                           const float *bias, const float *x, float *y,
                                                           int64_t ldy, int64_t M, int64_t N, int64_t K) {
    const int64_t rb = row_bytes(fmt, K), groups = (N + FEW_GROUP - 1) / FEW_GROUP;
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < groups; gi++) {
        const int64_t n0 = gi * FEW_GROUP;
        const int R = N - n0 < FEW_GROUP ? (int)(N - n0) : FEW_GROUP;
        float out[FEW_GROUP * FEW_ROWS];
        const uint8_t *w = W + n0 * rb;
        const uint8_t *pf = n0 + AHEAD + FEW_GROUP <= N ? w + AHEAD * rb : 0;
        switch (R == FEW_GROUP ? M : 0) { /* a constant M keeps the accumulators in registers */
        case 2: dot_rows_few(fmt, FEW_GROUP, 2, w, rb, x, K, pf, out); break;
        case 3: dot_rows_few(fmt, FEW_GROUP, 3, w, rb, x, K, pf, out); break;
        case 4: dot_rows_few(fmt, FEW_GROUP, 4, w, rb, x, K, pf, out); break;
        case 5: dot_rows_few(fmt, FEW_GROUP, 5, w, rb, x, K, pf, out); break;
        case 6: dot_rows_few(fmt, FEW_GROUP, 6, w, rb, x, K, pf, out); break;
        case 7: dot_rows_few(fmt, FEW_GROUP, 7, w, rb, x, K, pf, out); break;
        case 8: dot_rows_few(fmt, FEW_GROUP, 8, w, rb, x, K, pf, out); break;
        default: dot_rows_few(fmt, R, (int)M, w, rb, x, K, pf, out); break;
        }
        for (int r = 0; r < R; r++)
            for (int64_t j = 0; j < M; j++) {
                float v = fmt == F_I8 ? out[r * FEW_ROWS + j] * rscale[n0 + r] : out[r * FEW_ROWS + j];
                y[j * ldy + n0 + r] = bias ? v + bias[n0 + r] : v;
            }
    }
}

/* ---- several rows --------------------------------------------------------------------------- */
/* Rows [0, nr) of w dequantized into out (nr, K) fp32: the reference's values exactly (integer
 * times scale, or Q4_1's d * q + m with the exact product rounded once). */
static inline __attribute__((always_inline)) void dequant_rows(const int fmt, const uint8_t *w, int64_t rb,
                                                               const float *rscale, int64_t nr, int64_t K,
                                                               float *out) {
    const int64_t bb = block_bytes(fmt), nb = K / 32;
    for (int64_t r = 0; r < nr; r++) {
        const uint8_t *row = w + r * rb;
        float *o = out + r * K;
        const float s = fmt == F_I8 ? rscale[r] : 1.0f;
        for (int64_t b = 0; b < nb; b++) {
            vf q[4];
            float d, m;
            decode(fmt, row + b * bb, q, &d, &m);
            vf *ob = (vf *)(o + 32 * b);
            for (int i = 0; i < 4; i++)
                ob[i] = fmt == F_I8 ? q[i] * s : fmt == F_Q4_1 ? q[i] * d + m : q[i] * d;
        }
        if (fmt == F_I8)
            for (int64_t t = nb * 32; t < K; t++) o[t] = (float)(int8_t)row[t] * s;
    }
}

static inline __attribute__((always_inline)) void tiled(const int fmt, const uint8_t *W, const float *rscale,
                                                        const float *bias, const float *x, float *y, int64_t ldy,
                                                        int64_t M, int64_t N, int64_t K, float *scratch) {
    const int64_t rb = row_bytes(fmt, K), Mp = (M + 7) / 8 * 8, tiles = (N + EMBER_PANEL_ROWS - 1) / EMBER_PANEL_ROWS;
    float *xt = scratch;
#ifdef _OPENMP
    float *panel = scratch + K * Mp + (int64_t)omp_get_thread_num() * EMBER_PANEL_ROWS * K;
#else
    float *panel = scratch + K * Mp;
#endif
    ember_transpose_rows_team(x, M, K, Mp, xt);
#pragma omp for schedule(static)
    for (int64_t ti = 0; ti < tiles; ti++) {
        const int64_t n = ti * EMBER_PANEL_ROWS;
        const int nr = N - n < EMBER_PANEL_ROWS ? (int)(N - n) : EMBER_PANEL_ROWS;
        dequant_rows(fmt, W + n * rb, rb, fmt == F_I8 ? rscale + n : 0, nr, K, panel);
        ember_linear_panel(xt, Mp, M, panel, bias ? bias + n : 0, K, y + n, ldy, nr);
    }
}

static inline __attribute__((always_inline)) void qlinear(const int fmt, const int int8_act, const uint8_t *W,
                                                          const float *rscale, const float *bias, const float *x,
                                                          float *y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                                                          float *scratch) {
    if (M == 1)
        matvec(fmt, int8_act && fmt != F_NF4, W, rscale, bias, x, y, N, K, scratch);
    else if (M <= FEW_ROWS)
        few_rows(fmt, W, rscale, bias, x, y, ldy, M, N, K);
    else
        tiled(fmt, W, rscale, bias, x, y, ldy, M, N, K, scratch);
}

/* ---- entry points ------------------------------------------------------------------------------ */
/* Floats of the scratch ember_qlinear needs for M rows of K on `threads` threads. */
int64_t ember_qlinear_scratch(int64_t M, int64_t K, int64_t threads) {
    /* one row: fp32 block sums, or (int8 activations) dx, sums, int sums and K int8 codes */
    return M == 1 ? K / 32 * 11 + 1 : K * ((M + 7) / 8 * 8) + threads * EMBER_PANEL_ROWS * K;
}

/* On the calling team (see ember_linear_team in linear.c). rscale: I8's per-row scales (else
 * unused); ldy: the row stride of y (decode_layer.c writes q, k, v side by side); scratch:
 * ember_qlinear_scratch(M, K, team size) floats. */
void ember_qlinear_team(int64_t fmt, const uint8_t *W, const float *rscale, const float *bias, const float *x,
                        float *y, int64_t ldy, int64_t M, int64_t N, int64_t K, float *scratch) {
    const int a = (fmt & EMBER_INT8_ACT) != 0;
    switch (fmt & ~(int64_t)EMBER_INT8_ACT) {
    case F_I8: qlinear(F_I8, a, W, rscale, bias, x, y, ldy, M, N, K, scratch); break;
    case F_Q8_0: qlinear(F_Q8_0, a, W, rscale, bias, x, y, ldy, M, N, K, scratch); break;
    case F_Q4_0: qlinear(F_Q4_0, a, W, rscale, bias, x, y, ldy, M, N, K, scratch); break;
    case F_Q4_1: qlinear(F_Q4_1, a, W, rscale, bias, x, y, ldy, M, N, K, scratch); break;
    case F_Q4Z: qlinear(F_Q4Z, a, W, rscale, bias, x, y, ldy, M, N, K, scratch); break;
    case F_NF4: qlinear(F_NF4, a, W, rscale, bias, x, y, ldy, M, N, K, scratch); break;
    }
}

void ember_qlinear(int64_t fmt, const uint8_t *W, const float *rscale, const float *bias, const float *x, float *y,
                   int64_t M, int64_t N, int64_t K, float *scratch) {
#pragma omp parallel if (M * N * K >= PARALLEL_MIN)
    ember_qlinear_team(fmt, W, rscale, bias, x, y, N, M, N, K, scratch);
}

static inline __attribute__((always_inline)) void dequant(const int fmt, const uint8_t *W, const float *rscale,
                                                          int64_t N, int64_t K, float *out) {
    const int64_t rb = row_bytes(fmt, K);
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN)
    for (int64_t n = 0; n < N; n++) dequant_rows(fmt, W + n * rb, rb, fmt == F_I8 ? rscale + n : 0, 1, K, out + n * K);
}

/* out (N, K) fp32 = the dequantized weight (prefill multiplies it with BLAS). */
void ember_qdequant(int64_t fmt, const uint8_t *W, const float *rscale, int64_t N, int64_t K, float *out) {
    switch (fmt) {
    case F_I8: dequant(F_I8, W, rscale, N, K, out); break;
    case F_Q8_0: dequant(F_Q8_0, W, rscale, N, K, out); break;
    case F_Q4_0: dequant(F_Q4_0, W, rscale, N, K, out); break;
    case F_Q4_1: dequant(F_Q4_1, W, rscale, N, K, out); break;
    case F_Q4Z: dequant(F_Q4Z, W, rscale, N, K, out); break;
    case F_NF4: dequant(F_NF4, W, rscale, N, K, out); break;
    }
}
