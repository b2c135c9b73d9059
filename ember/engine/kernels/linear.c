/* Linear layers over a few rows for decode on CPU (fp32): ember/engine/native.py builds and
 * loads this file; ember/engine/weight_layout.py's DecodeLinear calls it.
 *
 *   y (M, N) = x (M, K) @ W (N, K)^T + bias      W row-major contiguous; bias may be NULL
 *
 * Why native code: a decode step multiplies a few rows (one per running sequence) by weights
 * that are read from memory once per step and never stay in cache. BLAS packs each weight
 * panel before it multiplies, which costs a full read of the weight before any arithmetic
 * starts; at 8-64 rows that halves its speed (measured for the bench-50m layers streamed from
 * DRAM, one thread: 29 / 44 / 61 / 75 GFLOP/s at 8 / 16 / 32 / 64 rows; here 62 / 85 / 88 / 89).
 * Here the weight is read in place, each cache line once, prefetched while the previous
 * tile computes.
 *
 * Two strategies:
 *   one row    dot products of x with four weight rows at a time, vectorised along k, each
 *              step prefetching one cache line of each row 32 rows ahead: bound by memory
 *              bandwidth (~20 GB/s on one core of the development machine);
 *   2+ rows    x is transposed once into xt (K, Mp), Mp = M rounded up to 8 (zero padding),
 *              so that for each k a vector of 8 rows' x[., k] is one load; a tile of NR
 *              weight rows by up to MV*8 x rows keeps NR*MV vector accumulators in
 *              registers, multiplying each broadcast W[n, k] into them (no horizontal sums).
 *              Weight tiles go outermost: a tile is read from DRAM once and reused from L1 for
 *              every block of rows; while the first block computes, the next tile is prefetched
 *              one cache line per weight row every 16 k.
 * The several-row kernel adds over k in order, in fp32, as BLAS's microkernels do; the one-row
 * kernel adds eight interleaved partial sums. Output columns are spread over torch's OpenMP
 * threads (ember/engine/native.py links the same runtime), so the threads read disjoint parts
 * of the weight and the results do not depend on the thread count; small products stay on one
 * thread.
 */
#include <stdint.h>

#include "kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* aligned(4): unaligned loads */

/* ---- one row ------------------------------------------------------------------------------ */
#define ROWS 4    /* weight rows per pass: four dot products side by side, one x read */
#define AHEAD 32  /* prefetch distance in weight rows (16-44 KiB at the small model's widths) */

static inline float hsum(v8 a) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += a[i];
    return s;
}

/* Below this many multiply-adds a product stays on one thread: waking the others costs more. */
#define PARALLEL_MIN (1 << 18)

static void matvec(const float *x, const float *W, const float *bias, float *y, int64_t N, int64_t K) {
    const int64_t groups = N / ROWS, tail = N % ROWS != 0;
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < groups + tail; gi++) {
        const int64_t o = gi * ROWS;
        if (gi == groups) { /* the last N % ROWS rows */
            for (int64_t r = o; r < N; r++) {
                float a = 0.0f;
                for (int64_t i = 0; i < K; i++) a += x[i] * W[r * K + i];
                y[r] = bias ? a + bias[r] : a;
            }
            continue;
        }
        const float *w = W + o * K;
        const float *pf = o + AHEAD + ROWS <= N ? w + AHEAD * K : 0;
        v8 acc[ROWS];
        for (int j = 0; j < ROWS; j++) acc[j] = (v8){0};
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) { /* one cache line of each row, and one of each row ahead */
            if (pf)
                for (int j = 0; j < ROWS; j++) __builtin_prefetch(pf + j * K + k, 0, 2);
            const v8 x0 = *(const v8 *)(x + k), x1 = *(const v8 *)(x + k + 8);
            for (int j = 0; j < ROWS; j++)
                acc[j] += x0 * *(const v8 *)(w + j * K + k) + x1 * *(const v8 *)(w + j * K + k + 8);
        }
        for (int j = 0; j < ROWS; j++) {
            float a = hsum(acc[j]);
            for (int64_t t = k; t < K; t++) a += x[t] * w[j * K + t];
            y[o + j] = bias ? a + bias[o + j] : a;
        }
    }
}

/* ---- several rows --------------------------------------------------------------------------- */
/* 6 x 2 accumulators + 2 x vectors + 1 broadcast = 15 of AVX2's 16 vector registers. */
#define NR EMBER_PANEL_ROWS  /* weight rows per tile (6) */
#define MV 2  /* vectors of 8 x rows per tile */

/* One tile: y[m0 .. m0 + 8 mv) x [n .. n + nr) with w = W + n K, y and bias already offset by n.
 * nr and mv are constants at every call site, so each case compiles to its own unrolled loop.
 * pf: the next weight tile, prefetched during this one (NULL: none). */
static inline __attribute__((always_inline)) void tile(const float *xt, int64_t Mp, const float *w,
                                                         const float *bias, int64_t K, float *y, int64_t N,
                                                         int64_t m0, int64_t M, const float *pf, const int nr,
                                                         const int mv) {
    v8 acc[NR][MV];
#pragma GCC unroll 8
    for (int j = 0; j < nr; j++)
#pragma GCC unroll 4
        for (int v = 0; v < mv; v++) acc[j][v] = (v8){0};
    const float *xp = xt + m0;
    for (int64_t k0 = 0; k0 < K; k0 += 16) { /* 16 floats: one cache line of each weight row */
        if (pf)
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) __builtin_prefetch(pf + j * K + k0, 0, 2);
        const int64_t k1 = k0 + 16 < K ? k0 + 16 : K;
        for (int64_t k = k0; k < k1; k++, xp += Mp) {
            v8 xv[MV];
#pragma GCC unroll 4
            for (int v = 0; v < mv; v++) xv[v] = *(const v8 *)(xp + 8 * v);
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) {
                const float a = w[j * K + k];
#pragma GCC unroll 4
                for (int v = 0; v < mv; v++) acc[j][v] += a * xv[v];
            }
        }
    }
    for (int j = 0; j < nr; j++)
        for (int v = 0; v < mv; v++)
            for (int l = 0; l < 8; l++) {
                const int64_t m = m0 + 8 * v + l;
                if (m < M) y[m * N + j] = bias ? acc[j][v][l] + bias[j] : acc[j][v][l];
            }
}

#define TILE(a, b) \
    case (a) * 16 + (b): tile(xt, Mp, w, bias ? bias + n : 0, K, y + n, N, m, M, pf, a, b); break;

void ember_transpose_rows_team(const float *x, int64_t M, int64_t K, int64_t Mp, float *xt) {
    /* Split over the team too: on one thread it was ~4% of a 64-row decode step's products. */
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; k++)
        for (int64_t m = 0; m < Mp; m++) xt[k * Mp + m] = m < M ? x[m * K + k] : 0.0f;
}

static void tiled(const float *x, const float *W, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                  float *xt) {
    const int64_t Mp = (M + 7) / 8 * 8;
    const int64_t tiles = (N + NR - 1) / NR;
    ember_transpose_rows_team(x, M, K, Mp, xt);
    /* Static: each thread gets one contiguous run of tiles, which its prefetches follow. */
#pragma omp for schedule(static)
    for (int64_t ti = 0; ti < tiles; ti++) {
        const int64_t n = ti * NR;
        const int nr = N - n < NR ? (int)(N - n) : NR;
        const float *w = W + n * K;
        for (int64_t m = 0; m < Mp; m += 8 * MV) {
            const int mv = (Mp - m) / 8 < MV ? (int)((Mp - m) / 8) : MV;
            const float *pf = (m == 0 && n + 2 * NR <= N) ? w + NR * K : 0;
            switch (nr * 16 + mv) {
                TILE(1, 1) TILE(2, 1) TILE(3, 1) TILE(4, 1) TILE(5, 1) TILE(6, 1)
                TILE(1, 2) TILE(2, 2) TILE(3, 2) TILE(4, 2) TILE(5, 2) TILE(6, 2)
            }
        }
    }
}

/* y[., 0 .. nr) for all M rows from nr <= NR weight rows w (row stride K) already in cache: the
 * tiles above without prefetch, for quant_linear.c, which dequantizes a panel of a quantized
 * weight into fp32 and multiplies it here. xt as in tiled (K, Mp); y and bias offset to the
 * panel's first output; row stride of y is N. */
void ember_linear_panel(const float *xt, int64_t Mp, int64_t M, const float *w, const float *bias, int64_t K,
                        float *y, int64_t N, int nr) {
    const int64_t n = 0;
    const float *pf = 0;
    for (int64_t m = 0; m < Mp; m += 8 * MV) {
        const int mv = (Mp - m) / 8 < MV ? (int)((Mp - m) / 8) : MV;
        switch (nr * 16 + mv) {
            TILE(1, 1) TILE(2, 1) TILE(3, 1) TILE(4, 1) TILE(5, 1) TILE(6, 1)
            TILE(1, 2) TILE(2, 2) TILE(3, 2) TILE(4, 2) TILE(5, 2) TILE(6, 2)
        }
    }
}

/* The product on the calling team: every thread of the enclosing parallel region must call it
 * (outside one, the calling thread computes it all). decode_layer.c calls it from its region. */
void ember_linear_team(const float *x, const float *W, const float *bias, float *y, int64_t M, int64_t N,
                       int64_t K, float *xt) {
    if (M == 1)
        matvec(x, W, bias, y, N, K);
    else
        tiled(x, W, bias, y, M, N, K, xt);
}

/* xt: scratch of K * ((M + 7) / 8 * 8) floats (unused for M == 1). */
void ember_linear(const float *x, const float *W, const float *bias, float *y, int64_t M, int64_t N,
                  int64_t K, float *xt) {
#pragma omp parallel if (M * N * K >= PARALLEL_MIN)
    ember_linear_team(x, W, bias, y, M, N, K, xt);
}

/* Threads a parallel kernel uses: the OpenMP pool's size (torch.set_num_threads sets it), 1
 * without OpenMP. */
int ember_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
