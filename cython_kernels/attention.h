/* Decode attention read straight out of a paged KV cache: one new token per sequence against its
 * cached positions, with no gather of the blocks into a contiguous copy and no conversion of the
 * cache to fp32 in memory (torch's path does both, then two batched matmuls; at Qwen3-30B-A3B's
 * heads and 528 positions this takes about half its time, see README).
 *
 * The cache is [rows][width] entries (bf16 or fp32); position p of the sequence is entry
 * blocks[p / block_size] * block_size + p % block_size. Query head h reads kv head
 * j = h / (heads / kv_heads), whose key is dk elements at k_off + j * k_head of the entry and whose
 * value is dv elements at v_off + j * v_head (GQA: keys then values, one head after the other).
 *
 * Work is split into ranges of positions over the threads, each keeping an online softmax
 * (running max, sum of exponentials, weighted sum of values) per head; the ranges are then merged
 * (flash-decoding). Scores and sums are fp32. */
#ifndef HYBRIDMOE_ATTENTION_H
#define HYBRIDMOE_ATTENTION_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef struct {
    const void *cache;
    int bf16;      /* 1: the cache holds bf16, 0: fp32 */
    int64_t rows;  /* entries in the cache */
    int64_t width; /* elements per entry */
    const int64_t *blocks;
    int64_t block_size, length;
    int heads, kv_heads, dk, dv;
    int64_t k_off, k_head, v_off, v_head;
    float scale;
} hm_attn;

#define HM_ATTN_CHUNK 16 /* positions scored at a time */
#define HM_ATTN_MIN_SPLIT 128 /* positions an item takes at least */

static inline const char *hm_attn_entry(const hm_attn *a, int64_t p) {
    const int64_t row = a->blocks[p / a->block_size] * a->block_size + p % a->block_size;
    return (const char *)a->cache + row * a->width * (a->bf16 ? 2 : 4);
}

static inline float hm_attn_elem(const hm_attn *a, const char *e, int64_t i) {
    if (!a->bf16) return ((const float *)e)[i];
    uint32_t u = (uint32_t)((const uint16_t *)e)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* An item's state, per head h: m[h] (running max of the scaled scores), l[h] (sum of exp(s - m)),
 * acc[h][dv] (sum of exp(s - m) v). */
static void hm_attn_item_generic(const hm_attn *a, const float *q, int64_t p0, int64_t p1, float *m,
                                 float *l, float *acc) {
    const int G = a->heads / a->kv_heads;
    for (int h = 0; h < a->heads; h++) m[h] = -INFINITY, l[h] = 0.f;
    memset(acc, 0, sizeof(float) * (size_t)a->heads * (size_t)a->dv);
    for (int64_t p = p0; p < p1; p++) {
        const char *e = hm_attn_entry(a, p);
        for (int h = 0; h < a->heads; h++) {
            const int j = h / G;
            const float *qh = q + (int64_t)h * a->dk;
            float s = 0.f;
            for (int d = 0; d < a->dk; d++) s += qh[d] * hm_attn_elem(a, e, a->k_off + j * a->k_head + d);
            s *= a->scale;
            const float mn = s > m[h] ? s : m[h], alpha = expf(m[h] - mn), w = expf(s - mn);
            l[h] = l[h] * alpha + w;
            float *ah = acc + (int64_t)h * a->dv;
            for (int d = 0; d < a->dv; d++) ah[d] = ah[d] * alpha + w * hm_attn_elem(a, e, a->v_off + j * a->v_head + d);
            m[h] = mn;
        }
    }
}

#if defined(__x86_64__)
#include "gemv_avx512.h" /* hm_transpose16 */
#define HM_ATTN_AVX512 HM_AVX512

/* e^x for x <= 0 (lanes below -87 come out as about 1.6e-38, not 0): 2^n e^r with |r| <= ln2 / 2
 * and e^r to degree 7, relative error about 1e-7. */
HM_ATTN_AVX512 static inline __m512 hm_exp_neg512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* 16 elements at e (bf16 or fp32) as fp32 */
HM_ATTN_AVX512 static inline __m512 hm_attn_load16(int bf16, const char *e, int64_t i) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)e + i))), 16));
    return _mm512_loadu_ps((const float *)e + i);
}

/* The item with dk and dv multiples of 16. Per chunk of up to 16 positions: the keys converted
 * to fp32 and transposed ([dk][16]), so that each head's 16 scores are dk FMAs with q's elements
 * broadcast and no horizontal sums; the online softmax on those 16 scores; the values converted
 * once to fp32 and summed into each head's acc. */
HM_ATTN_AVX512 static inline __attribute__((always_inline)) void hm_attn_item_avx512_t(
        const hm_attn *a, const float *q, int64_t p0, int64_t p1, float *m, float *l, float *acc, float *vb,
        float *kt, float *sp, float *al, const int bf16) {
    const int G = a->heads / a->kv_heads, nk = a->dk / 16, nv = a->dv / 16, dk = a->dk, dv = a->dv;
    const __m512 scale = _mm512_set1_ps(a->scale), ninf = _mm512_set1_ps(-INFINITY);
    for (int h = 0; h < a->heads; h++) m[h] = -INFINITY, l[h] = 0.f;
    memset(acc, 0, sizeof(float) * (size_t)a->heads * (size_t)dv);
    const char *ent[HM_ATTN_CHUNK];
    for (int64_t c0 = p0; c0 < p1; c0 += HM_ATTN_CHUNK) {
        const int n = (int)(p1 - c0 < HM_ATTN_CHUNK ? p1 - c0 : HM_ATTN_CHUNK);
        const __mmask16 live = (__mmask16)((1u << n) - 1);
        for (int i = 0; i < n; i++) ent[i] = hm_attn_entry(a, c0 + i);
        for (int j = 0; j < a->kv_heads; j++) {
        const int64_t ko = a->k_off + j * a->k_head, vo = a->v_off + j * a->v_head;
        for (int i = 0; i < n; i++) {
            for (int c = 0; c < nv; c++) /* values, fp32 [i][dv] */
                _mm512_store_ps(vb + (int64_t)i * dv + 16 * c, hm_attn_load16(bf16, ent[i], vo + 16 * c));
        }
        for (int c = 0; c < nk; c++) { /* keys, fp32 transposed: kt[d][i] */
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = i < n ? _mm512_castps_si512(hm_attn_load16(bf16, ent[i], ko + 16 * c)) : _mm512_setzero_si512();
            hm_transpose16(r);
            for (int d = 0; d < 16; d++) _mm512_store_si512(kt + (int64_t)(16 * c + d) * 16, r[d]);
        }
        /* three passes over the kv head's group of query heads: scores, softmax, values (about
         * 40 cycles a position and query head on this VM, with the data in L2 or not: bound by
         * the arithmetic and its latencies, not by memory) */
        for (int g = 0; g < G; g += 2) { /* scores, two heads at a time */
            const float *qa = q + (int64_t)(j * G + g) * dk, *qb = g + 1 < G ? qa + dk : qa;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int d = 0; d < dk; d += 4) {
                const float *k0 = kt + (int64_t)d * 16;
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(qa[d]), _mm512_load_ps(k0), a0);
                b0 = _mm512_fmadd_ps(_mm512_set1_ps(qb[d]), _mm512_load_ps(k0), b0);
                a1 = _mm512_fmadd_ps(_mm512_set1_ps(qa[d + 1]), _mm512_load_ps(k0 + 16), a1);
                b1 = _mm512_fmadd_ps(_mm512_set1_ps(qb[d + 1]), _mm512_load_ps(k0 + 16), b1);
                a2 = _mm512_fmadd_ps(_mm512_set1_ps(qa[d + 2]), _mm512_load_ps(k0 + 32), a2);
                b2 = _mm512_fmadd_ps(_mm512_set1_ps(qb[d + 2]), _mm512_load_ps(k0 + 32), b2);
                a3 = _mm512_fmadd_ps(_mm512_set1_ps(qa[d + 3]), _mm512_load_ps(k0 + 48), a3);
                b3 = _mm512_fmadd_ps(_mm512_set1_ps(qb[d + 3]), _mm512_load_ps(k0 + 48), b3);
            }
            _mm512_store_ps(sp + 16 * g, _mm512_mask_mul_ps(ninf, live, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), scale));
            if (g + 1 < G)
                _mm512_store_ps(sp + 16 * (g + 1), _mm512_mask_mul_ps(ninf, live, _mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3)), scale));
        }
        for (int g = 0; g < G; g++) { /* the online softmax: scores -> weights in place */
            const int h = j * G + g;
            const __m512 sv = _mm512_load_ps(sp + 16 * g);
            const float cm = _mm512_reduce_max_ps(sv), mn = cm > m[h] ? cm : m[h];
            const float alpha = m[h] == -INFINITY ? 0.f : expf(m[h] - mn);
            const __m512 e = _mm512_maskz_mov_ps(live, hm_exp_neg512(_mm512_sub_ps(sv, _mm512_set1_ps(mn))));
            l[h] = l[h] * alpha + _mm512_reduce_add_ps(e);
            m[h] = mn;
            al[g] = alpha;
            _mm512_store_ps(sp + 16 * g, e);
        }
        for (int g = 0; g < G; g++) { /* acc = alpha acc + sum of weight x value */
            const float *pr = sp + 16 * g;
            float *ag = acc + (int64_t)(j * G + g) * dv;
            const __m512 alv = _mm512_set1_ps(al[g]);
            int c0v = 0;
            for (; c0v + 8 <= nv; c0v += 8) { /* 8 vectors of acc in registers (a constant count, so
                                                 * that the compiler keeps them there) */
                __m512 r[8];
                for (int c = 0; c < 8; c++) r[c] = _mm512_mul_ps(_mm512_loadu_ps(ag + 16 * (c0v + c)), alv);
                for (int i = 0; i < n; i++) {
                    const __m512 w = _mm512_set1_ps(pr[i]);
                    const float *vi = vb + (int64_t)i * dv + 16 * c0v;
                    for (int c = 0; c < 8; c++) r[c] = _mm512_fmadd_ps(w, _mm512_load_ps(vi + 16 * c), r[c]);
                }
                for (int c = 0; c < 8; c++) _mm512_storeu_ps(ag + 16 * (c0v + c), r[c]);
            }
            for (; c0v < nv; c0v++) { /* the rest one vector at a time */
                __m512 r = _mm512_mul_ps(_mm512_loadu_ps(ag + 16 * c0v), alv);
                for (int i = 0; i < n; i++) r = _mm512_fmadd_ps(_mm512_set1_ps(pr[i]), _mm512_load_ps(vb + (int64_t)i * dv + 16 * c0v), r);
                _mm512_storeu_ps(ag + 16 * c0v, r);
            }
        }
        }
    }
}

HM_ATTN_AVX512 static void hm_attn_item_avx512(const hm_attn *a, const float *q, int64_t p0, int64_t p1, float *m,
                                               float *l, float *acc, float *vb) {
    /* the thread's scratch: values [16][dv], keys [dk][16], a group's scores [G][16], alphas [G] */
    float *kt = vb + HM_ATTN_CHUNK * (int64_t)a->dv, *sp = kt + HM_ATTN_CHUNK * (int64_t)a->dk;
    float *al = sp + HM_ATTN_CHUNK * (int64_t)(a->heads / a->kv_heads);
    if (a->bf16) hm_attn_item_avx512_t(a, q, p0, p1, m, l, acc, vb, kt, sp, al, 1);
    else hm_attn_item_avx512_t(a, q, p0, p1, m, l, acc, vb, kt, sp, al, 0);
}
#endif

/* Whether every block the n sequences read lies in their cache's rows. */
static int hm_attn_blocks_ok(const hm_attn *as, int n) {
    for (int i = 0; i < n; i++)
        for (int64_t j = 0; j < (as[i].length + as[i].block_size - 1) / as[i].block_size; j++)
            if (as[i].blocks[j] < 0 || (as[i].blocks[j] + 1) * as[i].block_size > as[i].rows) return 0;
    return 1;
}

/* n sequences at once (decode's one-token steps of a layer): as[i] is sequence i, sharing the
 * cache, its layout and the head counts with the others and with its own blocks and length;
 * out [n][heads][dv] fp32 = attention of q [n][heads][dk] fp32. One call and one fork for all of
 * them. avx512: the vector item (needs dk and dv multiples of 16), else the portable one.
 * Returns 0, -1 if out of memory, -2 if a block id lies outside the cache's rows. */
static int hm_decode_attention(const hm_attn *as, int n, int avx512, const float *q, float *out, int nthreads) {
    const hm_attn *a = as; /* what the sequences share */
    if (!hm_attn_blocks_ok(as, n)) return -2;
    const int H = a->heads;
    const int64_t per = (int64_t)H * (a->dv + 2);
    /* items: ranges of positions, each for every head, so that a thread reads whole entries one
     * after the other (items of one kv head each, which read a few hundred bytes of every 4 KB
     * entry, took 1.09 against 0.85 ms at 4000 positions). About two per thread over all the
     * sequences, none shorter than HM_ATTN_MIN_SPLIT positions. */
    int64_t *first = malloc(sizeof(int64_t) * ((size_t)n + 1)); /* sequence i's items: [first[i], first[i + 1]) */
    if (!first) return -1;
    first[0] = 0;
    for (int i = 0; i < n; i++) {
        const int64_t L = as[i].length > 0 ? as[i].length : 0;
        int64_t S = (2 * (int64_t)nthreads + n - 1) / n;
        const int64_t most = (L + HM_ATTN_MIN_SPLIT - 1) / HM_ATTN_MIN_SPLIT;
        if (S > most) S = most;
        first[i + 1] = first[i] + S; /* none for an empty sequence */
    }
    const int64_t items = first[n];
    /* floats a thread (hm_attn_item_avx512), a multiple of 16 */
    const size_t G = (size_t)(a->heads / a->kv_heads);
    const size_t scratch = HM_ATTN_CHUNK * ((size_t)a->dv + (size_t)a->dk + G) + (G + 15) / 16 * 16;
    float *st = aligned_alloc(64, (size_t)(((items > 0 ? items : 1) * per * 4 + 63) / 64 * 64));
    float *vb = aligned_alloc(64, (size_t)nthreads * scratch * 4);
    if (!st || !vb) {
        free(st);
        free(vb);
        free(first);
        return -1;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < items; it++) {
        int i = 0;
        while (it >= first[i + 1]) i++;
        const int64_t S = first[i + 1] - first[i], s = it - first[i], L = as[i].length;
        const int64_t p0 = L * s / S, p1 = L * (s + 1) / S;
        const float *qi = q + (int64_t)i * H * a->dk;
        float *m = st + it * per, *l = m + H, *acc = l + H;
#if defined(__x86_64__)
        if (avx512) {
            hm_attn_item_avx512(&as[i], qi, p0, p1, m, l, acc, vb + (size_t)omp_get_thread_num() * scratch);
            continue;
        }
#else
        (void)avx512;
#endif
        hm_attn_item_generic(&as[i], qi, p0, p1, m, l, acc);
    }
    for (int i = 0; i < n; i++) /* merge each sequence's items (none: zeros) */
        for (int h = 0; h < H; h++) {
            float M = -INFINITY, sum = 0.f;
            for (int64_t it = first[i]; it < first[i + 1]; it++) {
                const float ms = st[it * per + h];
                M = ms > M ? ms : M;
            }
            float *o = out + ((int64_t)i * H + h) * a->dv;
            memset(o, 0, sizeof(float) * (size_t)a->dv);
            for (int64_t it = first[i]; it < first[i + 1]; it++) {
                const float *base = st + it * per;
                if (base[h] == -INFINITY) continue;
                const float w = expf(base[h] - M);
                sum += w * base[H + h];
                const float *acc = base + 2 * H + (int64_t)h * a->dv;
                for (int d = 0; d < a->dv; d++) o[d] += w * acc[d];
            }
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            for (int d = 0; d < a->dv; d++) o[d] *= inv;
        }
    free(st);
    free(vb);
    free(first);
    return 0;
}

#endif
