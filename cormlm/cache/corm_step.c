/* An eager decode step's CORM bookkeeping over every layer's slots in one pass (docs/corm.md):
 * each held key the step's query marked (its group's largest attention a >= alpha/t) is kept
 * until t + w; a key whose keep_until <= t and whose position is <= t - (r + 1) is evicted, as
 * is one a sliding window has left behind (position <= t - window); then the live keys of each
 * layer are counted. The same comparisons in the same float32 arithmetic as CormPolicy's
 * tensor operations (which run wherever this kernel does not), in one read of the slots
 * instead of about a dozen passes. Built without -ffast-math: the comparisons must round as
 * torch's do (torch divides a number by a tensor as the tensor's reciprocal times the number).
 * Built and loaded at first use by corm_step.py (cormlm.native).
 */
#include <stdint.h>

/* keep_until, positions, probs [rows, block]; query_t [rows] (or one value: t_stride 0);
 * layer_of_row [rows]; live [layers], added to. window <= 0: none. */
void cormlm_corm_decode_step(float *keep_until, int32_t *positions, const float *probs, const int32_t *query_t,
                             int64_t t_stride, const int64_t *layer_of_row, int64_t rows, int64_t block,
                             float threshold, float lifetime, int64_t recent, int64_t window, int64_t *live,
                             int64_t layers, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : live[:layers])
    for (int64_t row = 0; row < rows; row++) {
        const int32_t ti = query_t[row * t_stride];
        const float t = (float)ti, marked = (1.0f / t) * threshold, until = t + lifetime; /* torch's alpha / t */
        const int64_t old = (int64_t)ti - (recent + 1), behind = (int64_t)ti - window;
        float *keep = keep_until + row * block;
        int32_t *pos = positions + row * block;
        const float *p = probs + row * block;
        int64_t kept = 0;
        for (int64_t j = 0; j < block; j++) {
            if (pos[j] < 0) continue; /* an empty slot keeps its state (fresh until a key is stored) */
            if (p[j] >= marked) keep[j] = until;
            if ((keep[j] <= t && pos[j] <= old) || (window > 0 && pos[j] <= behind))
                pos[j] = -1;
            else
                kept++;
        }
        live[layer_of_row[row]] += kept;
    }
}
