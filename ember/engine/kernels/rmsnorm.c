/* RMSNorm of a few rows for decode on CPU (fp32): ember/engine/native.py builds and loads this
 * file; ember/engine/weight_layout.py's DecodeRMSNorm calls it. At batch 1 PyTorch's rms_norm
 * spends ~10-25 us in dispatch and temporaries on 512 values; this takes ~1 us.
 *
 *   y (B, D) = x (B, D) * rsqrt(mean(x^2) + eps) * weight (D)
 */
#include <math.h>
#include <stdint.h>

void ember_rms_norm(const float *x, const float *weight, float *y, int64_t B, int64_t D, float eps) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * D;
        float *yb = y + b * D;
        float ss = 0.0f;
        for (int64_t i = 0; i < D; i++) ss += xb[i] * xb[i];
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++) yb[i] = xb[i] * inv * weight[i];
    }
}
