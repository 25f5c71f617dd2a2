/* Causal self-attention over a whole prompt (float32), the flash way, for grouped queries.
 *
 * PyTorch's CPU flash kernel masks the causal triangle inside blocks of 512 keys and runs
 * each query head on its own, so a 1k prompt computes about 1.5x the scores it needs and
 * reads each key once per query head. Here a work item is a few query positions of one KV
 * head with all the heads of its group (about 64 rows, each position's heads together), run
 * over blocks of KB keys up to its last position only: the keys and values of a block are
 * read once for the group, the triangle is masked within 64-key blocks, and the softmax is
 * the online one (each block's scores exponentiated against the running maximum, earlier
 * sums and outputs rescaled). The keys are transposed once per call into the workspace, each
 * block's [D, KB] contiguous (a whole transposed row apart would put a block's rows a power of
 * two apart, on the same few cache sets), so that a block's scores are one register-tiled
 * product (native_tiles.h).
 *
 * A policy that reads the log-probabilities of the last rows (CORM's scored window) gets them
 * from the same pass: those rows' scaled scores are kept in the thread's scratch as each block
 * is scored and, once the item's log-sum-exps are known, written out once as log-probabilities
 * (hidden keys -inf), each head's or, for a policy that reads its group through the maximum,
 * the group's maximum alone (a third of the bytes at G = 3: the rows are memory traffic, not
 * arithmetic). The rows are never scored a second time.
 *
 * Each row's result depends on its own scores and the fixed key blocks only, never on which
 * rows share its work item, so the same query rounds alike whatever the head count or batch.
 * Built with -ffast-math (vectorised exp), so nothing here computes with an infinity: hidden
 * keys are left out of each row's maximum and sum rather than scored -inf (the -inf a policy
 * reads for them is stored by its bits). OpenMP threads are torch's own.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "native_vectors.h"
#include "native_tiles.h"

#define HIDDEN (-FLT_MAX)
#define NEG_INF_BITS 0xff800000u /* what a policy's log-probabilities hold for a hidden key */
#define KB 64   /* keys per block (a whole number of vectors: the score tiles' columns) */
#define ROWS 64 /* rows per work item: positions x the group's heads, at least one position */

/* Query positions per work item for groups of G heads. */
static int64_t positions_per_item(int64_t G) { return G >= ROWS ? 1 : ROWS / G; }

/* Floats of each thread's scratch: an item's queries, scores, outputs and, when rows are
 * scored (W > 0), their scores over every key. */
static int64_t scratch_per_thread(int64_t G, int64_t T, int64_t D, int64_t W) {
    const int64_t R = positions_per_item(G) * G;
    return R * (3 * D + KB + 3) + (W > 0 ? R * T : 0);
}

/* Floats of workspace the kernel needs (keys transposed, then each thread's scratch). */
int64_t cormlm_prompt_attention_work(int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t D, int64_t W,
                                     int threads) {
    const int64_t Tp = (T + KB - 1) / KB * KB;
    return B * Hkv * D * Tp + (int64_t)threads * scratch_per_thread(Hq / Hkv, T, D, W);
}

/* q [B, Hq, T, D], k and v [B, Hkv, T, D], each by its (batch, head, position) strides in
 * elements, D contiguous; query head h reads KV head h / (Hq / Hkv). Writes out [B, T, Hq, D]
 * (contiguous: the layout the output projection reads), when lse is not NULL each query's
 * log-sum-exp of its scaled scores [B, Hq, T], and when W > 0 the log-probabilities of the
 * last W positions' queries over every key into log_probs [B, Hkv, G, W, T], or with
 * group_max their maximum over the group's heads [B, Hkv, 1, W, T] (-inf where a key comes
 * after the query). work: cormlm_prompt_attention_work floats for the same arguments. */
void cormlm_prompt_attention_f32(const float *q, int64_t qsb, int64_t qsh, int64_t qst, const float *k, int64_t ksb,
                                 int64_t ksh, int64_t kst, const float *v, int64_t vsb, int64_t vsh, int64_t vst,
                                 int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t D, float scale, float *out,
                                 float *lse, int64_t W, float *log_probs, int group_max, float *work,
                                 int threads) {
    const int64_t G = Hq / Hkv, P = positions_per_item(G), R = P * G;
    const int64_t Tp = (T + KB - 1) / KB * KB, NQ = (T + P - 1) / P, streams = B * Hkv;
    float *keys_t = work; /* [streams, Tp / KB, D, KB], the columns past T zero (every query hides them) */
    float *scratch = work + streams * D * Tp;
    const int64_t per_thread = scratch_per_thread(G, T, D, W);
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
#pragma omp for schedule(static)
        for (int64_t sj = 0; sj < streams * (Tp / KB); sj++) {
            const int64_t s = sj / (Tp / KB), j0 = sj % (Tp / KB) * KB, n = min64(KB, T - j0);
            const float *src = k + (s / Hkv) * ksb + (s % Hkv) * ksh + j0 * kst;
            float *dst = keys_t + sj * D * KB;
            for (int64_t d = 0; d < D; d++) {
                for (int64_t j = 0; j < n; j++) dst[d * KB + j] = src[j * kst + d];
                for (int64_t j = n; j < KB; j++) dst[d * KB + j] = 0.0f;
            }
        }
        float *qs = scratch + t * per_thread; /* [R, D] the item's queries, scaled */
        float *sc = qs + R * D;               /* [R, KB] a block's scores, then its weights */
        float *acc = sc + R * KB;             /* [R, D] the weighted values so far */
        float *part = acc + R * D;            /* [R, D] one block's weighted values */
        float *mx = part + R * D, *sum = mx + R, *rescale = sum + R;
        float *kept = rescale + R;            /* [R, T] the scored rows' scores (W > 0) */
        /* the longest items (last positions) first, so the dynamic schedule ends evenly */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < streams * NQ; item++) {
            const int64_t s = item % streams, b = s / Hkv, hk = s % Hkv;
            const int64_t p0 = (NQ - 1 - item / streams) * P, np = min64(P, T - p0), rows = np * G;
            for (int64_t i = 0; i < np; i++)
                for (int64_t g = 0; g < G; g++) { /* row i * G + g: position p0 + i, head hk * G + g */
                    const float *src = q + b * qsb + (hk * G + g) * qsh + (p0 + i) * qst;
                    float *dst = qs + (i * G + g) * D;
                    for (int64_t d = 0; d < D; d++) dst[d] = src[d] * scale;
                }
            for (int64_t r = 0; r < rows; r++) { mx[r] = HIDDEN; sum[r] = 0.0f; }
            memset(acc, 0, sizeof(float) * rows * D);
            const float *kt = keys_t + s * D * Tp, *vs = v + b * vsb + hk * vsh;
            const int64_t last = p0 + np - 1; /* the item's keys: 0 .. last */
            for (int64_t j0 = 0; j0 <= last; j0 += KB) {
                product(qs, D, kt + j0 * D, KB, D, KB, sc, KB, rows, JT, NULL); /* scores [rows, KB] */
                for (int64_t r = 0; r < rows; r++) {
                    float *row = sc + r * KB;
                    const int64_t seen = min64(KB, p0 + r / G - j0 + 1); /* keys j0 .. position */
                    if (seen <= 0) { memset(row, 0, sizeof(float) * KB); rescale[r] = 1.0f; continue; }
                    if (p0 + r / G >= T - W) memcpy(kept + r * T + j0, row, sizeof(float) * seen);
                    float m = mx[r];
                    for (int64_t c = 0; c < seen; c++) m = row[c] > m ? row[c] : m;
                    float total = 0.0f;
                    for (int64_t c = 0; c < seen; c++) { const float w = expf(row[c] - m); row[c] = w; total += w; }
                    for (int64_t c = seen; c < KB; c++) row[c] = 0.0f;
                    rescale[r] = mx[r] == HIDDEN ? 0.0f : expf(mx[r] - m);
                    sum[r] = sum[r] * rescale[r] + total;
                    mx[r] = m;
                }
                product(sc, KB, vs + j0 * vst, vst, min64(KB, T - j0), D, part, D, rows, DT, NULL);
                for (int64_t r = 0; r < rows; r++) {
                    float *a = acc + r * D;
                    const float *p = part + r * D, f = rescale[r];
                    for (int64_t d = 0; d < D; d++) a[d] = a[d] * f + p[d];
                }
            }
            for (int64_t r = 0; r < rows; r++) {
                const int64_t pos = p0 + r / G, h = hk * G + r % G;
                const float inv = 1.0f / sum[r], *a = acc + r * D;
                float *o = out + ((b * T + pos) * Hq + h) * D;
                for (int64_t d = 0; d < D; d++) o[d] = a[d] * inv;
                mx[r] += logf(sum[r]); /* the row's log-sum-exp */
                if (lse) lse[(b * Hq + h) * T + pos] = mx[r];
            }
            for (int64_t i = 0; i < np; i++) { /* scores -> log-probabilities: what a policy compares */
                const int64_t pos = p0 + i;
                if (pos < T - W) continue;
                const int64_t heads = group_max ? 1 : G;
                for (int64_t g = 0; g < heads; g++) {
                    float *lp = log_probs + ((s * heads + g) * W + pos - (T - W)) * T;
                    const float *first = kept + (i * G + g) * T, total = mx[i * G + g];
                    for (int64_t j = 0; j <= pos; j++) lp[j] = first[j] - total;
                    if (group_max)
                        for (int64_t other = 1; other < G; other++) {
                            const float *row = kept + (i * G + other) * T, t2 = mx[i * G + other];
                            for (int64_t j = 0; j <= pos; j++) {
                                const float x = row[j] - t2;
                                lp[j] = x > lp[j] ? x : lp[j];
                            }
                        }
                    uint32_t *hidden = (uint32_t *)lp; /* -inf by its bits: -ffast-math assumes no infinities */
                    for (int64_t j = pos + 1; j < T; j++) hidden[j] = NEG_INF_BITS;
                }
            }
        }
    }
}
