/* exp of eight floats at once, for the kernels' softmax and SiLU (the C library's expf is
 * scalar). Cephes' method: exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 with ln 2
 * split in two parts so r keeps its precision, exp(r) a polynomial on |r| <= ln(2) / 2: within
 * 1 ulp of exp over [-87, 88] (measured). Above 88.7: inf; below -87.3 (subnormal results): 0;
 * NaN stays NaN. */
#ifndef EMBER_VEXP_H
#define EMBER_VEXP_H

#include <stdint.h>

typedef float vexp_f8 __attribute__((vector_size(32)));
typedef int32_t vexp_i8 __attribute__((vector_size(32)));

/* The kernels are built with -fassociative-math, which would let the compiler fold the two
 * parts of ln 2 back into one: an empty asm makes the intermediate opaque. */
#if defined(__x86_64__) || defined(__i386__)
#define VEXP_OPAQUE(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__)
#define VEXP_OPAQUE(v) __asm__("" : "+w"(v))
#else
#define VEXP_OPAQUE(v) __asm__("" : "+g"(v))
#endif

static inline vexp_f8 vexp_select(vexp_i8 mask, vexp_f8 a, vexp_f8 b) {
    return (vexp_f8)((mask & (vexp_i8)a) | (~mask & (vexp_i8)b));
}

static inline vexp_f8 vexp8(vexp_f8 x) {
    const vexp_f8 hi = (vexp_f8){0} + 88.7228317f, lo = (vexp_f8){0} - 87.3365478f;
    const vexp_i8 nan = x != x, tiny = x < lo;
    x = vexp_select((x < hi) | nan, x, hi);
    x = vexp_select((x > lo) | nan, x, lo);
    /* x / ln 2 >= -126: + 127.5 then truncation is round-half-up */
    const vexp_i8 ni = __builtin_convertvector(x * 1.44269504088896341f + 127.5f, vexp_i8) - 127;
    const vexp_f8 n = __builtin_convertvector(ni, vexp_f8);
    vexp_f8 r = x - n * 0.693359375f;
    VEXP_OPAQUE(r);
    r = r + n * 2.12194440e-4f;
    vexp_f8 p = (vexp_f8){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return vexp_select(tiny, (vexp_f8){0}, p * (vexp_f8)((ni + 127) << 23));
}

#endif
