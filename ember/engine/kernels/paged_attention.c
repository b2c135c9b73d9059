/* Decode attention over the paged KV pool, for CPU: ember/engine/native.py builds and loads this
 * file; ember/engine/attn_metadata.py calls it and keeps a pure-PyTorch path.
 *
 * Why native code: PyTorch can only attend over scattered blocks after gathering them into a
 * contiguous buffer (a copy of every key per layer per step), and its small per-sequence
 * matmuls cost more in dispatch than in arithmetic. Here each sequence's keys and values are
 * read once, block by block, straight from the pool, with blocks ahead prefetched.
 *
 * The pool holds fp32, fp16 or bf16 elements (`kind`, the engine's kv_cache_dtype); queries,
 * scores and outputs are fp32 and the pool's elements are widened as they are read. Decode
 * attention reads every cached key and value once per step, so it is bound by memory
 * bandwidth: a 16-bit pool halves both the bytes read and the memory the cache takes.
 *
 * Layouts (all contiguous):
 *   q       (B, H, D) fp32       one query per sequence; the rep = H / Hkv query heads of KV head
 *                                g are heads g*rep .. g*rep+rep-1 (GQA), as in the model
 *   k, v    (num_blocks, Hkv, bs, D)   this layer's pool, elements of `kind`
 *   tables  (B, W) int64         block ids in position order, padded to W
 *   lens    (B,) int64           keys to attend (the query's position + 1)
 *   window  0, or a sliding window: keys at positions >= len - window only
 *   scratch threads * H * W * bs floats   per thread, the scores of one sequence's query heads
 *   threads  sequences (few sequences: groups of their KV heads) are spread over up to this
 *            many OpenMP threads (torch's pool, see ember/engine/native.py); 1, or a build
 *            without OpenMP: serial
 *   out     (B, H, D) fp32
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __F16C__
#include <immintrin.h>
#endif

#include "vexp.h"

enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* aligned(4): unaligned loads */
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

/* Bit 1 << kind is set for each element kind this build reads and writes: fp16 needs the F16C
 * conversions (every x86 CPU with AVX2 has them). */
int ember_kv_kinds(void) {
#ifdef __F16C__
    return 1 << KV_F32 | 1 << KV_F16 | 1 << KV_BF16;
#else
    return 1 << KV_F32 | 1 << KV_BF16;
#endif
}

static inline int64_t elem_size(int kind) { return kind == KV_F32 ? 4 : 2; }

/* Eight consecutive elements at p, widened to fp32. `kind` is a constant in every specialised
 * caller below, so the branches fold away. */
static inline __attribute__((always_inline)) v8 load8(const char *p, int kind) {
    if (kind == KV_F32) return *(const v8 *)p;
#ifdef __F16C__
    if (kind == KV_F16) {
        __m128i h;
        memcpy(&h, p, sizeof h);
        return (v8)_mm256_cvtph_ps(h);
    }
#endif
    /* bf16 is the top half of an fp32 */
    return (v8)(__builtin_convertvector(*(const u16x8 *)p, u32x8) << 16);
}

static inline __attribute__((always_inline)) float load1(const char *p, int kind) {
    if (kind == KV_F32) return *(const float *)p;
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __F16C__
    if (kind == KV_F16) return _cvtsh_ss(h);
#endif
    const uint32_t w = (uint32_t)h << 16;
    float f;
    memcpy(&f, &w, 4);
    return f;
}

static inline float hsum(v8 a) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += a[i];
    return s;
}

/* q . k for four consecutive keys at k (rows of D elements, D % 8 == 0). One dot product is a
 * chain of dependent multiply-adds, bound by their latency; four side by side keep the FMA
 * units busy. Measured with fp32 keys in cache (32 sequences x 400 keys): 1.73 ms -> 1.20 ms;
 * from DRAM the kernel is bound by memory and gains little. */
static inline __attribute__((always_inline)) void dot4(const float *q, const char *k, int64_t D, int kind,
                                                        float *out) {
    const int64_t row = D * elem_size(kind), es = elem_size(kind);
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int64_t d = 0; d < D; d += 8) {
        const v8 qv = *(const v8 *)(q + d);
        const char *kd = k + d * es;
        a0 += qv * load8(kd, kind);
        a1 += qv * load8(kd + row, kind);
        a2 += qv * load8(kd + 2 * row, kind);
        a3 += qv * load8(kd + 3 * row, kind);
    }
    out[0] = hsum(a0);
    out[1] = hsum(a1);
    out[2] = hsum(a2);
    out[3] = hsum(a3);
}

static inline __attribute__((always_inline)) float dot(const float *q, const char *k, int64_t D, int kind) {
    float acc = 0.0f;
    for (int64_t i = 0; i < D; i++) acc += q[i] * load1(k + i * elem_size(kind), kind);
    return acc;
}

/* o += p * v over D elements. */
static inline __attribute__((always_inline)) void axpy(float *o, float p, const char *v, int64_t D, int kind) {
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) *(v8 *)(o + d) += p * load8(v + d * elem_size(kind), kind);
    for (; d < D; d++) o[d] += p * load1(v + d * elem_size(kind), kind);
}

/* Blocks are scattered, so the hardware prefetcher cannot follow a sequence from one block to
 * the next: each head row of the block DIST ahead is prefetched (into L2, hint 2) while the same
 * row of this block is read. Measured (32 sequences x 400 fp32 keys, 52 MB from DRAM): 3.3 ms,
 * against 4.8 ms prefetching one whole block ahead with hint 0 or 3. */
#define DIST 2
static inline void prefetch_row(const char *p, int64_t nbytes) {
    for (int64_t i = 0; i < nbytes; i += 64) __builtin_prefetch(p + i, 0, 2);
}

/* Head g's rows of block j (tab[j]) in `pool` (byte offsets), prefetching the same rows of the
 * block DIST ahead. */
static inline const char *head_rows(const char *pool, const int64_t *tab, int64_t j, int64_t last, int64_t g,
                                    int64_t block, int64_t head_row) {
    if (j + DIST <= last) prefetch_row(pool + tab[j + DIST] * block + g * head_row, head_row);
    return pool + tab[j] * block + g * head_row;
}

/* The positions [*t0, *t1) of block j that lie in the attended range [lo, n). */
static inline void block_span(int64_t j, int64_t lo, int64_t n, int64_t bs, int64_t *t0, int64_t *t1) {
    *t0 = lo > j * bs ? lo - j * bs : 0;
    *t1 = n < (j + 1) * bs ? n - j * bs : bs;
}

/* KV heads g0 .. g1-1 of sequence b (their query heads g0*rep .. g1*rep-1); each head's
 * arithmetic is the same whichever heads share the call. `kind` is a constant in each caller
 * (always_inline), one specialised copy each. */
static inline __attribute__((always_inline)) void decode_one(
        int64_t b, int64_t g0, int64_t g1, const float *q, const char *k, const char *v, const int64_t *tables,
        const int64_t *lens, int64_t W, int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale, int64_t window,
        float *scratch, float *out, int kind) {
    /* Blocks outermost: a block's rows for all KV heads are one contiguous run of memory
     * (Hkv * bs * D elements), read front to back. */
    const int64_t es = elem_size(kind), rep = H / Hkv, head_row = bs * D * es, block = Hkv * head_row,
                  S = W * bs, krow = D * es;
    float mx[H], sum[H];
    const int64_t n = lens[b];
    const int64_t lo = (window > 0 && n > window) ? n - window : 0;
    const int64_t *tab = tables + b * W;
    const int64_t first = lo / bs, last = (n - 1) / bs;
    const float *qb = q + b * H * D;
    float *ob = out + b * H * D;
    /* pass 1: scores of every query head (h = g * rep + r) in scratch[h * S + position] */
    for (int64_t h = g0 * rep; h < g1 * rep; h++) mx[h] = -FLT_MAX;
    for (int64_t j = first; j <= last; j++) {
        int64_t t0, t1;
        block_span(j, lo, n, bs, &t0, &t1);
        for (int64_t g = g0; g < g1; g++) {
            const char *kb = head_rows(k, tab, j, last, g, block, head_row);
            int64_t t = t0;
            if (D % 8 == 0)
                for (; t + 4 <= t1; t += 4)
                    for (int64_t r = 0; r < rep; r++) {
                        const int64_t h = g * rep + r;
                        float *sc = scratch + h * S + j * bs + t;
                        dot4(qb + h * D, kb + t * krow, D, kind, sc);
                        for (int i = 0; i < 4; i++) {
                            sc[i] *= scale;
                            if (sc[i] > mx[h]) mx[h] = sc[i];
                        }
                    }
            for (; t < t1; t++) {
                for (int64_t r = 0; r < rep; r++) {
                    const int64_t h = g * rep + r;
                    const float s = dot(qb + h * D, kb + t * krow, D, kind) * scale;
                    scratch[h * S + j * bs + t] = s;
                    if (s > mx[h]) mx[h] = s;
                }
            }
        }
    }
    /* softmax numerators */
    for (int64_t h = g0 * rep; h < g1 * rep; h++) {
        float *sh = scratch + h * S;
        vexp_f8 acc8 = {0};
        int64_t p = lo;
        for (; p + 8 <= n; p += 8) {
            vexp_f8 e;
            __builtin_memcpy(&e, sh + p, sizeof e);
            e = vexp8(e - mx[h]);
            __builtin_memcpy(sh + p, &e, sizeof e);
            acc8 += e;
        }
        float acc = 0.0f;
        for (int i = 0; i < 8; i++) acc += acc8[i];
        for (; p < n; p++) {
            sh[p] = expf(sh[p] - mx[h]);
            acc += sh[p];
        }
        sum[h] = acc;
    }
    for (int64_t i = g0 * rep * D; i < g1 * rep * D; i++) ob[i] = 0.0f;
    /* pass 2: probability-weighted values */
    for (int64_t j = first; j <= last; j++) {
        int64_t t0, t1;
        block_span(j, lo, n, bs, &t0, &t1);
        for (int64_t g = g0; g < g1; g++) {
            const char *vb = head_rows(v, tab, j, last, g, block, head_row);
            for (int64_t t = t0; t < t1; t++)
                for (int64_t r = 0; r < rep; r++) {
                    const int64_t h = g * rep + r;
                    axpy(ob + h * D, scratch[h * S + j * bs + t], vb + t * krow, D, kind);
                }
        }
    }
    for (int64_t h = g0 * rep; h < g1 * rep; h++) {
        const float inv = 1.0f / sum[h];
        for (int64_t d = 0; d < D; d++) ob[h * D + d] *= inv;
    }
}

/* On the calling team (see ember_linear_team in linear.c), whose size must not exceed `threads`
 * (the scratch holds that many score buffers); ember_paged_decode below opens one. */
void ember_paged_decode_team(const float *q, const void *k, const void *v, const int64_t *tables,
                             const int64_t *lens, int64_t B, int64_t W, int64_t H, int64_t Hkv,
                             int64_t D, int64_t bs, float scale, int64_t window, float *scratch_all,
                             int64_t kind, float *out) {
#ifdef _OPENMP
    const int64_t team = omp_get_num_threads();
#else
    const int64_t team = 1;
#endif
    /* Work units are (sequence, group of its KV heads): with fewer than two sequences per
     * thread, each sequence's heads are split over threads (batch-1 decode would otherwise
     * run on one). */
    int64_t split = team == 1 || B >= 2 * team ? 1 : (2 * team + B - 1) / B;
    if (split > Hkv) split = Hkv;
    const int64_t per = (Hkv + split - 1) / split, groups = (Hkv + per - 1) / per, units = B * groups;
    /* Dynamic: sequences differ in length. */
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; u++) {
#ifdef _OPENMP
        float *scratch = scratch_all + (int64_t)omp_get_thread_num() * H * W * bs;
#else
        float *scratch = scratch_all;
#endif
        const int64_t b = u / groups, g0 = u % groups * per, g1 = g0 + per < Hkv ? g0 + per : Hkv;
        if (kind == KV_F32)
            decode_one(b, g0, g1, q, k, v, tables, lens, W, H, Hkv, D, bs, scale, window, scratch, out, KV_F32);
#ifdef __F16C__
        else if (kind == KV_F16)
            decode_one(b, g0, g1, q, k, v, tables, lens, W, H, Hkv, D, bs, scale, window, scratch, out, KV_F16);
#endif
        else
            decode_one(b, g0, g1, q, k, v, tables, lens, W, H, Hkv, D, bs, scale, window, scratch, out, KV_BF16);
    }
}

void ember_paged_decode(const float *q, const void *k, const void *v, const int64_t *tables,
                        const int64_t *lens, int64_t B, int64_t W, int64_t H, int64_t Hkv,
                        int64_t D, int64_t bs, float scale, int64_t window, float *scratch_all,
                        int64_t threads, int64_t kind, float *out) {
#pragma omp parallel num_threads(threads) if (threads > 1 && B * Hkv > 1)
    ember_paged_decode_team(q, k, v, tables, lens, B, W, H, Hkv, D, bs, scale, window, scratch_all, kind, out);
}

/* fp32 -> bf16, rounding to nearest even; NaN stays a (quiet) NaN. As PyTorch's conversion. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Writes this step's keys (or values) into the pool: row i * Hkv + h of the flattened step goes to
 * pool row rows[i * Hkv + h] (of D elements of `kind`, converted from fp32 as PyTorch's .to()
 * rounds). src is fp32 (N, Hkv, D) with any row strides and contiguous D, so the fused
 * projection's output views are written without a copy first. PyTorch's index_copy_ took
 * ~75 us for 64 tokens x 8 heads; these are plain copies of 256 bytes. */
void ember_kv_write(void *pool, const float *src, const int64_t *rows, int64_t N, int64_t Hkv,
                    int64_t D, int64_t stride_n, int64_t stride_h, int64_t kind) {
    /* Serial when called on its own; shared by the team inside decode_layer.c's region. */
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; i++)
        for (int64_t h = 0; h < Hkv; h++) {
            const float *s = src + i * stride_n + h * stride_h;
            const int64_t row = rows[i * Hkv + h];
            if (kind == KV_F32) {
                memcpy((float *)pool + row * D, s, (size_t)D * sizeof(float));
                continue;
            }
            uint16_t *d = (uint16_t *)pool + row * D;
            int64_t e = 0;
#ifdef __F16C__
            if (kind == KV_F16) {
                for (; e + 8 <= D; e += 8) {
                    __m256 x;
                    memcpy(&x, s + e, sizeof x);
                    const __m128i hx = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
                    memcpy(d + e, &hx, sizeof hx);
                }
                for (; e < D; e++) d[e] = _cvtss_sh(s[e], _MM_FROUND_TO_NEAREST_INT);
                continue;
            }
#endif
            for (; e < D; e++) d[e] = to_bf16(s[e]);
        }
}
