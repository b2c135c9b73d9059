/* The kernels' entry points for decode_layer.c, which runs them on one team of threads.
 *
 * A `_team` function (and ember_kv_write) shares its loops over the threads of the enclosing
 * OpenMP parallel region: every thread of the team must call it, and it returns after a barrier,
 * its results complete. Called outside a region, the calling thread does all the work. The
 * plain functions (what Python calls through ctypes, ember/engine/native.py) open a region of
 * torch's threads around the same code, so both give the same results. */
#ifndef EMBER_KERNELS_H
#define EMBER_KERNELS_H

#include <stdint.h>

/* Weight rows of linear.c's tiles, the most ember_linear_panel takes. */
#define EMBER_PANEL_ROWS 6

void ember_linear_team(const float *x, const float *W, const float *bias, float *y, int64_t M, int64_t N,
                       int64_t K, float *xt);
/* x (M, K) -> xt (K, Mp), rows past M zero: the layout linear.c's tiles read x in. */
void ember_transpose_rows_team(const float *x, int64_t M, int64_t K, int64_t Mp, float *xt);
void ember_linear_panel(const float *xt, int64_t Mp, int64_t M, const float *w, const float *bias, int64_t K,
                        float *y, int64_t N, int nr);
int64_t ember_qlinear_scratch(int64_t M, int64_t K, int64_t threads);
void ember_qlinear_team(int64_t fmt, const uint8_t *W, const float *rscale, const float *bias, const float *x,
                        float *y, int64_t ldy, int64_t M, int64_t N, int64_t K, float *scratch);
void ember_rms_norm_team(const float *x, const float *weight, float *y, int64_t B, int64_t D, float eps);
void ember_rope_team(const float *restrict x, int64_t N, int64_t H, int64_t D, int64_t sn, int64_t sh,
                     const float *restrict cos, const float *restrict sin, float *restrict out);
void ember_kv_write(void *pool, const float *src, const int64_t *rows, int64_t N, int64_t Hkv,
                    int64_t D, int64_t stride_n, int64_t stride_h, int64_t kind);
void ember_paged_decode_team(const float *q, const void *k, const void *v, const int64_t *tables,
                             const int64_t *lens, int64_t B, int64_t W, int64_t H, int64_t Hkv,
                             int64_t D, int64_t bs, float scale, int64_t window, float *scratch_all,
                             int64_t kind, float *out);
void ember_silu_mul_team(const float *gate, const float *up, int64_t N, int64_t I, int64_t stride, float *out);

#endif
