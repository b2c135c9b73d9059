/* Matrix-vector products for decode on CPU (fp32): ember/engine/native.py builds and loads
 * this file; ember/engine/weight_layout.py's DecodeLinear calls it for a linear layer applied to a few rows.
 *
 * Why native code: at decode shapes a linear layer is bound by streaming its weight from
 * memory. BLAS's gemv reaches about half the copy bandwidth on the development machine for
 * the row lengths of a small model (512-1408 floats); reading two rows at a time while
 * prefetching 16 KiB ahead of the stream reaches 20-25 GB/s (ember/engine/weight_layout.py
 * has the measurements).
 *
 *   y (B, N) = x (B, K) @ W (N, K)^T + bias      W row-major contiguous; bias may be NULL
 */
#include <stdint.h>

#define ROWS 2                    /* weight rows per pass: two streams, one x read */
#define AHEAD_FLOATS (16 * 256)   /* prefetch distance: 16 KiB ahead of the rows being read */

void ember_gemv(const float *x, const float *W, const float *bias, float *y, int64_t B, int64_t N,
                int64_t K) {
    const float *end = W + N * K;
    int64_t o = 0;
    for (; o + ROWS <= N; o += ROWS) {
        const float *w = W + o * K;
        const float *ahead = w + AHEAD_FLOATS;
        for (int64_t i = 0; i < ROWS * K && ahead + i < end; i += 16) __builtin_prefetch(ahead + i, 0, 0);
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * K;
            float a0 = 0.0f, a1 = 0.0f;
            for (int64_t i = 0; i < K; i++) {
                a0 += xb[i] * w[i];
                a1 += xb[i] * w[K + i];
            }
            y[b * N + o] = a0;
            y[b * N + o + 1] = a1;
        }
    }
    for (; o < N; o++) {
        const float *w = W + o * K;
        for (int64_t b = 0; b < B; b++) {
            float a = 0.0f;
            for (int64_t i = 0; i < K; i++) a += x[b * K + i] * w[i];
            y[b * N + o] = a;
        }
    }
    if (bias != 0)
        for (int64_t b = 0; b < B; b++)
            for (int64_t n = 0; n < N; n++) y[b * N + n] += bias[n];
}
