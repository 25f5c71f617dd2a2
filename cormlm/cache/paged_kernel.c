/* Decode attention over a block pool in one pass over its keys and values (float32).
 *
 * The same computation as paged_attention.py's tensor operations (see that module for the
 * layout), fused: each block is scored against its stream's queries, exponentiated against
 * its own maximum and multiplied into the values while it is in cache; the per-stream
 * softmax is then assembled from the blocks' maxima and sums (the flash-decoding combine),
 * and the probabilities, when asked for, rescaled in place. Built and loaded at first use
 * by paged_kernel.py with the machine's C compiler; OpenMP threads are torch's own runtime.
 *
 * Built with -ffast-math (vectorised exp and reductions), so nothing here is infinite: a hidden
 * slot scores HIDDEN, whose exp is 0 against any visible maximum.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define HIDDEN (-FLT_MAX)

#include "native_vectors.h"

#define GT 4 /* queries of the group per register tile */
#define JT 2 /* vectors of keys per score tile */
#define DT 4 /* vectors of the head per value tile */
#define LINE (64 / (int)sizeof(float))
#define INLINE static inline __attribute__((always_inline))

/* Scores of GN queries against JN vectors of one block's keys [D, BS]: GN * JN accumulators in
 * registers, each key row loaded once for all GN queries. ``next`` (or NULL): the same columns
 * of the thread's next block, asked for from memory row by row while this one is computed
 * (a block is a short stream, which the hardware prefetcher only learns late). */
INLINE void score_tile(const float *restrict q, const float *restrict k, int64_t D, int64_t BS, float *restrict p,
                       const float *next, const int GN, const int JN) {
    vf acc[GT][JT];
    for (int g = 0; g < GN; g++)
        for (int j = 0; j < JN; j++) acc[g][j] = (vf){0};
    for (int64_t d = 0; d < D; d++) {
        vf kv[JT];
        for (int j = 0; j < JN; j++) memcpy(&kv[j], k + d * BS + j * VW, sizeof(vf));
        if (next)
            for (int j = 0; j < JN * VW; j += LINE) __builtin_prefetch(next + d * BS + j, 0, 3);
        for (int g = 0; g < GN; g++) {
            const vf qd = (vf){0} + q[g * D + d];
            for (int j = 0; j < JN; j++) acc[g][j] += qd * kv[j];
        }
    }
    for (int g = 0; g < GN; g++)
        for (int j = 0; j < JN; j++) memcpy(p + g * BS + j * VW, &acc[g][j], sizeof(vf));
}

/* GN queries' probability-weighted sums of DN vectors of one block's values [BS, D], each value
 * row loaded once for all GN queries; ``next`` as in score_tile. */
INLINE void value_tile(const float *restrict p, const float *restrict v, int64_t D, int64_t BS, float *restrict out,
                       const float *next, const int GN, const int DN) {
    vf acc[GT][DT];
    for (int g = 0; g < GN; g++)
        for (int e = 0; e < DN; e++) acc[g][e] = (vf){0};
    for (int64_t j = 0; j < BS; j++) {
        vf vv[DT];
        for (int e = 0; e < DN; e++) memcpy(&vv[e], v + j * D + e * VW, sizeof(vf));
        if (next)
            for (int e = 0; e < DN * VW; e += LINE) __builtin_prefetch(next + j * D + e, 0, 3);
        for (int g = 0; g < GN; g++) {
            const vf w = (vf){0} + p[g * BS + j];
            for (int e = 0; e < DN; e++) acc[g][e] += w * vv[e];
        }
    }
    for (int g = 0; g < GN; g++)
        for (int e = 0; e < DN; e++) memcpy(out + g * D + e * VW, &acc[g][e], sizeof(vf));
}

/* One function per tile shape, so that each tile's accumulators are registers. */
typedef void (*score_fn)(const float *, const float *, int64_t, int64_t, float *, const float *);
typedef void (*value_fn)(const float *, const float *, int64_t, int64_t, float *, const float *);
#define SCORE_TILE(GN, JN)                                                                                      \
    static void score_##GN##_##JN(const float *q, const float *k, int64_t D, int64_t BS, float *p,              \
                                  const float *next) { score_tile(q, k, D, BS, p, next, GN, JN); }
#define VALUE_TILE(GN, DN)                                                                                      \
    static void value_##GN##_##DN(const float *p, const float *v, int64_t D, int64_t BS, float *out,            \
                                  const float *next) { value_tile(p, v, D, BS, out, next, GN, DN); }
SCORE_TILE(1, 1) SCORE_TILE(1, 2) SCORE_TILE(2, 1) SCORE_TILE(2, 2)
SCORE_TILE(3, 1) SCORE_TILE(3, 2) SCORE_TILE(4, 1) SCORE_TILE(4, 2)
VALUE_TILE(1, 1) VALUE_TILE(1, 2) VALUE_TILE(1, 3) VALUE_TILE(1, 4)
VALUE_TILE(2, 1) VALUE_TILE(2, 2) VALUE_TILE(2, 3) VALUE_TILE(2, 4)
VALUE_TILE(3, 1) VALUE_TILE(3, 2) VALUE_TILE(3, 3) VALUE_TILE(3, 4)
VALUE_TILE(4, 1) VALUE_TILE(4, 2) VALUE_TILE(4, 3) VALUE_TILE(4, 4)
static const score_fn SCORES[GT][JT] = {{score_1_1, score_1_2}, {score_2_1, score_2_2},
                                        {score_3_1, score_3_2}, {score_4_1, score_4_2}};
static const value_fn VALUES[GT][DT] = {{value_1_1, value_1_2, value_1_3, value_1_4},
                                        {value_2_1, value_2_2, value_2_3, value_2_4},
                                        {value_3_1, value_3_2, value_3_3, value_3_4},
                                        {value_4_1, value_4_2, value_4_3, value_4_4}};

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Phase 1: block b's raw probabilities exp(score - block max) into p [G, BS], the block's max
 * and sum per query into bmax/bsum [G], and its weighted values into part [G, D]. Register
 * tiles where the block and the head are whole vectors (the usual sizes), plain loops
 * otherwise. next_k / next_v: the thread's next block (or NULL), fetched while this one runs. */
static void score_block(const float *restrict q, const float *restrict k, const float *restrict v,
                        const int32_t *restrict pos, int32_t q_pos, int64_t G, int64_t D, int64_t BS, float scale,
                        int64_t window, float *restrict p, float *restrict bmax, float *restrict bsum,
                        float *restrict part, const float *next_k, const float *next_v) {
    const int tiled = BS % VW == 0 && D % VW == 0;
    if (tiled) {
        for (int64_t g0 = 0; g0 < G; g0 += GT)
            for (int64_t j0 = 0; j0 < BS; j0 += JT * VW)
                SCORES[min64(G - g0, GT) - 1][min64((BS - j0) / VW, JT) - 1](
                    q + g0 * D, k + j0, D, BS, p + g0 * BS + j0, g0 == 0 && next_k ? next_k + j0 : NULL);
    } else {
        for (int64_t x = 0; x < G * BS; x++) p[x] = 0.0f;
        for (int64_t d = 0; d < D; d++) {  /* each key row read once for every query of the group */
            const float *restrict krow = k + d * BS;
            for (int64_t g = 0; g < G; g++) {
                const float qd = q[g * D + d];
                float *restrict pg = p + g * BS;
                for (int64_t j = 0; j < BS; j++) pg[j] += qd * krow[j];
            }
        }
    }
    const int32_t oldest = window > 0 ? (int32_t)(q_pos - window) : -1;  /* visible: oldest < position */
    for (int64_t g = 0; g < G; g++) {
        float *restrict pg = p + g * BS;
        float m = HIDDEN;
        for (int64_t j = 0; j < BS; j++) {
            const float x = (pos[j] >= 0 && pos[j] > oldest) ? pg[j] * scale : HIDDEN;
            pg[j] = x;
            m = x > m ? x : m;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < BS; j++) {  /* exp(HIDDEN - m) = 0: hidden slots weigh nothing */
            const float w = m == HIDDEN ? 0.0f : expf(pg[j] - m);
            pg[j] = w;
            sum += w;
        }
        bmax[g] = m;
        bsum[g] = sum;
    }
    if (tiled) {
        for (int64_t g0 = 0; g0 < G; g0 += GT)
            for (int64_t d0 = 0; d0 < D; d0 += DT * VW)
                VALUES[min64(G - g0, GT) - 1][min64((D - d0) / VW, DT) - 1](
                    p + g0 * BS, v + d0, D, BS, part + g0 * D + d0, g0 == 0 && next_v ? next_v + d0 : NULL);
    } else {
        for (int64_t g = 0; g < G; g++) {
            float *restrict acc = part + g * D;
            const float *restrict pg = p + g * BS;
            for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
            for (int64_t j = 0; j < BS; j++) {
                const float w = pg[j];
                const float *restrict vrow = v + j * D;
                for (int64_t d = 0; d < D; d++) acc[d] += w * vrow[d];
            }
        }
    }
}

/* What the kernel writes of the probabilities: nothing, each query's [NB,G,BS], or the group's
 * max or sum [NB,BS] (what a policy that reads the group through one of those needs: a third
 * of the bytes at G = 3, and no reduction pass of its own). */
enum { PROBS_NONE = 0, PROBS_HEADS = 1, PROBS_MAX = 2, PROBS_SUM = 3 };

/* q [S,G,D], keys [NB,D,BS], values [NB,BS,D], pos [NB,BS] (-1: empty), owner [NB] (-1: free),
 * q_pos [S]; window <= 0: none. Writes out [S,G,D]; probs [NB,G,BS] is scratch, and the
 * normalised probabilities for PROBS_HEADS; reduced [NB,BS] gets the group's max or sum for
 * PROBS_MAX / PROBS_SUM. work: NB*G*(D+3) floats. */
void cormlm_paged_decode_f32(const float *q, const float *keys, const float *values, const int32_t *pos,
                             const int64_t *owner, const int32_t *q_pos, int64_t S, int64_t G, int64_t D,
                             int64_t NB, int64_t BS, float scale, int64_t window, float *out, float *probs,
                             float *reduced, float *work, int probs_mode, int threads) {
    const int write_probs = probs_mode != PROBS_NONE;
    float *bmax = work, *bsum = work + NB * G, *coef = work + 2 * NB * G, *part = work + 3 * NB * G;
    int64_t owned = 0;
    for (int64_t b = 0; b < NB; b++) owned += owner[b] >= 0;
#pragma omp parallel num_threads(threads)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        /* the owned blocks split evenly between the threads, whatever their order: a pool takes
         * its lowest free blocks first, so its free ones gather at the end and an even split of
         * the block range would leave one thread most of the work */
        const int64_t first = owned * t / T, last = owned * (t + 1) / T;
        int64_t rank = 0, b = 0;
        for (; b < NB && rank < first; b++) rank += owner[b] >= 0;
        for (; b < NB && rank < last; b++) {
            const int64_t s = owner[b];
            if (s < 0) continue;
            rank++;
            int64_t next = b + 1;  /* the thread's next block, fetched while this one is computed */
            while (next < NB && owner[next] < 0) next++;
            const int has_next = next < NB && rank < last;
            score_block(q + s * G * D, keys + b * D * BS, values + b * BS * D, pos + b * BS, q_pos[s], G, D, BS,
                        scale, window, probs + b * G * BS, bmax + b * G, bsum + b * G, part + b * G * D,
                        has_next ? keys + next * D * BS : NULL, has_next ? values + next * BS * D : NULL);
        }
#pragma omp for schedule(static)
        for (int64_t f = 0; f < NB; f++) {  /* free blocks: nothing visible */
            if (owner[f] >= 0) continue;
            memset(probs + f * G * BS, 0, sizeof(float) * G * BS);
            for (int64_t g = 0; g < G; g++) { bmax[f * G + g] = HIDDEN; bsum[f * G + g] = 0.0f; }
        }
        /* each (stream, query) combines its blocks, scanning the owner list (no per-stream
         * index needed); pairs rather than streams, so a few streams still share out evenly */
#pragma omp for schedule(static)
        for (int64_t sg = 0; sg < S * G; sg++) {
            const int64_t s = sg / G, g = sg % G;
            float m = HIDDEN, denom = 0.0f;
            float *o = out + sg * D;
            for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            for (int64_t b = 0; b < NB; b++)
                if (owner[b] == s && bmax[b * G + g] > m) m = bmax[b * G + g];
            for (int64_t b = 0; b < NB; b++) {
                if (owner[b] != s) continue;
                const float f = bmax[b * G + g] == HIDDEN ? 0.0f : expf(bmax[b * G + g] - m);
                coef[b * G + g] = f;
                if (f == 0.0f) continue;
                denom += f * bsum[b * G + g];
                const float *pb = part + (b * G + g) * D;
                for (int64_t d = 0; d < D; d++) o[d] += f * pb[d];
            }
            const float inv = 1.0f / denom;
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
            if (write_probs)
                for (int64_t b = 0; b < NB; b++)
                    if (owner[b] == s) coef[b * G + g] *= inv;
        }
        if (write_probs) {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < NB; b++) {
                if (probs_mode != PROBS_HEADS) {  /* the group reduced: [BS] per block */
                    float *rb = reduced + b * BS;
                    if (owner[b] < 0) { memset(rb, 0, sizeof(float) * BS); continue; }
                    const float *p0 = probs + b * G * BS;
                    const float c0 = coef[b * G];
                    for (int64_t j = 0; j < BS; j++) rb[j] = p0[j] * c0;
                    for (int64_t g = 1; g < G; g++) {
                        const float c = coef[b * G + g];
                        const float *pg = probs + (b * G + g) * BS;
                        if (probs_mode == PROBS_MAX)
                            for (int64_t j = 0; j < BS; j++) { const float x = pg[j] * c; rb[j] = x > rb[j] ? x : rb[j]; }
                        else
                            for (int64_t j = 0; j < BS; j++) rb[j] += pg[j] * c;
                    }
                    continue;
                }
                if (owner[b] < 0) continue;
                for (int64_t g = 0; g < G; g++) {
                    const float c = coef[b * G + g];
                    float *pg = probs + (b * G + g) * BS;
                    for (int64_t j = 0; j < BS; j++) pg[j] *= c;
                }
            }
        }
    }
}
