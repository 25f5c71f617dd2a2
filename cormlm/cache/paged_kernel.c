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

#define HIDDEN (-FLT_MAX)

/* Phase 1: block b's raw probabilities exp(score - block max) into p [G, BS], the block's max
 * and sum per query into bmax/bsum [G], and its weighted values into part [G, D]. */
static void score_block(const float *restrict q, const float *restrict k, const float *restrict v,
                        const int32_t *restrict pos, int32_t q_pos, int64_t G, int64_t D, int64_t BS, float scale,
                        int64_t window, float *restrict p, float *restrict bmax, float *restrict bsum,
                        float *restrict part) {
    for (int64_t x = 0; x < G * BS; x++) p[x] = 0.0f;
    for (int64_t d = 0; d < D; d++) {  /* scores: each key row read once for every query of the group */
        const float *restrict krow = k + d * BS;
        for (int64_t g = 0; g < G; g++) {
            const float qd = q[g * D + d];
            float *restrict pg = p + g * BS;
            for (int64_t j = 0; j < BS; j++) pg[j] += qd * krow[j];
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
        float *restrict acc = part + g * D;
        for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
        float sum = 0.0f;
        if (m != HIDDEN) {
            for (int64_t j = 0; j < BS; j++) {  /* exp(HIDDEN - m) = 0: hidden slots weigh nothing */
                const float w = expf(pg[j] - m);
                pg[j] = w;
                sum += w;
            }
            for (int64_t j = 0; j < BS; j++) {
                const float w = pg[j];
                const float *restrict vrow = v + j * D;
                for (int64_t d = 0; d < D; d++) acc[d] += w * vrow[d];
            }
        }
        bmax[g] = m;
        bsum[g] = sum;
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
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < NB; b++) {
            const int64_t s = owner[b];
            if (s < 0) {
                memset(probs + b * G * BS, 0, sizeof(float) * G * BS);
                for (int64_t g = 0; g < G; g++) { bmax[b * G + g] = HIDDEN; bsum[b * G + g] = 0.0f; }
                continue;
            }
            score_block(q + s * G * D, keys + b * D * BS, values + b * BS * D, pos + b * BS, q_pos[s], G, D, BS,
                        scale, window, probs + b * G * BS, bmax + b * G, bsum + b * G, part + b * G * D);
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
