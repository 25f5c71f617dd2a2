/* A decode step's two dense halves of a pre-norm block with a gated MLP (Llama, Mistral), one
 * call each, for a few float32 rows (M <= 8, one token per sequence):
 *
 *   pre:  qkv = rms_norm(x) @ Wqkv.T (+ b), the first `rotary` channels of every query and
 *         key head rotated (half-split layout, cos and signed sin per row, as rope.py's
 *         apply_rotary);
 *   post: s = x + attn @ Wo.T (+ b);  out = s + (act(g) * u) @ Wdown.T (+ b),
 *         where [g, u] = rms_norm(s) @ Wgu.T (+ b) and act is SiLU.
 *
 * The arithmetic is the few-row product kernel's (rows_gemm.c) and the RMS norm's
 * (rms_norm.c), included here; what this file saves is the dozen tensor operations and
 * module calls per layer between them, whose dispatch costs more than their arithmetic at
 * these sizes. Each product runs by the few-row kernel's plan that linear.py measured for it
 * (bit i of `plans` for the i-th product: qkv, o, gate/up, down; see rows_gemm.c). Built
 * and loaded at first use by decode_block.py (cormlm.native).
 */
#include <math.h>

#include "rms_norm.c"
#include "rows_gemm.c"

/* x[:half], x[half:rotary] <- x1 * cos1 + x2 * s1, x2 * cos2 + x1 * s2 (s: the signed sin) */
static void rotate(float *x, const float *cos, const float *sin, int64_t rotary) {
    const int64_t half = rotary / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* x [M, H] -> qkv [M, (heads_qk + heads_v) * D]; the first heads_qk heads of each row are
 * rotated by row m's tables cos[m], sin[m] ([M, rotary]; rotary 0: none). normed: [M, H] scratch. */
void cormlm_block_pre_f32(const float *x, const float *norm_w, float eps, const float *w, const float *bias,
                          const float *cos, const float *sin, int64_t rotary, float *normed, float *qkv, int64_t M,
                          int64_t H, int64_t heads_qk, int64_t heads_v, int64_t D, int threads, int plans) {
    const int64_t N = (heads_qk + heads_v) * D;
    cormlm_rms_norm_f32(x, NULL, norm_w, NULL, normed, M, H, eps);
    rows_gemm(normed, w, bias, qkv, M, N, H, threads, 0, plans & 1);
    for (int64_t m = 0; rotary && m < M; m++)
        for (int64_t h = 0; h < heads_qk; h++) rotate(qkv + m * N + h * D, cos + m * rotary, sin + m * rotary, rotary);
}

/* x [M, H], attn [M, A] -> out [M, H]. scratch: M * (2 * H + 3 * I) floats. */
void cormlm_block_post_f32(const float *x, const float *attn, const float *o_w, const float *o_b, const float *norm_w,
                           float eps, const float *gu_w, const float *gu_b, const float *down_w, const float *down_b,
                           float *out, float *scratch, int64_t M, int64_t H, int64_t A, int64_t I, int threads,
                           int plans) {
    float *proj = scratch, *normed = proj + M * H, *gu = normed + M * H, *act = gu + M * 2 * I;
    rows_gemm(attn, o_w, o_b, proj, M, H, A, threads, 0, plans >> 1 & 1);
    cormlm_rms_norm_f32(x, proj, norm_w, out, normed, M, H, eps); /* out = x + proj, normed */
    rows_gemm(normed, gu_w, gu_b, gu, M, 2 * I, H, threads, 0, plans >> 2 & 1);
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu + m * 2 * I, *u = g + I;
        float *a = act + m * I;
        for (int64_t i = 0; i < I; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    rows_gemm(act, down_w, down_b, out, M, H, I, threads, 1, plans >> 3 & 1); /* out += act @ down.T (+ b) */
}
