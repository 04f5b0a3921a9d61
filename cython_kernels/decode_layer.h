/* One decode step's GQA attention block and routing for a few tokens, all in one call: the calls
 * the runner makes one by one (add_rms_norm, the q/k/v GEMV, qk_norm_rope into the paged cache,
 * decode attention, the o GEMV, add_rms_norm, the router GEMV, softmax_topk) in the same order on
 * the same data, so the results are theirs to the bit. What it saves is the Python between them:
 * each kernel call that streams megabytes of weights leaves the caches cold, and the Python that
 * runs next pays for it (about 0.35 ms a layer on the 2-core VM of the README's figures). */
#ifndef HYBRIDMOE_DECODE_LAYER_H
#define HYBRIDMOE_DECODE_LAYER_H

#include "moe.h"
#include "attention.h"
#include "decode_ops.h"

typedef struct {
    hm_weight qkv[3], o, router; /* [out, in]: q, k, v [H dh | K dh | K dh, D] (one format); o [D, H dh]; router [E, D] */
    const void *norm1, *norm2;   /* the input and post-attention RMSNorm weights [D], in the dtype */
    float eps1, eps2;
    const void *qn, *kn; /* q/k RMSNorm weights [dh] (both NULL: none) */
    float qk_eps;
    int H, K, dh, interleaved, bf16, E, topk, norm_topk, avx512;
    int64_t D;
} hm_gqa_layer;

/* in (N x n, the dtype) -> out as fp32 (the GEMV's activations) */
static void hm_widen(const void *in, int64_t n, int bf16, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = hm_ld(in, i, bf16);
}

/* x [N][D] (the residual stream, dtype) with delta (NULL, or [N][D] bf16 when dbf16, else fp32)
 * -> x_out = x + delta + attention's output and h = norm2(x_out) (dtype), and the router's
 * choice ids / w [N][topk]. The new tokens' cache entries go to rows[t] of the layer's cache
 * (cache_rows rows of cache_ld elements); attention reads attn[t] (their cache set here).
 * cos / sin [N][dh / 2] in the dtype. Returns 0, -1 when out of memory, -2 when a cache row or
 * block id lies outside the cache (before anything of the cache is written). */
static int hm_decode_gqa_layer(const hm_gqa_layer *L, int variant, int64_t N, const void *x, const void *delta,
                               int dbf16, void *x_out, void *h, const void *cos, const void *sin, void *cache,
                               int64_t cache_rows, int64_t cache_ld, const int64_t *rows, hm_attn *attn, int64_t *ids,
                               float *w, int nthreads) {
    const int64_t D = L->D, HD = (int64_t)L->H * L->dh, QKV = HD + 2 * (int64_t)L->K * L->dh;
    const int64_t esz = L->bf16 ? 2 : 4, widest = D > HD ? D : HD;
    for (int64_t t = 0; t < N; t++) attn[t].cache = cache, attn[t].rows = cache_rows, attn[t].width = cache_ld;
    if (!hm_attn_blocks_ok(attn, (int)N)) return -2; /* (before qk_norm_rope writes the cache) */
    /* scratch, each 64-byte aligned: s1, h1, q (dtype); hf (fp32 activations), y (the q/k/v sums),
     * qf, o (attention's fp32 query and output), od (o's sums), logits, p, the norm's row; xp
     * (the GEMV's prepared activations, at most 4 bytes an element) */
    const size_t sizes[12] = {(size_t)(N * D * esz), (size_t)(N * D * esz), (size_t)(N * HD * esz),
                              (size_t)(N * widest * 4), (size_t)(N * QKV * 4), (size_t)(N * HD * 4),
                              (size_t)(N * HD * 4), (size_t)(N * D * 4), (size_t)(N * L->E * 4), (size_t)L->E * 4,
                              (size_t)D * 4, (size_t)(N * widest * 4)};
    size_t bytes = 0;
    for (int i = 0; i < 12; i++) bytes += (sizes[i] + 63) / 64 * 64;
    char *buf = hm_alloc64(bytes), *at = buf;
    if (!buf) return -1;
    void *part[12];
    for (int i = 0; i < 12; i++) part[i] = at, at += (sizes[i] + 63) / 64 * 64;
    void *s1 = part[0], *h1 = part[1], *q = part[2], *xp = part[11];
    float *hf = part[3], *y = part[4], *qf = part[5], *o = part[6], *od = part[7], *logits = part[8], *p = part[9],
          *scr = part[10];
    int rc = 0;
    const void *s = x;
    if (delta) {
        hm_add_rms_norm(x, delta, dbf16, s1, h1, L->norm1, N, D, L->eps1, L->bf16, scr);
        s = s1;
    } else {
        hm_add_rms_norm(x, NULL, 0, NULL, h1, L->norm1, N, D, L->eps1, L->bf16, scr);
    }
    hm_widen(h1, N * D, L->bf16, hf);
    hm_gemv_multi(variant, L->qkv, 3, hf, (int)N, y, xp, nthreads);
    rc = hm_qk_norm_rope(y, N, L->H, L->K, L->dh, L->qn, L->kn, L->qk_eps, cos, sin, L->interleaved, L->bf16, q,
                         cache, rows, cache_rows, cache_ld);
    if (rc == 0) {
        hm_widen(q, N * HD, L->bf16, qf);
        rc = hm_decode_attention(attn, (int)N, L->avx512, qf, o, nthreads);
    }
    if (rc == 0) {
        /* attention's output in the dtype, as the op calls hand it to the o GEMV (whose FP8 path
         * at one token reads the fp32 values, not only their bf16 rounding) */
        if (L->bf16)
            for (int64_t i = 0; i < N * HD; i++) o[i] = hm_bf16_to_f32(hm_f32_to_bf16(o[i]));
        hm_gemv_multi(variant, &L->o, 1, o, (int)N, od, xp, nthreads);
        hm_add_rms_norm(s, od, 0, x_out, h, L->norm2, N, D, L->eps2, L->bf16, scr);
        hm_widen(h, N * D, L->bf16, hf);
        hm_gemv_multi(variant, &L->router, 1, hf, (int)N, logits, xp, nthreads);
        hm_softmax_topk(logits, N, L->E, L->topk, L->norm_topk, L->bf16, p, ids, w);
    }
    free(buf);
    return rc;
}

#endif
