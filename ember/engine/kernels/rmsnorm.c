/* RMSNorm on CPU (fp32) for the engine: ember/engine/native.py builds and loads this file;
 * ember/engine/weight_layout.py's DecodeRMSNorm calls it. PyTorch's rms_norm is several
 * operators with temporaries: on rows of 512 values, 11 / 29 / 179 us at 1 / 64 / 512 rows
 * against 1.2 / 7 / 35 us here (two threads). Rows are spread over torch's OpenMP threads when
 * there are many.
 *
 *   y (B, D) = x (B, D) * rsqrt(mean(x^2) + eps) * weight (D)
 */
#include <math.h>
#include <stdint.h>

/* On the calling team (see ember_linear_team in linear.c); ember_rms_norm below opens one. */
void ember_rms_norm_team(const float *x, const float *weight, float *y, int64_t B, int64_t D, float eps) {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * D;
        float *yb = y + b * D;
        float ss = 0.0f;
        for (int64_t i = 0; i < D; i++) ss += xb[i] * xb[i];
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++) yb[i] = xb[i] * inv * weight[i];
    }
}

void ember_rms_norm(const float *x, const float *weight, float *y, int64_t B, int64_t D, float eps) {
#pragma omp parallel if (B * D >= (1 << 17))
    ember_rms_norm_team(x, weight, y, B, D, eps);
}
