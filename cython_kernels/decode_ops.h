/* The decode step's small per-token ops, one call each where torch takes 5-15 ops: the residual
 * add with the RMSNorm after it, GQA's per-head q/k RMSNorm with the rotary embedding, and a
 * softmax router's top-k.
 *
 * Decode runs these on one row or a few per layer, so their cost is dispatch, not arithmetic: in
 * the step, right after a GEMV has streamed megabytes through the caches, one torch RMSNorm of a
 * 2048-wide row took 80 us (18 us alone), and GQA's norm + rope 260 us a layer. Here they are
 * plain scalar loops on the calling thread (microseconds for a decode batch), with the roundings
 * of the torch sequence they replace: fp32 math, rounded to the model's dtype (bf16 or fp32)
 * wherever torch's ops hand back a tensor of that dtype. No FMA contraction, which would change
 * those roundings (the file is built for baseline x86-64, which has none; the attribute keeps it
 * so elsewhere). The sum of squares runs in one order where torch's vector reduction takes
 * another, so a norm's result may differ from torch's in the last bit of its fp32 sum. */
#ifndef HYBRIDMOE_DECODE_OPS_H
#define HYBRIDMOE_DECODE_OPS_H

#include <math.h>
#include <stdint.h>
#include "gemv_generic.h"

#define HM_NOCONTRACT __attribute__((optimize("fp-contract=off")))
#define HM_QK_MAX_DH 1024

static inline float hm_ld(const void *p, int64_t i, int bf16) {
    return bf16 ? hm_bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void hm_st(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = hm_f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* v rounded to the dtype, back in fp32 */
static inline float hm_rnd(float v, int bf16) { return bf16 ? hm_bf16_to_f32(hm_f32_to_bf16(v)) : v; }

/* 1 / sqrt(mean(s^2) + eps) of n fp32 values: torch's pow, mean, add, rsqrt */
HM_NOCONTRACT static float hm_rms_inv(const float *s, int64_t n, float eps) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += s[i] * s[i];
    return 1.f / sqrtf(ss / (float)n + eps);
}

/* For each of N rows of D: s = x + d (d rounded to the dtype first when it is fp32, dbf16 == 0;
 * the sum rounded; s = x when d is NULL) into xo (when not NULL), and
 * y = w * (s / rms(s) rounded to the dtype), rounded: torch's
 * ``s = x + d.to(dtype); w * F.rms_norm(s.float(), eps).to(dtype)``. scratch: D floats. */
HM_NOCONTRACT static void hm_add_rms_norm(const void *x, const void *d, int dbf16, void *xo, void *y, const void *w,
                                          int64_t N, int64_t D, float eps, int bf16, float *scratch) {
    for (int64_t t = 0; t < N; t++) {
        const int64_t o = t * D;
        for (int64_t i = 0; i < D; i++) {
            float v = hm_ld(x, o + i, bf16);
            if (d) v = hm_rnd(v + hm_rnd(hm_ld(d, o + i, dbf16), bf16), bf16);
            scratch[i] = v;
        }
        if (xo)
            for (int64_t i = 0; i < D; i++) hm_st(xo, o + i, scratch[i], bf16);
        const float r = hm_rms_inv(scratch, D, eps);
        for (int64_t i = 0; i < D; i++) hm_st(y, o + i, hm_ld(w, i, bf16) * hm_rnd(scratch[i] * r, bf16), bf16);
    }
}

/* One q or k head of dh values (already in the dtype, in fp32) -> out, the rotated pairs in
 * halves: the RMSNorm with w (when not NULL), pairs to halves when interleaved, then
 * out[i] = c[i] n[i] - s[i] n[i + h] and out[i + h] = c[i] n[i + h] + s[i] n[i] (h = dh / 2), each
 * product and the sum rounded (Rotary.apply's x (cos, cos) + roll(x) (-sin, sin)). */
HM_NOCONTRACT static void hm_qk_head(float *v, int dh, const void *w, float eps, const void *cs, const void *sn,
                                     int64_t tab, int interleaved, int bf16, void *out, int64_t oo) {
    float tmp[HM_QK_MAX_DH];
    if (w) {
        const float r = hm_rms_inv(v, dh, eps);
        for (int i = 0; i < dh; i++) v[i] = hm_rnd(hm_ld(w, i, bf16) * hm_rnd(v[i] * r, bf16), bf16);
    }
    const int h = dh / 2;
    if (interleaved) {
        for (int i = 0; i < h; i++) tmp[i] = v[2 * i], tmp[h + i] = v[2 * i + 1];
        for (int i = 0; i < dh; i++) v[i] = tmp[i];
    }
    for (int i = 0; i < h; i++) {
        const float c = hm_ld(cs, tab + i, bf16), s = hm_ld(sn, tab + i, bf16);
        const float a = v[i], b = v[i + h];
        hm_st(out, oo + i, hm_rnd(a * c, bf16) + hm_rnd(b * -s, bf16), bf16);
        hm_st(out, oo + i + h, hm_rnd(b * c, bf16) + hm_rnd(a * s, bf16), bf16);
    }
}

/* GQA's projections -> queries and cache entries. y: fp32 [N][(H + 2K) dh], each token's q, k
 * and v side by side (the GEMV's output). q: [N][H][dh] and the entries (2K dh: k then v) in the
 * dtype: token t's at kv + t * 2K dh, or with rows (not NULL) at kv + rows[t] * ld, a row of a
 * cache of nrows rows of ld elements (decode writes its new entries straight into the paged
 * cache). q's and k's heads go through hm_qk_head (qw / kw the norms' weights, both or neither;
 * cos / sin [N][dh / 2] in the dtype), v is rounded to the dtype. Returns 0, or -2 (before it
 * writes anything) when a row lies outside [0, nrows). */
static int hm_qk_norm_rope(const float *y, int64_t N, int H, int K, int dh, const void *qw, const void *kw, float eps,
                           const void *cs, const void *sn, int interleaved, int bf16, void *q, void *kv,
                           const int64_t *rows, int64_t nrows, int64_t ld) {
    float v[HM_QK_MAX_DH];
    const int64_t width = (int64_t)(H + 2 * K) * dh, kvw = 2 * (int64_t)K * dh;
    if (rows)
        for (int64_t t = 0; t < N; t++)
            if (rows[t] < 0 || rows[t] >= nrows) return -2;
    for (int64_t t = 0; t < N; t++) {
        const float *yt = y + t * width;
        const int64_t at = rows ? rows[t] * ld : t * kvw;
        for (int j = 0; j < H + K; j++) {
            for (int i = 0; i < dh; i++) v[i] = hm_rnd(yt[(int64_t)j * dh + i], bf16);
            if (j < H) hm_qk_head(v, dh, qw, eps, cs, sn, t * (dh / 2), interleaved, bf16, q, (t * H + j) * dh);
            else hm_qk_head(v, dh, kw, eps, cs, sn, t * (dh / 2), interleaved, bf16, kv, at + (int64_t)(j - H) * dh);
        }
        for (int64_t i = 0; i < (int64_t)K * dh; i++) hm_st(kv, at + (int64_t)K * dh + i, yt[(int64_t)(H + K) * dh + i], bf16);
    }
    return 0;
}

/* A softmax router's choice for each of N rows of E logits: rounded to the dtype first (the gate
 * linear's output), softmax in fp32, the k most probable experts, largest first and ties to the
 * lower id, with their probabilities, renormalized to sum 1 when norm (SoftmaxTopKRouter's
 * softmax, topk and division). p: E floats of scratch. */
HM_NOCONTRACT static void hm_softmax_topk(const float *logits, int64_t N, int E, int k, int norm, int bf16, float *p,
                                          int64_t *ids, float *w) {
    for (int64_t t = 0; t < N; t++) {
        const float *row = logits + t * E;
        float m = -INFINITY, s = 0.f;
        for (int e = 0; e < E; e++) {
            p[e] = hm_rnd(row[e], bf16);
            if (p[e] > m) m = p[e];
        }
        for (int e = 0; e < E; e++) s += (p[e] = expf(p[e] - m));
        for (int e = 0; e < E; e++) p[e] /= s;
        float chosen = 0.f;
        for (int j = 0; j < k; j++) {
            int best = 0;
            for (int e = 1; e < E; e++)
                if (p[e] > p[best]) best = e;
            ids[t * k + j] = best;
            w[t * k + j] = p[best];
            chosen += p[best];
            p[best] = -1.f; /* taken: below every probability */
        }
        if (norm)
            for (int j = 0; j < k; j++) w[t * k + j] /= chosen;
    }
}

#endif
