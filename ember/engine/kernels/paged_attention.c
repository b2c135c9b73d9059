/* Decode attention over the paged KV pool, for CPU (fp32): ember/engine/native.py builds and
 * loads this file; ember/engine/attn_metadata.py calls it and keeps a pure-PyTorch path.
 *
 * Why native code: PyTorch can only attend over scattered blocks after gathering them into a
 * contiguous buffer (a copy of every key per layer per step), and its small per-sequence
 * matmuls cost more in dispatch than in arithmetic. Here each sequence's keys and values are
 * read once, block by block, straight from the pool, with blocks ahead prefetched.
 *
 * Layouts (all contiguous):
 *   q       (B, H, D)            one query per sequence; the rep = H / Hkv query heads of KV head
 *                                g are heads g*rep .. g*rep+rep-1 (GQA), as in the model
 *   k, v    (num_blocks, Hkv, bs, D)   this layer's pool
 *   tables  (B, W) int64         block ids in position order, padded to W
 *   lens    (B,) int64           keys to attend (the query's position + 1)
 *   window  0, or a sliding window: keys at positions >= len - window only
 *   scratch threads * H * W * bs floats   per thread, the scores of one sequence's query heads
 *   threads  sequences are spread over up to this many OpenMP threads (torch's pool, see
 *            ember/engine/native.py); 1, or a build without OpenMP: serial
 *   out     (B, H, D)
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* aligned(4): unaligned loads */

static inline float hsum(v8 a) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += a[i];
    return s;
}

/* q . k for four consecutive keys (D % 8 == 0). One dot product is a chain of dependent
 * multiply-adds, bound by their latency; four side by side keep the FMA units busy. Measured
 * with the keys in cache (32 sequences x 400 keys): 1.73 ms -> 1.20 ms; from DRAM the kernel is
 * bound by memory and gains little. */
static inline void dot4(const float *q, const float *k, int64_t D, float *out) {
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int64_t d = 0; d < D; d += 8) {
        const v8 qv = *(const v8 *)(q + d);
        a0 += qv * *(const v8 *)(k + d);
        a1 += qv * *(const v8 *)(k + D + d);
        a2 += qv * *(const v8 *)(k + 2 * D + d);
        a3 += qv * *(const v8 *)(k + 3 * D + d);
    }
    out[0] = hsum(a0);
    out[1] = hsum(a1);
    out[2] = hsum(a2);
    out[3] = hsum(a3);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* Blocks are scattered, so the hardware prefetcher cannot follow a sequence from one block to
 * the next: each head row of the block DIST ahead is prefetched (into L2, hint 2) while the same
 * row of this block is read. Measured (32 sequences x 400 keys, 52 MB from DRAM): 3.3 ms,
 * against 4.8 ms prefetching one whole block ahead with hint 0 or 3. */
#define DIST 2
static inline void prefetch_row(const float *p, int64_t nfloats) {
    for (int64_t i = 0; i < nfloats; i += 16) __builtin_prefetch(p + i, 0, 2);
}

/* Head g's rows of block j (tab[j]) in `pool`, prefetching the same rows of the block DIST ahead. */
static inline const float *head_rows(const float *pool, const int64_t *tab, int64_t j, int64_t last, int64_t g,
                                     int64_t block, int64_t head_row) {
    if (j + DIST <= last) prefetch_row(pool + tab[j + DIST] * block + g * head_row, head_row);
    return pool + tab[j] * block + g * head_row;
}

/* The positions [*t0, *t1) of block j that lie in the attended range [lo, n). */
static inline void block_span(int64_t j, int64_t lo, int64_t n, int64_t bs, int64_t *t0, int64_t *t1) {
    *t0 = lo > j * bs ? lo - j * bs : 0;
    *t1 = n < (j + 1) * bs ? n - j * bs : bs;
}

void ember_paged_decode(const float *q, const float *k, const float *v, const int64_t *tables,
                        const int64_t *lens, int64_t B, int64_t W, int64_t H, int64_t Hkv,
                        int64_t D, int64_t bs, float scale, int64_t window, float *scratch_all,
                        int64_t threads, float *out) {
    /* Blocks outermost: a block's rows for all KV heads are one contiguous run of memory
     * (Hkv * bs * D floats), read front to back. */
    const int64_t rep = H / Hkv, head_row = bs * D, block = Hkv * head_row, S = W * bs;
    /* Dynamic: sequences differ in length. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && B > 1)
    for (int64_t b = 0; b < B; b++) {
#ifdef _OPENMP
        float *scratch = scratch_all + (int64_t)omp_get_thread_num() * H * S;
#else
        float *scratch = scratch_all;
#endif
        float mx[H], sum[H];
        const int64_t n = lens[b];
        const int64_t lo = (window > 0 && n > window) ? n - window : 0;
        const int64_t *tab = tables + b * W;
        const int64_t first = lo / bs, last = (n - 1) / bs;
        const float *qb = q + b * H * D;
        float *ob = out + b * H * D;
        /* pass 1: scores of every query head (h = g * rep + r) in scratch[h * S + position] */
        for (int64_t h = 0; h < H; h++) mx[h] = -FLT_MAX;
        for (int64_t j = first; j <= last; j++) {
            int64_t t0, t1;
            block_span(j, lo, n, bs, &t0, &t1);
            for (int64_t g = 0; g < Hkv; g++) {
                const float *kb = head_rows(k, tab, j, last, g, block, head_row);
                int64_t t = t0;
                if (D % 8 == 0)
                    for (; t + 4 <= t1; t += 4)
                        for (int64_t r = 0; r < rep; r++) {
                            const int64_t h = g * rep + r;
                            float *sc = scratch + h * S + j * bs + t;
                            dot4(qb + h * D, kb + t * D, D, sc);
                            for (int i = 0; i < 4; i++) {
                                sc[i] *= scale;
                                if (sc[i] > mx[h]) mx[h] = sc[i];
                            }
                        }
                for (; t < t1; t++) {
                    for (int64_t r = 0; r < rep; r++) {
                        const int64_t h = g * rep + r;
                        const float s = dot(qb + h * D, kb + t * D, D) * scale;
                        scratch[h * S + j * bs + t] = s;
                        if (s > mx[h]) mx[h] = s;
                    }
                }
            }
        }
        /* softmax numerators */
        for (int64_t h = 0; h < H; h++) {
            float *sh = scratch + h * S;
            float acc = 0.0f;
            for (int64_t p = lo; p < n; p++) {
                sh[p] = expf(sh[p] - mx[h]);
                acc += sh[p];
            }
            sum[h] = acc;
        }
        for (int64_t i = 0; i < H * D; i++) ob[i] = 0.0f;
        /* pass 2: probability-weighted values */
        for (int64_t j = first; j <= last; j++) {
            int64_t t0, t1;
            block_span(j, lo, n, bs, &t0, &t1);
            for (int64_t g = 0; g < Hkv; g++) {
                const float *vb = head_rows(v, tab, j, last, g, block, head_row);
                for (int64_t t = t0; t < t1; t++) {
                    const float *vt = vb + t * D;
                    for (int64_t r = 0; r < rep; r++) {
                        const int64_t h = g * rep + r;
                        const float p = scratch[h * S + j * bs + t];
                        float *o = ob + h * D;
                        for (int64_t d = 0; d < D; d++) o[d] += p * vt[d];
                    }
                }
            }
        }
        for (int64_t h = 0; h < H; h++) {
            const float inv = 1.0f / sum[h];
            for (int64_t d = 0; d < D; d++) ob[h * D + d] *= inv;
        }
    }
}

/* Writes this step's keys (or values) into the pool: row i * Hkv + h of the flattened step goes to
 * pool row rows[i * Hkv + h] (of D floats). src is (N, Hkv, D) with any row strides and contiguous
 * D, so the fused projection's output views are written without a copy first. PyTorch's
 * index_copy_ took ~75 us for 64 tokens x 8 heads; these are plain copies of 256 bytes. */
void ember_kv_write(float *pool, const float *src, const int64_t *rows, int64_t N, int64_t Hkv,
                    int64_t D, int64_t stride_n, int64_t stride_h) {
    for (int64_t i = 0; i < N; i++)
        for (int64_t h = 0; h < Hkv; h++)
            memcpy(pool + rows[i * Hkv + h] * D, src + i * stride_n + h * stride_h, (size_t)D * sizeof(float));
}
