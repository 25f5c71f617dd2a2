/* Register-tiled products of small matrices, shared by cormlm's attention kernels (decode over
 * a block pool, paged_kernel.c; a whole prompt, prompt_attention.c): each tile keeps its
 * accumulators in registers and loads each row of the right-hand matrix once for all its rows.
 * Included after native_vectors.h (through the -I that cormlm.native passes; part of every
 * kernel's build key). */
#ifndef CORMLM_NATIVE_TILES_H
#define CORMLM_NATIVE_TILES_H

#include <stdint.h>
#include <string.h>

#include "native_vectors.h"

#define GT 4 /* rows of the left-hand matrix (queries, probabilities) per register tile */
#define CT 4 /* column vectors per register tile */
/* column vectors of keys per score tile: with AVX-512's 32 vector registers, a 64-slot block's
 * scores in one tile (GT x 4 accumulators, 4 key vectors, the broadcast query: <= 21); 8-lane
 * vectors (16 registers) keep two */
#if VW == 16
#define JT 4
#else
#define JT 2
#endif
#define DT 4 /* column vectors of the head per value tile */
#define LINE (64 / (int)sizeof(float))
#define INLINE static inline __attribute__((always_inline))

/* out[g][c] = sum over r of a[g][r] * m[r][c], for GN rows of a and CN vectors of columns: a
 * block's scores (a: the group's queries, m: its keys [D, BS]) and its weighted values (a: the
 * probabilities, m: its values [BS, D]) are this one product. GN * CN accumulators in
 * registers, each row of m loaded once for all GN rows of a. ``next`` (or NULL): the same
 * columns of the thread's next block, asked for from memory row by row while this one is
 * computed (a block is a short stream, which the hardware prefetcher only learns late), into
 * the L2: on a Zen 4 EPYC 1.08x faster than into the L1 over 16-slot blocks (64-slot: the
 * same), on a Zen 5 one the same. */
INLINE void tile(const float *restrict a, int64_t lda, const float *restrict m, int64_t ldm, int64_t R,
                 float *restrict out, int64_t ldo, const float *next, const int GN, const int CN) {
    vf acc[GT][CT];
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < CN; c++) acc[g][c] = (vf){0};
    for (int64_t r = 0; r < R; r++) {
        vf mv[CT];
        for (int c = 0; c < CN; c++) memcpy(&mv[c], m + r * ldm + c * VW, sizeof(vf));
        if (next)
            for (int c = 0; c < CN * VW; c += LINE) __builtin_prefetch(next + r * ldm + c, 0, 2);
        for (int g = 0; g < GN; g++) {
            const vf ag = (vf){0} + a[g * lda + r];
            for (int c = 0; c < CN; c++) acc[g][c] += ag * mv[c];
        }
    }
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < CN; c++) memcpy(out + g * ldo + c * VW, &acc[g][c], sizeof(vf));
}

/* One function per tile shape, so that each tile's accumulators are registers. */
typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, int64_t, float *, int64_t, const float *);
#define TILE(GN, CN)                                                                                             \
    static void tile_##GN##_##CN(const float *a, int64_t lda, const float *m, int64_t ldm, int64_t R, float *out, \
                                 int64_t ldo, const float *next) { tile(a, lda, m, ldm, R, out, ldo, next, GN, CN); }
TILE(1, 1) TILE(1, 2) TILE(1, 3) TILE(1, 4) TILE(2, 1) TILE(2, 2) TILE(2, 3) TILE(2, 4)
TILE(3, 1) TILE(3, 2) TILE(3, 3) TILE(3, 4) TILE(4, 1) TILE(4, 2) TILE(4, 3) TILE(4, 4)
static const tile_fn TILES[GT][CT] = {{tile_1_1, tile_1_2, tile_1_3, tile_1_4}, {tile_2_1, tile_2_2, tile_2_3, tile_2_4},
                                      {tile_3_1, tile_3_2, tile_3_3, tile_3_4}, {tile_4_1, tile_4_2, tile_4_3, tile_4_4}};

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* out [G, C] = a [G, R] @ m [R, C] (rows lda, ldm, ldo apart): register tiles of up to GT rows
 * and ``cmax`` column vectors where the columns are whole vectors (the usual block and head
 * sizes), a plain loop otherwise. ``next``: see tile. */
static void product(const float *restrict a, int64_t lda, const float *restrict m, int64_t ldm, int64_t R, int64_t C,
                    float *restrict out, int64_t ldo, int64_t G, int64_t cmax, const float *next) {
    if (C % VW == 0) {
        for (int64_t g0 = 0; g0 < G; g0 += GT)
            for (int64_t c0 = 0; c0 < C; c0 += cmax * VW)
                TILES[min64(G - g0, GT) - 1][min64((C - c0) / VW, cmax) - 1](
                    a + g0 * lda, lda, m + c0, ldm, R, out + g0 * ldo + c0, ldo, g0 == 0 && next ? next + c0 : NULL);
        return;
    }
    for (int64_t g = 0; g < G; g++) {
        float *restrict o = out + g * ldo;
        for (int64_t c = 0; c < C; c++) o[c] = 0.0f;
        for (int64_t r = 0; r < R; r++) {
            const float w = a[g * lda + r];
            const float *restrict row = m + r * ldm;
            for (int64_t c = 0; c < C; c++) o[c] += w * row[c];
        }
    }
}

#endif
