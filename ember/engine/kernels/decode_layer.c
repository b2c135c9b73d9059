/* One whole decoder layer of a decode-only step, in one call: ember/engine/native.py builds and
 * loads this file; ember/engine/fused_layer.py's DecodeBlock calls it once per layer, and its
 * DecodeStack calls ember_decode_layers (below) once per step for all the layers.
 *
 * Why: at batch 1 the layer's arithmetic is a few hundred microseconds of weight streaming,
 * and calling its twelve kernels from Python, each through the module tree, a ctypes call and
 * new result tensors, added ~0.18 ms a layer (~20 % of a bench-50m token). Here the same
 * kernels' code runs back to back on one team of threads, which stays awake between them,
 * on the same values as the module-by-module path: the results are bit-identical to it
 * (each output is computed by one thread, in the same order, whatever the split; tests
 * compare them).
 *
 *   out (M, D) = x + o(attention(rope(q), rope(k), v))         q|k|v = qkv(rmsnorm1(x)),
 *   out       += down(silu(gate) * up)                         gate|up = gu(rmsnorm2(out))
 *
 * Keys and values are written into the pool at slot_rows first; every query attends over its
 * own blocks (tables, lens: as ember_paged_decode).
 *
 * A quantized layer (quant != 0) multiplies by its seven projections through quant_linear.c
 * instead, q, k, v writing side by side into the q|k|v rows and gate, up into the gate|up rows,
 * so the steps between are the same.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

/* A quantized projection: its quant_linear.c format, blocks, I8 row scales, bias (NULL: none). */
struct ember_qproj {
    int64_t fmt;
    const uint8_t *w;
    const float *rscale, *bias;
};

enum { P_Q, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN };

/* A layer's weights (all fp32, row-major contiguous; a NULL bias is none) and shapes. The same
 * layout as ember/engine/native.py's LayerWeights. With quant != 0 the projections are proj[]
 * (q, k, v, o, gate, up, down; every input width a multiple of 32 unless I8) and wqkv .. bdown
 * are unused. */
struct ember_layer {
    const float *norm1, *wqkv, *bqkv, *wo, *bo, *norm2, *wgu, *bgu, *wdown, *bdown;
    int64_t D, H, Hkv, hd, I, window;
    float eps1, eps2, scale;
    int64_t quant;
    struct ember_qproj proj[7];
};

static int64_t max3(int64_t a, int64_t b, int64_t c) {
    const int64_t m = a > b ? a : b;
    return m > c ? m : c;
}

/* Floats of the `work` buffer ember_decode_layer needs for M rows (on the OpenMP pool's threads). */
int64_t ember_decode_layer_work(const struct ember_layer *L, int64_t M) {
    const int64_t qd = L->H * L->hd, kd = L->Hkv * L->hd, Mp = (M + 7) / 8 * 8, K = max3(L->D, qd, L->I);
#ifdef _OPENMP
    const int64_t threads = omp_get_max_threads();
#else
    const int64_t threads = 1;
#endif
    const int64_t scratch = L->quant ? ember_qlinear_scratch(M, K, threads) : K * Mp;
    return M * (L->D + (qd + 2 * kd) + qd + kd + qd + L->D + 2 * L->I + L->I) + (scratch > K * Mp ? scratch : K * Mp);
}

/* y (row stride ldy) = x (M, K) @ projection p (N outputs), on the calling team. */
static void qproj(const struct ember_qproj *p, const float *x, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                  float *scratch) {
    ember_qlinear_team(p->fmt, p->w, p->rscale, p->bias, x, y, ldy, M, N, K, scratch);
}

void ember_decode_layer(const struct ember_layer *L, const float *x, float *out, int64_t M, const float *cos,
                        const float *sin, void *kpool, void *vpool, const int64_t *slot_rows,
                        const int64_t *tables, const int64_t *lens, int64_t W, int64_t bs, int64_t kind,
                        float *scratch, int64_t threads, float *work) {
    const int64_t D = L->D, H = L->H, Hkv = L->Hkv, hd = L->hd, I = L->I;
    const int64_t qd = H * hd, kd = Hkv * hd, nqkv = qd + 2 * kd;
    float *h = work, *qkv = h + M * D, *q = qkv + M * nqkv, *k = q + M * qd, *att = k + M * kd,
          *proj = att + M * qd, *gu = proj + M * D, *act = gu + M * 2 * I, *xt = act + M * I;

    /* One team for the whole layer: each step below ends in a barrier, so its results are
     * complete before the next reads them. */
#pragma omp parallel num_threads(threads)
    {
        ember_rms_norm_team(x, L->norm1, h, M, D, L->eps1);
        if (L->quant) {
            qproj(&L->proj[P_Q], h, qkv, nqkv, M, qd, D, xt);
            qproj(&L->proj[P_K], h, qkv + qd, nqkv, M, kd, D, xt);
            qproj(&L->proj[P_V], h, qkv + qd + kd, nqkv, M, kd, D, xt);
        } else {
            ember_linear_team(h, L->wqkv, L->bqkv, qkv, M, nqkv, D, xt);
        }
        ember_rope_team(qkv, M, H, hd, nqkv, hd, cos, sin, q);
        ember_rope_team(qkv + qd, M, Hkv, hd, nqkv, hd, cos, sin, k);
        ember_kv_write(kpool, k, slot_rows, M, Hkv, hd, kd, hd, kind);
        ember_kv_write(vpool, qkv + qd + kd, slot_rows, M, Hkv, hd, nqkv, hd, kind);
        ember_paged_decode_team(q, kpool, vpool, tables, lens, M, W, H, Hkv, hd, bs, L->scale, L->window, scratch,
                                kind, att);
        if (L->quant)
            qproj(&L->proj[P_O], att, proj, D, M, D, qd, xt);
        else
            ember_linear_team(att, L->wo, L->bo, proj, M, D, qd, xt);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * D; i++) out[i] = x[i] + proj[i];

        ember_rms_norm_team(out, L->norm2, h, M, D, L->eps2);
        if (L->quant) {
            qproj(&L->proj[P_GATE], h, gu, 2 * I, M, I, D, xt);
            qproj(&L->proj[P_UP], h, gu + I, 2 * I, M, I, D, xt);
        } else {
            ember_linear_team(h, L->wgu, L->bgu, gu, M, 2 * I, D, xt);
        }
        ember_silu_mul_team(gu, gu + I, M, I, 2 * I, act);
        if (L->quant)
            qproj(&L->proj[P_DOWN], act, proj, D, M, D, I, xt);
        else
            ember_linear_team(act, L->wdown, L->bdown, proj, M, D, I, xt);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * D; i++) out[i] += proj[i];
    }
}

/* Layers layers[0 .. n-1] in turn (a model's stack for one decode step), then the final RMSNorm
 * (norm, eps; none if norm is NULL): x -> out, through a and b (M * D floats each) between
 * layers. Layer i uses the pool's layer layer_ids[i], whose keys start at pool + layer_ids[i] *
 * layer_bytes and values half a layer later. The same values as calling ember_decode_layer
 * for each and ember_rms_norm after: one call instead of n + 1 from Python. */
void ember_decode_layers(const struct ember_layer *const *layers, const int64_t *layer_ids, int64_t n,
                         const float *norm, float eps, const float *x, float *out, float *a, float *b, int64_t M,
                         const float *cos, const float *sin, char *pool, int64_t layer_bytes,
                         const int64_t *slot_rows, const int64_t *tables, const int64_t *lens, int64_t W,
                         int64_t bs, int64_t kind, float *scratch, int64_t threads, float *work) {
    const float *src = x;
    for (int64_t i = 0; i < n; i++) {
        float *dst = i == n - 1 && norm == 0 ? out : (i % 2 == 0 ? a : b);
        char *k = pool + layer_ids[i] * layer_bytes;
        ember_decode_layer(layers[i], src, dst, M, cos, sin, k, k + layer_bytes / 2, slot_rows, tables, lens, W,
                           bs, kind, scratch, threads, work);
        src = dst;
    }
    if (norm != 0) {
#pragma omp parallel num_threads(threads) if (M * layers[0]->D >= (1 << 17))
        ember_rms_norm_team(src, norm, out, M, layers[0]->D, eps);
    }
}
