/* What cormlm's C kernels share: the machine's float vector (GCC/Clang vector extensions that
 * -march=native maps to AVX-512, AVX2 or NEON) and a way to keep a loaded vector in a register.
 * Included through the -I that cormlm.native passes; part of every kernel's build key. */
#ifndef CORMLM_NATIVE_VECTORS_H
#define CORMLM_NATIVE_VECTORS_H

#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));

/* Keeps a loaded vector in a register: without it the compiler may fold the load into each
 * multiply-add that uses it, and a kernel that reuses the vector becomes bound by loads. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

#endif
