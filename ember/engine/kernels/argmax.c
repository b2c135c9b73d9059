/* Row-wise argmax on CPU (fp32) for the engine's greedy sampling: ember/engine/native.py builds
 * and loads this file; ember/engine/sampler.py calls it. PyTorch's argmax over 64 rows of a
 * 32,000-token vocabulary took ~0.9 ms (2 threads), longer than the rest of the sampler; here a
 * vectorised max then a vectorised scan for its first occurrence.
 *
 * Same answer as torch.argmax: the first index of the maximum, or the first NaN if a row has one.
 */
#include <stdint.h>

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* aligned(4): unaligned loads */
typedef int32_t i8v __attribute__((vector_size(32)));

static inline v8 vmax(v8 a, v8 m) {
    const i8v gt = a > m; /* a NaN never wins a comparison: the caller looks for NaN separately */
    return (v8)((gt & (i8v)a) | (~gt & (i8v)m));
}

static inline int any(i8v m) {
    int r = 0;
    for (int j = 0; j < 8; j++) r |= m[j] != 0;
    return r;
}

/* First k in [i, V) with x[k] == target (or x[k] is NaN if nan), eight at a time. */
static int64_t first_match(const float *x, int64_t V, float target, int nan) {
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {
        const v8 a = *(const v8 *)(x + i);
        if (any(nan ? a != a : a == target)) break;
    }
    for (; i < V; i++)
        if (nan ? x[i] != x[i] : x[i] == target) return i;
    return 0;
}

static int64_t argmax_row(const float *x, int64_t V) {
    int64_t i = 0;
    float best = x[0];
    int nan = x[0] != x[0];
    if (V >= 32) {
        /* four independent maxima: one chain of compare-and-select would bound the loop by latency */
        v8 m0 = *(const v8 *)x, m1 = m0, m2 = m0, m3 = m0;
        i8v isnan = {0};
        for (; i + 32 <= V; i += 32) {
            const v8 a0 = *(const v8 *)(x + i), a1 = *(const v8 *)(x + i + 8);
            const v8 a2 = *(const v8 *)(x + i + 16), a3 = *(const v8 *)(x + i + 24);
            m0 = vmax(a0, m0);
            m1 = vmax(a1, m1);
            m2 = vmax(a2, m2);
            m3 = vmax(a3, m3);
            isnan |= (a0 != a0) | (a1 != a1) | (a2 != a2) | (a3 != a3);
        }
        const v8 m = vmax(vmax(m0, m1), vmax(m2, m3));
        for (int j = 0; j < 8; j++) best = m[j] > best ? m[j] : best;
        nan |= any(isnan);
    }
    for (; i < V; i++) {
        nan |= x[i] != x[i];
        best = x[i] > best ? x[i] : best;
    }
    return first_match(x, V, best, nan);
}

void ember_argmax_rows(const float *x, int64_t R, int64_t V, int64_t *out) {
#pragma omp parallel for schedule(static) if (R * V >= (1 << 18))
    for (int64_t r = 0; r < R; r++) out[r] = argmax_row(x + r * V, V);
}
