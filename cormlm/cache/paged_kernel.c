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
#include "native_tiles.h"

/* Phase 1: block b's raw probabilities exp(score - block max) into p [G, BS], the block's max
 * and sum per query into bmax/bsum [G], and its weighted values into part [G, D]. next_k /
 * next_v: the thread's next block (or NULL), fetched while this one runs. */
static void score_block(const float *restrict q, const float *restrict k, const float *restrict v,
                        const int32_t *restrict pos, int32_t q_pos, int64_t G, int64_t D, int64_t BS, float scale,
                        int64_t window, float *restrict p, float *restrict bmax, float *restrict bsum,
                        float *restrict part, const float *next_k, const float *next_v) {
    product(q, D, k, BS, D, BS, p, BS, G, JT, next_k);  /* scores: q [G, D] @ keys [D, BS] */
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
    product(p, BS, v, D, BS, D, part, D, G, DT, next_v);  /* weighted values: p [G, BS] @ values [BS, D] */
}

/* What the kernel writes of the probabilities: nothing, each query's [NB,G,BS], or the group's
 * max or sum [NB,BS] (what a policy that reads the group through one of those needs: a third
 * of the bytes at G = 3, and no reduction pass of its own). */
enum { PROBS_NONE = 0, PROBS_HEADS = 1, PROBS_MAX = 2, PROBS_SUM = 3 };

/* q [S,G,D], keys [NB,D,BS], values [NB,BS,D], pos [NB,BS] (-1: empty), owner [NB] (-1: free),
 * q_pos [S]; window <= 0: none; prefetch: each thread asks for its next block while it
 * computes one (or leaves the fetching to the hardware: which is faster depends on the
 * machine, and paged_kernel.py measures it). Writes out [S,G,D]; probs [NB,G,BS] is scratch, and the
 * normalised probabilities for PROBS_HEADS; reduced [NB,BS] gets the group's max or sum for
 * PROBS_MAX / PROBS_SUM. work: NB*G*(D+3) + NB + S + 1 floats (the last NB + S + 1 as int32). */
void cormlm_paged_decode_f32(const float *q, const float *keys, const float *values, const int32_t *pos,
                             const int64_t *owner, const int32_t *q_pos, int64_t S, int64_t G, int64_t D,
                             int64_t NB, int64_t BS, float scale, int64_t window, float *out, float *probs,
                             float *reduced, float *work, int probs_mode, int threads, int prefetch) {
    const int write_probs = probs_mode != PROBS_NONE;
    float *bmax = work, *bsum = work + NB * G, *coef = work + 2 * NB * G, *part = work + 3 * NB * G;
    /* each stream's blocks in pool order, order[start[s] .. start[s + 1]] (a counting sort), so
     * that the combine visits a stream's blocks only, not the whole owner list per query */
    int32_t *start = (int32_t *)(work + NB * G * (D + 3)), *order = start + S + 1;
    for (int64_t s = 0; s <= S; s++) start[s] = 0;
    for (int64_t b = 0; b < NB; b++)
        if (owner[b] >= 0) start[owner[b] + 1]++;
    for (int64_t s = 0; s < S; s++) start[s + 1] += start[s];
    const int64_t owned = start[S];
    for (int64_t b = 0; b < NB; b++)
        if (owner[b] >= 0) order[start[owner[b]]++] = (int32_t)b;
    for (int64_t s = S; s > 0; s--) start[s] = start[s - 1];
    start[0] = 0;
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
            const int has_next = prefetch && next < NB && rank < last;
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
            for (int64_t i = start[s]; i < start[s + 1]; i++) {
                const int64_t b = order[i];
                if (bmax[b * G + g] > m) m = bmax[b * G + g];
            }
            for (int64_t i = start[s]; i < start[s + 1]; i++) {
                const int64_t b = order[i];
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
                for (int64_t i = start[s]; i < start[s + 1]; i++) coef[order[i] * G + g] *= inv;
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

/* A decode step's new key, value and position of each stream into one slot: slots[s] when
 * tail is NULL (slots chosen by the caller, read), else the next slot of its tail block,
 * tail[s] * bs + fill[s] (stored into slots): keys [NB, D, bs] (transposed per block), values
 * [NB, bs, D], positions [NB, bs]; rows s of k and v ld_k and ld_v apart. With tails, the
 * caller has made tail room (every fill[s] < bs, tail[s] a block of the pool). */
void cormlm_paged_append_f32(float *keys, float *values, int32_t *positions, const int64_t *tail, const int64_t *fill,
                             const float *k, int64_t ld_k, const float *v, int64_t ld_v, const int32_t *new_pos,
                             int64_t *slots, int64_t S, int64_t D, int64_t bs) {
    for (int64_t s = 0; s < S; s++) {
        const int64_t slot = tail ? tail[s] * bs + fill[s] : slots[s];
        float *key = keys + (slot / bs) * D * bs + slot % bs;
        for (int64_t d = 0; d < D; d++) key[d * bs] = k[s * ld_k + d];
        memcpy(values + slot * D, v + s * ld_v, (size_t)D * sizeof(float));
        positions[slot] = new_pos[s];
        if (tail) slots[s] = slot;
    }
}

/* Each stream's lowest free slot (position < 0) among the rows (blocks) it owns, and how many
 * free slots those rows hold, for every region (layer) of a slot index at once: positions
 * [rows, bs], owner [rows] (-1: a free row), region g's used rows starting at row starts[g],
 * sizes[g] of them; lowest [regions * streams], filled with -1 by the caller, gets the
 * region's slot id (row within the region * bs + index in block), count [regions * streams],
 * zeroed, the counts. */
void cormlm_free_slots(const int32_t *positions, const int64_t *owner, const int64_t *starts, const int64_t *sizes,
                       int64_t regions, int64_t bs, int64_t streams, int64_t *lowest, int64_t *count) {
    for (int64_t g = 0; g < regions; g++) {
        for (int64_t r = 0; r < sizes[g]; r++) {
            const int64_t stream = owner[starts[g] + r];
            if (stream < 0) continue;
            const int32_t *row = positions + (starts[g] + r) * bs;
            int64_t free = 0;  /* (a vectorised pass: most rows are full) */
            for (int64_t j = 0; j < bs; j++) free += row[j] < 0;
            if (!free) continue;
            int64_t j = 0;
            while (row[j] >= 0) j++;
            const int64_t slot = r * bs + j, at = g * streams + stream;
            if (lowest[at] < 0 || slot < lowest[at]) lowest[at] = slot;
            count[at] += free;
        }
    }
}
