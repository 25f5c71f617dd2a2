/* What cormlm's C kernels share: the machine's float vector (GCC/Clang vector extensions that
 * -march=native maps to AVX-512, AVX2 or NEON), a way to keep a loaded vector in a register,
 * and the sum of a vector's lanes.
 * Included through the -I that cormlm.native passes; part of every kernel's build key. */
#ifndef CORMLM_NATIVE_VECTORS_H
#define CORMLM_NATIVE_VECTORS_H

#include <string.h>

#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));
typedef float vf8 __attribute__((vector_size(32), aligned(4)));
typedef float vf4 __attribute__((vector_size(16), aligned(4)));

/* Keeps a loaded vector in a register: without it the compiler may fold the load into each
 * multiply-add that uses it, and a kernel that reuses the vector becomes bound by loads. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

/* the lanes' sum by halving (a shuffle tree, not a chain of VW scalar adds) */
static inline float lane_sum(vf v) {
#if VW == 16
    vf8 a, b;
    memcpy(&a, &v, 32);
    memcpy(&b, (const char *)&v + 32, 32);
    a += b;
#else
    vf8 a = v;
#endif
    vf4 c, d;
    memcpy(&c, &a, 16);
    memcpy(&d, (const char *)&a + 16, 16);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

#endif
