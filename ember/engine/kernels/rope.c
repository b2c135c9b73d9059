/* Rotary position embedding on CPU (fp32) for the engine: ember/engine/native.py builds and
 * loads this file; ember/engine/weight_layout.py's DecodeAttention calls it on every layer's
 * queries and keys. PyTorch's version (ember/model/rope.py: x * cos + roll(x) * sin) is four
 * operators with three temporaries per tensor, ~40 us a layer at 64 decode rows; here one pass
 * reads the strided views the fused q|k|v projection leaves and writes contiguous results.
 *
 *   x   (N, H, D) fp32, element (i, h, d) at x[i * sn + h * sh + d]
 *   cos, sin  (N, D) contiguous, from rope_cos_sin: sin's first half is negated, so with
 *             half = D / 2 the rotation is
 *             out[d] = x[d] * cos[d] + x[d + half] * sin[d]          d <  half
 *             out[d] = x[d] * cos[d] + x[d - half] * sin[d]          d >= half
 *   out (N, H, D) contiguous
 */
#include <stdint.h>

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* aligned(4): unaligned loads */

/* On the calling team (see ember_linear_team in linear.c); ember_rope below opens one. */
void ember_rope_team(const float *restrict x, int64_t N, int64_t H, int64_t D, int64_t sn, int64_t sh,
                     const float *restrict cos, const float *restrict sin, float *restrict out) {
    const int64_t half = D / 2;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *c = cos + i * D, *s = sin + i * D;
        for (int64_t h = 0; h < H; h++) {
            const float *restrict xr = x + i * sn + h * sh;
            float *restrict o = out + (i * H + h) * D;
            int64_t d = 0;
            for (; half % 8 == 0 && d < half; d += 8) {
                const v8 lo = *(const v8 *)(xr + d), hi = *(const v8 *)(xr + d + half);
                *(v8 *)(o + d) = lo * *(const v8 *)(c + d) + hi * *(const v8 *)(s + d);
                *(v8 *)(o + d + half) = hi * *(const v8 *)(c + d + half) + lo * *(const v8 *)(s + d + half);
            }
            for (; d < half; d++) {
                o[d] = xr[d] * c[d] + xr[d + half] * s[d];
                o[d + half] = xr[d + half] * c[d + half] + xr[d] * s[d + half];
            }
        }
    }
}

void ember_rope(const float *restrict x, int64_t N, int64_t H, int64_t D, int64_t sn, int64_t sh,
                const float *restrict cos, const float *restrict sin, float *restrict out) {
#pragma omp parallel if (N * H * D >= (1 << 17))
    ember_rope_team(x, N, H, D, sn, sh, cos, sin, out);
}
