/* y = x @ w.T (+ bias) for a few rows of x (float32): x [M, K], w [N, K], y [M, N], M <= 8.
 *
 * A decode step's products: each weight row is read once from memory and multiplied with all
 * M rows of x (which stay in L1), a few weight rows at a time so that each row of x is loaded
 * once per few weight rows; the weight's rows are split between the threads. One function
 * per M, so that the accumulators are registers. Vectors are GCC/Clang vector extensions: the
 * compiler maps them to the machine's own (AVX-512, AVX2, NEON) under -march=native.
 * Built and loaded at first use by linear.py (cormlm.native).
 */
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "native_vectors.h"

/* Output columns n0..n1 of M rows over K columns of x and w (rows ld apart), RB weight rows at
 * a time (M * RB accumulators), stored into y (first) or added to it, bias (where not NULL)
 * added to each column's sum before it lands in y; AHEAD > 0 asks for the weight rows AHEAD
 * blocks on while this block is multiplied, LOCALITY the cache level they are asked into
 * (0: near the core, marked non-temporal; 2: the L2): with several input rows each weight
 * byte takes more arithmetic, and the memory idles between the hardware prefetcher's
 * requests unless asked early. */
#define DEFINE_ROWS(NAME, M, RB, AHEAD, LOCALITY)                                                                            \
    static void NAME(const float *restrict x, const float *restrict w, const float *restrict bias,       \
                         float *restrict y, int64_t N, int64_t K, int64_t ld, int first, int64_t n0,         \
                         int64_t n1) {                                                                       \
        const int64_t KV = K / VW * VW;                                                                      \
        int64_t n = n0;                                                                                      \
        for (; n + RB <= n1; n += RB) {                                                                      \
            vf acc[M][RB];                                                                                   \
            for (int m = 0; m < M; m++)                                                                      \
                for (int r = 0; r < RB; r++) acc[m][r] = (vf){0};                                            \
            for (int64_t k = 0; k < KV; k += VW) {                                                           \
                vf wv[RB];                                                                                   \
                for (int r = 0; r < RB; r++) memcpy(&wv[r], w + (n + r) * ld + k, sizeof(vf));               \
                for (int r = 0; AHEAD && r < RB; r++) /* a prefetch past the end never faults */             \
                    __builtin_prefetch(w + (n + AHEAD * RB + r) * ld + k, 0, LOCALITY);                      \
                for (int m = 0; m < M; m++) {                                                                \
                    vf xv;                                                                                   \
                    memcpy(&xv, x + m * ld + k, sizeof(vf));                                                 \
                    IN_REGISTER(xv);                                                                         \
                    for (int r = 0; r < RB; r++) acc[m][r] += xv * wv[r];                                    \
                }                                                                                            \
            }                                                                                                \
            for (int m = 0; m < M; m++)                                                                      \
                for (int r = 0; r < RB; r++) {                                                               \
                    float s = lane_sum(acc[m][r]);                                                           \
                    for (int64_t k = KV; k < K; k++) s += x[m * ld + k] * w[(n + r) * ld + k];               \
                    if (bias) s += bias[n + r];                                                              \
                    y[m * N + n + r] = first ? s : y[m * N + n + r] + s;                                     \
                }                                                                                            \
        }                                                                                                    \
        for (; n < n1; n++)                                                                                  \
            for (int m = 0; m < M; m++) {                                                                    \
                float s = 0.0f;                                                                              \
                for (int64_t k = 0; k < K; k++) s += x[m * ld + k] * w[n * ld + k];                          \
                if (bias) s += bias[n];                                                                      \
                y[m * N + n] = first ? s : y[m * N + n] + s;                                                 \
            }                                                                                                \
    }

/* RB for M input rows (RB3: 3-4 rows, RB5: 5-6, RB7: 7-8): as many weight rows (at most 8, a
 * divisor of SPAN) as keep the M * RB accumulators, the RB weight vectors and the input
 * vector in registers: with AVX-512's 32 vector registers, M * RB + RB + 1 <= 32 (each
 * weight vector then meets every input row from a register, fewer loads per multiply-add).
 * Where vectors are 8 lanes (AVX2, NEON), the earlier narrower tiles stay (not measured there). */
#if VW == 16
#define RB3 6
#define RB5 4
#define RB7 3
#else
#define RB3 4
#define RB5 3
#define RB7 2
#endif
/* Two plans, because which pays depends on the machine's caches and prefetchers (the first
 * was tuned on a Zen 5 EPYC; on a Zen 4 one the second read 1.4-1.5x faster at 8 rows): the
 * in-place trials of linear.py measure both as separate kernels ("rows", "rows_l2") and keep
 * the faster.
 * PLAN_L1: blocks asked for non-temporally near the core (none at one row), x in column
 * chunks of half the L1 (see x_budget); PLAN_L2: blocks asked into the L2, x in whole rows. */
#define PLAN_L1 0
#define PLAN_L2 1
/* One plan's function per row count, NAME_1 .. NAME_8: AHEAD_ONE blocks ahead at one row
 * (where a single stream may need no asking), 2 blocks ahead otherwise, into LOCALITY. */
#define DEFINE_PLAN(NAME, AHEAD_ONE, LOCALITY)          \
    DEFINE_ROWS(NAME##_1, 1, 8, AHEAD_ONE, LOCALITY)    \
    DEFINE_ROWS(NAME##_2, 2, 8, 2, LOCALITY)            \
    DEFINE_ROWS(NAME##_3, 3, RB3, 2, LOCALITY)          \
    DEFINE_ROWS(NAME##_4, 4, RB3, 2, LOCALITY)          \
    DEFINE_ROWS(NAME##_5, 5, RB5, 2, LOCALITY)          \
    DEFINE_ROWS(NAME##_6, 6, RB5, 2, LOCALITY)          \
    DEFINE_ROWS(NAME##_7, 7, RB7, 2, LOCALITY)          \
    DEFINE_ROWS(NAME##_8, 8, RB7, 2, LOCALITY)
DEFINE_PLAN(rows, 0, 0)    /* PLAN_L1 */
DEFINE_PLAN(rows_l2, 2, 2) /* PLAN_L2 */

typedef void (*rows_fn)(const float *, const float *, const float *, float *, int64_t, int64_t, int64_t, int,
                        int64_t, int64_t);
static const rows_fn ROWS[2][9] = {{0, rows_1, rows_2, rows_3, rows_4, rows_5, rows_6, rows_7, rows_8},
                                   {0, rows_l2_1, rows_l2_2, rows_l2_3, rows_l2_4, rows_l2_5, rows_l2_6, rows_l2_7,
                                    rows_l2_8}};
#define SPAN 24 /* a thread's share of weight rows is a multiple of every RB above */

/* Bytes of x that a pass over the weight rows may read: half the L1 data cache, so that the
 * input rows stay in L1 beside the streamed weight rows. A longer x (8 rows of a 1536-wide
 * MLP product are 48 KiB) is taken in column chunks, each a pass over the same weight rows
 * that adds into y; from L2, x's loads stall the weight stream. */
static int64_t x_budget(void) {
    static int64_t budget = 0;
    if (!budget) {
        long l1 = 0;
#ifdef _SC_LEVEL1_DCACHE_SIZE
        l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
#endif
        budget = (l1 > 0 ? l1 : 32768) / 2;
    }
    return budget;
}

/* y = x @ w.T (+ bias), or with add, y += x @ w.T (+ bias), by plan (PLAN_L1 or PLAN_L2);
 * bias may be NULL; x, w, bias, y contiguous; 1 <= M <= 8 (the callers check; anything else
 * returns with y untouched). */
static void rows_gemm(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                      int threads, int add, int plan) {
    if (M < 1 || M > 8 || (plan != PLAN_L1 && plan != PLAN_L2)) return;
    const int64_t budget = plan == PLAN_L1 ? x_budget() : M * K * 4, parts = (M * K * 4 + budget - 1) / budget;
    const int64_t chunk = ((K + parts - 1) / parts + VW - 1) / VW * VW;
#pragma omp parallel num_threads(threads)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        const int64_t per = ((N + T - 1) / T + SPAN - 1) / SPAN * SPAN;
        const int64_t n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
        if (n0 < N)
            for (int64_t k0 = 0; k0 < K; k0 += chunk)
                ROWS[plan][M](x + k0, w + k0, k0 == 0 ? bias : NULL, y, N, (K - k0 < chunk ? K - k0 : chunk), K,
                        k0 == 0 && !add, n0, n1);
    }
}

/* y = x @ w.T (+ bias) by plan: linear.py's product. */
void cormlm_rows_gemm_f32(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N,
                          int64_t K, int threads, int plan) {
    rows_gemm(x, w, bias, y, M, N, K, threads, 0, plan);
}
