/* RMS norm of a few float32 rows, optionally after adding a residual branch: a decode step
 * runs two norms per layer on rows of a few hundred values, where each of PyTorch's
 * operations costs more to dispatch than the arithmetic. One thread (a row is microseconds).
 *
 * For each row: s = x (+ delta, then stored into sum), y = s / sqrt(mean(s^2) + eps) * w.
 * Built and loaded at first use by norms.py (cormlm.native).
 */
#include <math.h>
#include <stdint.h>

#include "native_vectors.h"

/* delta and sum may be NULL (a plain norm); otherwise sum receives x + delta. */
void cormlm_rms_norm_f32(const float *x, const float *delta, const float *w, float *sum, float *y, int64_t rows,
                         int64_t dim, float eps) {
    const int64_t DV = dim / VW * VW;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        if (delta) { /* the residual's sum first, stored: the norm reads it back from L1 */
            const float *dr = delta + r * dim;
            float *sr = sum + r * dim;
            for (int64_t k = 0; k < dim; k++) sr[k] = xr[k] + dr[k];
            xr = sr;
        }
        vf squares = {0};
        for (int64_t k = 0; k < DV; k += VW) {
            vf v;
            memcpy(&v, xr + k, sizeof(vf));
            squares += v * v;
        }
        float total = lane_sum(squares);
        for (int64_t k = DV; k < dim; k++) total += xr[k] * xr[k];
        const float scale = 1.0f / sqrtf(total / (float)dim + eps);
        float *yr = y + r * dim;
        for (int64_t k = 0; k < dim; k++) yr[k] = xr[k] * scale * w[k];
    }
}
