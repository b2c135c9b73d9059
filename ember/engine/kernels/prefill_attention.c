/* Causal attention of a prompt chunk over its keys, for prefill on CPU (fp32): ember/engine/native.py
 * builds and loads this file; ember/engine/attn_metadata.py calls it for each prefilling
 * sequence and keeps PyTorch's scaled_dot_product_attention where it does not apply.
 *
 * Why native code: PyTorch's CPU attention kernel multiplies small blocks through BLAS calls
 * that each repack their operands; on the bench-50m shapes (8 heads of 64, prompts of 32-512
 * tokens) it ran at ~50 GFLOP/s of useful work on two cores, a third of what the same cores
 * give a large matmul, and prefill attention was ~5 % of the offline-throughput benchmark.
 * Here the work is the flash-attention loop: a block of 48 queries of one head walks the
 * keys it may see, 256 at a time, with an online softmax, and both of its products (scores =
 * q k^T, out += p v) run on a register-tiled kernel (6 rows x 16 columns of accumulators)
 * that reads its operands in place from L1/L2. Keys are transposed once per call, so the
 * score tile is also a row-times-broadcast product. Work above the diagonal is skipped to
 * the tile: 1.7-2x SDPA on those shapes (120 GFLOP/s of useful work on two cores; block
 * sizes measured: 48 x 256 beat 48 x 64, 48 x 128 and 96 x 128).
 *
 * Layouts (fp32; the last dimension contiguous, the others strided):
 *   q    (T, H, D)     the chunk's queries, at positions pos0 .. pos0 + T - 1
 *   k, v (S, Hkv, D)   keys and values at positions 0 .. S - 1 (S >= pos0 + T); query head h
 *                      reads KV head h / (H / Hkv) (GQA)
 *   query i sees key j when j <= pos0 + i and, with a sliding window w > 0, j > pos0 + i - w
 *   out  (T, H, D)     contiguous
 *   scratch            ember_prefill_attention_scratch(...) floats
 * D must be a multiple of 8. Each output row is computed by one thread, in the same order
 * whatever the thread count: the results do not depend on it.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vexp.h"

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* aligned(4): unaligned loads */

#define BQ 48  /* query rows per task: eight register tiles of MR rows */
#define BK 256 /* keys per step of the online softmax */
#define MR 6  /* rows of a register tile: 6 x 2 accumulators + 2 loads + 1 broadcast = 15 registers */

static int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

/* Floats of one thread's work area: a query block, its output accumulator, its score tile and
 * its running max and sum per row (query_block lays them out). */
static int64_t work_floats(int64_t D) { return 2 * BQ * D + BQ * BK + 2 * BQ; }

/* Floats of scratch: the keys transposed (Hkv, D, S rounded up to 8), then a work area per thread. */
int64_t ember_prefill_attention_scratch(int64_t S, int64_t Hkv, int64_t D, int64_t threads) {
    return Hkv * D * round8(S) + threads * work_floats(D);
}

/* C (nr, 8 mv) (+)= A (nr, K) @ B (K, 8 mv); rows of A, B, C at strides lda, ldb, ldc. nr and
 * mv are constants at every call site, so each case compiles to its own unrolled loop. */
static inline __attribute__((always_inline)) void tile(const float *A, int64_t lda, const float *B, int64_t ldb,
                                                         float *C, int64_t ldc, int64_t K, int add, const int nr,
                                                         const int mv) {
    v8 acc[MR][2];
#pragma GCC unroll 6
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 2
        for (int v = 0; v < mv; v++) acc[r][v] = add ? *(const v8 *)(C + r * ldc + 8 * v) : (v8){0};
    for (int64_t k = 0; k < K; k++) {
        v8 b[2];
#pragma GCC unroll 2
        for (int v = 0; v < mv; v++) b[v] = *(const v8 *)(B + k * ldb + 8 * v);
#pragma GCC unroll 6
        for (int r = 0; r < nr; r++) {
            const float a = A[r * lda + k];
#pragma GCC unroll 2
            for (int v = 0; v < mv; v++) acc[r][v] += a * b[v];
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < nr; r++)
#pragma GCC unroll 2
        for (int v = 0; v < mv; v++) *(v8 *)(C + r * ldc + 8 * v) = acc[r][v];
}

#define TILE(a, b) \
    case (a) * 4 + (b): tile(A + r * lda, lda, B + c, ldb, C + r * ldc + c, ldc, k, add, a, b); break;

/* C (M, N) (+)= A (M, K) @ B (K, N), N a multiple of 8. Row r of C needs only its first
 * diag + r + 1 columns (for the scores, `cut` 'N': keys past the diagonal) or A's first
 * diag + r + 1 columns (for the output, `cut` 'K': the probabilities past it are 0): each tile
 * of MR rows stops after its last row's (diag >= N or K: no cut). */
static void matmul(const float *A, int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc, int64_t M,
                   int64_t N, int64_t K, int add, int64_t diag, char cut) {
    for (int64_t r = 0; r < M; r += MR) {
        const int nr = M - r < MR ? (int)(M - r) : MR;
        const int64_t reach = diag + r + nr; /* columns the tile's last row sees */
        const int64_t n = cut == 'N' && reach < N ? round8(reach) : N, k = cut == 'K' && reach < K ? reach : K;
        for (int64_t c = 0; c < n; c += 16) {
            const int mv = n - c < 16 ? 1 : 2;
            switch (nr * 4 + mv) {
                TILE(1, 1) TILE(2, 1) TILE(3, 1) TILE(4, 1) TILE(5, 1) TILE(6, 1)
                TILE(1, 2) TILE(2, 2) TILE(3, 2) TILE(4, 2) TILE(5, 2) TILE(6, 2)
            }
        }
    }
}

/* Queries i0 .. i0 + nq - 1 of head h, over the keys they see, into out. */
static void query_block(const float *q, int64_t qs_t, int64_t qs_h, const float *kt, int64_t Sp, const float *v,
                        int64_t vs_t, int64_t vs_h, int64_t h, int64_t g, int64_t i0, int64_t nq, int64_t D,
                        int64_t H, int64_t pos0, int64_t window, float scale, float *work, float *out) {
    float *qb = work, *o = qb + BQ * D, *s = o + BQ * D, *m = s + BQ * BK, *l = m + BQ;
    for (int64_t r = 0; r < nq; r++) {
        const float *src = q + (i0 + r) * qs_t + h * qs_h;
        for (int64_t d = 0; d < D; d++) qb[r * D + d] = src[d] * scale;
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(o, 0, sizeof(float) * nq * D);
    const int64_t first = pos0 + i0, last = pos0 + i0 + nq - 1; /* positions of the block's queries */
    const int64_t lo = window > 0 && first - window + 1 > 0 ? (first - window + 1) / BK * BK : 0;
    const float *ktg = kt + g * D * Sp, *vg = v + g * vs_h;
    for (int64_t kb = lo; kb <= last; kb += BK) {
        const int64_t nk = last + 1 - kb < BK ? last + 1 - kb : BK, nc = round8(nk);
        matmul(qb, D, ktg + kb, Sp, s, BK, nq, nc, D, 0, first - kb, 'N');
        for (int64_t r = 0; r < nq; r++) {
            float *row = s + r * BK;
            /* this query sees columns [c0, c1) of the block: not above the diagonal, not behind
             * the window; exponentials are taken over the eights that hold them */
            const int64_t p = first + r, end = p - kb + 1;
            const int64_t c1 = end < nk ? end : nk, w0 = window > 0 ? p - window + 1 - kb : 0, c0 = w0 > 0 ? w0 : 0;
            if (c1 <= c0) { /* none: it adds nothing to this block's product */
                memset(row, 0, sizeof(float) * nc);
                continue;
            }
            const int64_t e0 = c0 / 8 * 8, e1 = round8(c1);
            for (int64_t c = e0; c < c0; c++) row[c] = -INFINITY;
            for (int64_t c = c1; c < e1; c++) row[c] = -INFINITY;
            v8 mx = (v8){0} - INFINITY;
            for (int64_t c = e0; c < e1; c += 8) mx = vexp_select(*(const v8 *)(row + c) > mx, *(const v8 *)(row + c), mx);
            float bmax = mx[0];
            for (int e = 1; e < 8; e++) bmax = mx[e] > bmax ? mx[e] : bmax;
            const float mnew = bmax > m[r] ? bmax : m[r];
            v8 sum = (v8){0};
            for (int64_t c = e0; c < e1; c += 8) {
                const v8 e = vexp8(*(const v8 *)(row + c) - mnew);
                *(v8 *)(row + c) = e;
                sum += e;
            }
            memset(row, 0, sizeof(float) * e0);
            memset(row + e1, 0, sizeof(float) * (nc - e1));
            float total = 0.0f;
            for (int e = 0; e < 8; e++) total += sum[e];
            if (mnew != m[r]) {
                const float alpha = expf(m[r] - mnew); /* 0 for the first keys the row sees */
                l[r] *= alpha;
                for (int64_t d = 0; d < D; d += 8) *(v8 *)(o + r * D + d) *= alpha;
                m[r] = mnew;
            }
            l[r] += total;
        }
        matmul(s, BK, vg + kb * vs_t, vs_t, o, D, nq, D, nk, 1, first - kb, 'K');
    }
    for (int64_t r = 0; r < nq; r++) {
        const float inv = 1.0f / l[r];
        float *dst = out + ((i0 + r) * H + h) * D;
        for (int64_t d = 0; d < D; d += 8) *(v8 *)(dst + d) = *(const v8 *)(o + r * D + d) * inv;
    }
}

void ember_prefill_attention(const float *q, int64_t qs_t, int64_t qs_h, const float *k, int64_t ks_t, int64_t ks_h,
                             const float *v, int64_t vs_t, int64_t vs_h, int64_t T, int64_t S, int64_t H, int64_t Hkv,
                             int64_t D, int64_t pos0, int64_t window, float scale, float *scratch, int64_t threads,
                             float *out) {
    const int64_t Sp = round8(S), rep = H / Hkv, blocks = (T + BQ - 1) / BQ, tasks = blocks * H;
    const int64_t kchunks = (S + BK - 1) / BK;
    float *kt = scratch, *works = scratch + Hkv * D * Sp;
    (void)threads;
#pragma omp parallel num_threads(threads) if (threads > 1 && T * (pos0 + T) * H * D >= (1 << 20))
    {
#ifdef _OPENMP
        float *work = works + (int64_t)omp_get_thread_num() * work_floats(D);
#else
        float *work = works;
#endif
        /* kt[g][d][j] = k[j][g][d], zero past S (the score tile's columns come in eights) */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < Hkv * kchunks; t++) {
            const int64_t g = t / kchunks, j0 = t % kchunks * BK;
            const int64_t j1 = j0 + BK < Sp ? j0 + BK : Sp;
            float *dst = kt + g * D * Sp;
            for (int64_t j = j0; j < j1; j += 8) /* eight keys at a time: 32-byte writes */
                for (int64_t d = 0; d < D; d++)
                    for (int64_t i = 0; i < 8; i++)
                        dst[d * Sp + j + i] = j + i < S ? k[(j + i) * ks_t + g * ks_h + d] : 0.0f;
        }
        /* The last query blocks see the most keys: they go first, so the threads end together. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t b = blocks - 1 - t / H, h = t % H, i0 = b * BQ;
            const int64_t nq = T - i0 < BQ ? T - i0 : BQ;
            query_block(q, qs_t, qs_h, kt, Sp, v, vs_t, vs_h, h, h / rep, i0, nq, D, H, pos0, window, scale, work,
                        out);
        }
    }
}
