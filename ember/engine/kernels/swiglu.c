/* SwiGLU's activation on CPU (fp32) for the engine: ember/engine/native.py builds and loads this
 * file; ember/engine/weight_layout.py's DecodeMLP calls it between the fused gate|up projection
 * and the down projection. PyTorch computes silu(gate) * up as two operators and a temporary
 * (~60 us a layer at 64 decode rows, ~1 ms at 512 prefill rows, two threads); here one pass
 * reads the projection's two halves in place.
 *
 *   out (N, I) = gate * sigmoid(gate) * up      gate, up (N, I) rows strided by `stride`
 */
#include <stdint.h>

#include "vexp.h"

/* On the calling team (see ember_linear_team in linear.c); ember_silu_mul below opens one. */
void ember_silu_mul_team(const float *gate, const float *up, int64_t N, int64_t I, int64_t stride, float *out) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *g = gate + i * stride, *u = up + i * stride;
        float *o = out + i * I;
        int64_t j = 0;
        for (; j + 8 <= I; j += 8) {
            vexp_f8 gv, uv;
            __builtin_memcpy(&gv, g + j, sizeof gv);
            __builtin_memcpy(&uv, u + j, sizeof uv);
            const vexp_f8 r = gv / (1.0f + vexp8(-gv)) * uv;
            __builtin_memcpy(o + j, &r, sizeof r);
        }
        for (; j < I; j++) {
            vexp_f8 gv = (vexp_f8){0} + g[j];
            o[j] = g[j] / (1.0f + vexp8(-gv)[0]) * u[j];
        }
    }
}

void ember_silu_mul(const float *gate, const float *up, int64_t N, int64_t I, int64_t stride, float *out) {
#pragma omp parallel if (N * I >= (1 << 17))
    ember_silu_mul_team(gate, up, N, I, stride, out);
}
