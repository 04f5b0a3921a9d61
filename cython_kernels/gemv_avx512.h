/* AVX-512 (BW + VBMI + BF16) kernels. Compiled with per-function target attributes so that the
 * extension builds with any flags and runs on any x86-64: these functions are only called after
 * CPUID says the CPU has the features.
 *
 * Weights become bf16 in registers and meet bf16 activations in VDPBF16PS (32 products per op).
 *  - FP8 e4m3: two VPERMI2B table lookups map each byte's 7 magnitude bits to the high and low
 *    byte of its exact bf16 value (subnormals included: VDPBF16PS would flush a bf16 built by
 *    shifting the bits, whose exponent is too small), the sign bit is merged back with one
 *    VPTERNLOG and VPUNPCK{L,H}BW interleave the bytes into words: 6 ops per 64 weights.
 *  - INT4: nibbles are masked out and looked up (VPSHUFB) into bf16 of q - 8.
 *  - BF16: loaded as is.
 * VPUNPCK works within 128-bit lanes, so the decoded weights come out in a fixed permutation
 * of their chunk; hm_prepare_x_avx512 lays the activations out in the same permutation once per
 * call, so the products pair up without shuffling weights.
 *
 * Scales: FP8 partial sums are kept per 128-column block and multiplied by the block scale;
 * INT4 chunks of 128 weights hold one group per 128-bit lane (g32) or one group (g128), so the
 * chunk's sums are multiplied by a per-lane scale vector. */
#ifndef HYBRIDMOE_GEMV_AVX512_H
#define HYBRIDMOE_GEMV_AVX512_H

#if defined(__x86_64__)
#include <immintrin.h>
#include "cpu_features.h"
#include "gemv_generic.h"

#define HM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")))
#define HM_TB 8 /* tokens whose sums stay in registers */
#ifndef HM_PREFETCH
#define HM_PREFETCH 4096 /* bytes ahead of the weight stream: hides DRAM latency behind the decode */
#endif
/* Into L2: a prefetch into L1 holds one of the core's few line-fill buffers until DRAM answers,
 * which caps the reads in flight (a BF16 row stream: 0.85 of the bandwidth into L1, 0.95 into L2;
 * rows of 2048: 0.65 against 0.87). */
#define HM_ROW_HINT _MM_HINT_T1
/* A second prefetch per weight line, half as far ahead, for the one-stream kernels whose compute
 * is cheapest (FP8 through FP16, BF16 at fp32): every line is asked for twice. Measured with the
 * probe (`probe dram`, 2 threads), one token: in 4 KB pages FP8 2.8-5.1 % and BF16 4-5.5 % faster
 * on 2048 x 7168, 7168 x 2048 and 2048 x 768; in 2 MB pages (HM_PROBE_HUGE=1) FP8 2048 x 7168 538
 * -> 462 us, BF16 918 -> 883 us. The plain read (hm_read_sum) gains nothing from it; neither do
 * the INT4 VNNI loop (g128 nothing, g32 3 % in 2 MB pages only) and the FP8-to-bf16 one, whose
 * compute per line is longer; a further prefetch 1-2 KB ahead in each row of the 16-row INT4
 * tile kernel made it up to 21 % slower on rows of 7168. */
#ifndef HM_PREFETCH_NEAR
#define HM_PREFETCH_NEAR 2048
#endif
#define HM_PREFETCH_TWICE(p)                                                   \
    (_mm_prefetch((const char *)(p) + HM_PREFETCH_NEAR, HM_ROW_HINT),           \
     _mm_prefetch((const char *)(p) + HM_PREFETCH, HM_ROW_HINT))

static uint8_t hm_fp8_bf16_lo[128] __attribute__((aligned(64)));
static uint8_t hm_fp8_bf16_hi[128] __attribute__((aligned(64)));
static uint8_t hm_fp8s_bf16_lo[128] __attribute__((aligned(64))); /* the same, times 2^-104 (AMX) */
static uint8_t hm_fp8s_bf16_hi[128] __attribute__((aligned(64)));
static uint8_t hm_int4_bf16_lo[64] __attribute__((aligned(64)));
static uint8_t hm_int4_bf16_hi[64] __attribute__((aligned(64)));
static int hm_avx512_ready = 0;

static void hm_init_amx(void);
static void hm_init_int4_amx(void);
static void hm_init_prepare(void);
static void hm_init_amx8(void);
static void hm_init_vnni(void);
static void hm_init_fp16(void);
static int hm_amx_int8 = 0;         /* AMX-INT8 too (with AMX-BF16 usable) */
static int hm_amx_int8_enabled = 0; /* ... and INT4 may use it (HYBRIDMOE_AMX_INT8=0, set_amx_int8) */

static void hm_init_avx512(void) {
    if (hm_avx512_ready) return;
    hm_init_generic();
    hm_init_amx();
    hm_init_int4_amx();
    hm_init_prepare();
    hm_init_amx8();
    hm_init_vnni();
    hm_init_fp16();
    for (int em = 0; em < 128; em++) {
        uint16_t h = em == 0x7f ? 0 : hm_f32_to_bf16(hm_e4m3_to_f32((uint8_t)em)); /* 0x7f is NaN */
        hm_fp8_bf16_lo[em] = (uint8_t)(h & 0xff);
        hm_fp8_bf16_hi[em] = (uint8_t)(h >> 8);
        uint16_t hs = em == 0x7f ? 0 : hm_f32_to_bf16(ldexpf(hm_e4m3_to_f32((uint8_t)em), -104));
        hm_fp8s_bf16_lo[em] = (uint8_t)(hs & 0xff);
        hm_fp8s_bf16_hi[em] = (uint8_t)(hs >> 8);
    }
    for (int i = 0; i < 64; i++) { /* the 16-entry table repeated in each 128-bit lane */
        uint16_t h = hm_f32_to_bf16((float)((i & 15) - 8));
        hm_int4_bf16_lo[i] = (uint8_t)(h & 0xff);
        hm_int4_bf16_hi[i] = (uint8_t)(h >> 8);
    }
    hm_avx512_ready = 1;
}

/* Position in the natural order of the p-th element of a decoded 64-byte vector pair. */
static inline int hm_unpack_src(int p) { /* p in [0, 64): first 32 from UNPCKL, next 32 from UNPCKH */
    int half = p >> 5, q = p & 31, lane = q >> 3, i = q & 7;
    return lane * 16 + half * 8 + i;
}

/* Word indices for VPERMT2W: even and odd words of a register pair, and hm_unpack_src's order. */
static uint16_t hm_pw_even[32] __attribute__((aligned(64)));
static uint16_t hm_pw_odd[32] __attribute__((aligned(64)));
static uint16_t hm_pw_unpack[2][32] __attribute__((aligned(64)));

static void hm_init_prepare(void) {
    for (int k = 0; k < 32; k++) {
        hm_pw_even[k] = (uint16_t)(2 * k);
        hm_pw_odd[k] = (uint16_t)(2 * k + 1);
        hm_pw_unpack[0][k] = (uint16_t)hm_unpack_src(k);
        hm_pw_unpack[1][k] = (uint16_t)hm_unpack_src(32 + k);
    }
}

/* 16 fp32 -> dwords holding their bf16 (as hm_f32_to_bf16: nearest even, NaN kept) in the low half. */
HM_AVX512 static inline __m512i hm_bf16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

/* 32 fp32 -> 32 bf16 words, in order. */
HM_AVX512 static inline __m512i hm_bf16x32(const float *x, __m512i even) {
    return _mm512_permutex2var_epi16(hm_bf16_bits(_mm512_loadu_ps(x)), even, hm_bf16_bits(_mm512_loadu_ps(x + 16)));
}

/* x [T][in] fp32 -> xp [T][in] bf16, each full chunk in the order its weights decode to:
 * converted 32 at a time, then put in that order by word permutes (VPERMT2W). */
HM_AVX512 static void hm_prepare_x_avx512(int fmt, const float *x, int T, int64_t in, uint16_t *xp) {
    const __m512i even = _mm512_load_si512(hm_pw_even), odd = _mm512_load_si512(hm_pw_odd);
    const __m512i u0 = _mm512_load_si512(hm_pw_unpack[0]), u1 = _mm512_load_si512(hm_pw_unpack[1]);
    for (int t = 0; t < T; t++) {
        const float *xt = x + (int64_t)t * in;
        uint16_t *dt = xp + (int64_t)t * in;
        int64_t c = 0;
        if (fmt == HM_FP8_B128) {
            for (; c + 64 <= in; c += 64) {
                __m512i a = hm_bf16x32(xt + c, even), b = hm_bf16x32(xt + c + 32, even);
                _mm512_storeu_si512(dt + c, _mm512_permutex2var_epi16(a, u0, b));
                _mm512_storeu_si512(dt + c + 32, _mm512_permutex2var_epi16(a, u1, b));
            }
        } else if (fmt == HM_INT4) { /* per 128: low nibbles (even columns) first, then high (odd) */
            for (; c + 128 <= in; c += 128) {
                __m512i n0 = hm_bf16x32(xt + c, even), n1 = hm_bf16x32(xt + c + 32, even);
                __m512i n2 = hm_bf16x32(xt + c + 64, even), n3 = hm_bf16x32(xt + c + 96, even);
                __m512i el = _mm512_permutex2var_epi16(n0, even, n1), eh = _mm512_permutex2var_epi16(n2, even, n3);
                __m512i ol = _mm512_permutex2var_epi16(n0, odd, n1), oh = _mm512_permutex2var_epi16(n2, odd, n3);
                _mm512_storeu_si512(dt + c, _mm512_permutex2var_epi16(el, u0, eh));
                _mm512_storeu_si512(dt + c + 32, _mm512_permutex2var_epi16(el, u1, eh));
                _mm512_storeu_si512(dt + c + 64, _mm512_permutex2var_epi16(ol, u0, oh));
                _mm512_storeu_si512(dt + c + 96, _mm512_permutex2var_epi16(ol, u1, oh));
            }
        } else {
            for (; c + 32 <= in; c += 32) _mm512_storeu_si512(dt + c, hm_bf16x32(xt + c, even));
        }
        for (; c < in; c++) dt[c] = hm_f32_to_bf16(xt[c]);
    }
}

HM_AVX512 static inline __m512 hm_dp(__m512 acc, __m512i w, __m512i x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
}

/* Scalar tail [c0, in) of row r against token t's prepared activations (natural order there). */
static inline float hm_tail(const hm_weight *w, int64_t r, int64_t c0, const uint16_t *xt) {
    float chunk[HM_CHUNK], s = 0.f;
    for (int64_t c = c0; c < w->cols; c += HM_CHUNK) {
        int n = (int)((w->cols - c) < HM_CHUNK ? (w->cols - c) : HM_CHUNK);
        hm_decode_chunk(w, r, c, n, chunk);
        for (int j = 0; j < n; j++) s += chunk[j] * hm_bf16_to_f32(xt[c + j]);
    }
    return s;
}

/* y[t][r] = the lanes of total[t] summed, plus the scalar tail of columns [full, cols). */
HM_AVX512 static inline __attribute__((always_inline)) void hm_store_row(
        const hm_weight *w, int64_t r, int64_t full, const uint16_t *xp, int t0, const int nt,
        const __m512 *total, float *y, int64_t ldy) {
    for (int t = 0; t < nt; t++) {
        float tail = full < w->cols ? hm_tail(w, r, full, xp + (int64_t)(t0 + t) * w->cols) : 0.f;
        y[(t0 + t) * ldy + r] = _mm512_reduce_add_ps(total[t]) + tail;
    }
}

/* The FP8 decode's tables in registers, and 64 e4m3 bytes -> two vectors of 32 bf16 (in the
 * permutation hm_prepare_x_avx512 lays the activations out in). */
typedef struct {
    __m512i lo_a, lo_b, hi_a, hi_b, sign;
} hm_fp8_tables;

HM_AVX512 static inline __attribute__((always_inline)) hm_fp8_tables hm_fp8_tables_of(const uint8_t *lo,
                                                                                      const uint8_t *hi) {
    hm_fp8_tables t = {_mm512_load_si512(lo), _mm512_load_si512(lo + 64), _mm512_load_si512(hi),
                       _mm512_load_si512(hi + 64), _mm512_set1_epi8((char)0x80)};
    return t;
}

HM_AVX512 static inline __attribute__((always_inline)) hm_fp8_tables hm_fp8_tables_load(void) {
    return hm_fp8_tables_of(hm_fp8_bf16_lo, hm_fp8_bf16_hi);
}

HM_AVX512 static inline __attribute__((always_inline)) void hm_fp8_decode64(const hm_fp8_tables *t, __m512i b,
                                                                           __m512i *w0, __m512i *w1) {
    __m512i lo = _mm512_permutex2var_epi8(t->lo_a, b, t->lo_b);
    __m512i hi = _mm512_ternarylogic_epi32(t->sign, b, _mm512_permutex2var_epi8(t->hi_a, b, t->hi_b), 0xCA);
    *w0 = _mm512_unpacklo_epi8(lo, hi);
    *w1 = _mm512_unpackhi_epi8(lo, hi);
}

/* One row, tokens [t0, t0 + nt): inlined with nt a constant so that the sums stay in registers. */
HM_AVX512 static inline __attribute__((always_inline)) void hm_row_fp8_nt(
        const hm_weight *w, int64_t r, const uint16_t *xp, int t0, const int nt, float *y, int64_t ldy) {
    const hm_fp8_tables tab = hm_fp8_tables_load();
    const uint8_t *row = w->data + r * w->cols;
    const float *sc = (const float *)w->scale + (r / 128) * ((w->cols + 127) / 128);
    const int64_t full = w->cols / 64 * 64;
    __m512 total[HM_TB], b0[HM_TB], b1[HM_TB];
    for (int t = 0; t < nt; t++) total[t] = b0[t] = b1[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 64) {
        _mm_prefetch((const char *)(row + c + HM_PREFETCH), HM_ROW_HINT);
        __m512i w0, w1;
        hm_fp8_decode64(&tab, _mm512_loadu_si512(row + c), &w0, &w1);
        for (int t = 0; t < nt; t++) {
            const uint16_t *xt = xp + (int64_t)(t0 + t) * w->cols + c;
            b0[t] = hm_dp(b0[t], w0, _mm512_loadu_si512(xt));
            b1[t] = hm_dp(b1[t], w1, _mm512_loadu_si512(xt + 32));
        }
        if ((c & 127) == 64 || c + 64 == full) { /* end of a 128-column scale block */
            __m512 s = _mm512_set1_ps(sc[c / 128]);
            for (int t = 0; t < nt; t++) {
                total[t] = _mm512_fmadd_ps(_mm512_add_ps(b0[t], b1[t]), s, total[t]);
                b0[t] = b1[t] = _mm512_setzero_ps();
            }
        }
    }
    hm_store_row(w, r, full, xp, t0, nt, total, y, ldy);
}

HM_AVX512 static void hm_row_fp8(const hm_weight *w, int64_t r, const uint16_t *xp, int T, float *y,
                                 int64_t ldy) {
    HM_TOKEN_BLOCKS(hm_row_fp8_nt, HM_TB)
}

/* Four bf16 group scales -> fp32, 128-bit lane g holding sc[g] (a 128-weight INT4 chunk at groups
 * of 32 holds group g in lane g). */
HM_AVX512 static inline __m512 hm_g32_scale_lanes(const uint16_t *sc) {
    __m128 f = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)sc)), 16));
    return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                                 _mm512_castps128_ps512(f));
}

HM_AVX512 static inline __m512 hm_int4_scales(const hm_weight *w, int64_t r, int64_t c) {
    const uint16_t *sc = (const uint16_t *)w->scale + r * (w->cols / w->group) + c / w->group;
    if (w->group == 128) return _mm512_set1_ps(hm_bf16_to_f32(sc[0]));
    return hm_g32_scale_lanes(sc);
}

HM_AVX512 static inline __attribute__((always_inline)) void hm_row_int4_nt(
        const hm_weight *w, int64_t r, const uint16_t *xp, int t0, const int nt, float *y, int64_t ldy) {
    const __m512i tlo = _mm512_load_si512(hm_int4_bf16_lo), thi = _mm512_load_si512(hm_int4_bf16_hi);
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const uint8_t *row = w->data + r * (w->cols / 2);
    const int64_t full = w->cols / 128 * 128;
    __m512 total[HM_TB];
    for (int t = 0; t < nt; t++) total[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 128) {
        _mm_prefetch((const char *)(row + c / 2 + HM_PREFETCH), HM_ROW_HINT);
        __m512i b = _mm512_loadu_si512(row + c / 2);
        __m512i ql = _mm512_and_si512(b, nib), qh = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
        __m512i ll = _mm512_shuffle_epi8(tlo, ql), lh = _mm512_shuffle_epi8(thi, ql);
        __m512i hl = _mm512_shuffle_epi8(tlo, qh), hh = _mm512_shuffle_epi8(thi, qh);
        __m512i w0 = _mm512_unpacklo_epi8(ll, lh), w1 = _mm512_unpackhi_epi8(ll, lh);
        __m512i w2 = _mm512_unpacklo_epi8(hl, hh), w3 = _mm512_unpackhi_epi8(hl, hh);
        __m512 s = hm_int4_scales(w, r, c);
        for (int t = 0; t < nt; t++) {
            const uint16_t *xt = xp + (int64_t)(t0 + t) * w->cols + c;
            __m512 a = hm_dp(_mm512_setzero_ps(), w0, _mm512_loadu_si512(xt));
            __m512 a2 = hm_dp(_mm512_setzero_ps(), w1, _mm512_loadu_si512(xt + 32));
            a = hm_dp(a, w2, _mm512_loadu_si512(xt + 64));
            a2 = hm_dp(a2, w3, _mm512_loadu_si512(xt + 96));
            total[t] = _mm512_fmadd_ps(_mm512_add_ps(a, a2), s, total[t]);
        }
    }
    hm_store_row(w, r, full, xp, t0, nt, total, y, ldy);
}

HM_AVX512 static void hm_row_int4(const hm_weight *w, int64_t r, const uint16_t *xp, int T, float *y,
                                  int64_t ldy) {
    HM_TOKEN_BLOCKS(hm_row_int4_nt, HM_TB)
}

HM_AVX512 static inline __attribute__((always_inline)) void hm_row_bf16_nt(
        const hm_weight *w, int64_t r, const uint16_t *xp, int t0, const int nt, float *y, int64_t ldy) {
    const uint16_t *row = (const uint16_t *)w->data + r * w->cols;
    __m512 a0[HM_TB], a1[HM_TB];
    for (int t = 0; t < nt; t++) a0[t] = a1[t] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 64 <= w->cols; c += 64) {
        _mm_prefetch((const char *)(row + c) + HM_PREFETCH, HM_ROW_HINT);
        _mm_prefetch((const char *)(row + c) + HM_PREFETCH + 64, HM_ROW_HINT);
        __m512i v0 = _mm512_loadu_si512(row + c), v1 = _mm512_loadu_si512(row + c + 32);
        for (int t = 0; t < nt; t++) {
            const uint16_t *xt = xp + (int64_t)(t0 + t) * w->cols + c;
            a0[t] = hm_dp(a0[t], v0, _mm512_loadu_si512(xt));
            a1[t] = hm_dp(a1[t], v1, _mm512_loadu_si512(xt + 32));
        }
    }
    for (; c < w->cols; c += 32) {
        __mmask32 m = w->cols - c >= 32 ? 0xffffffffu : (__mmask32)((1u << (w->cols - c)) - 1);
        __m512i v = _mm512_maskz_loadu_epi16(m, row + c);
        for (int t = 0; t < nt; t++)
            a0[t] = hm_dp(a0[t], v, _mm512_maskz_loadu_epi16(m, xp + (int64_t)(t0 + t) * w->cols + c));
    }
    for (int t = 0; t < nt; t++) y[(t0 + t) * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
}

HM_AVX512 static void hm_row_bf16(const hm_weight *w, int64_t r, const uint16_t *xp, int T, float *y,
                                  int64_t ldy) {
    HM_TOKEN_BLOCKS(hm_row_bf16_nt, HM_TB)
}

/* BF16 at one token in fp32. A bf16 weight is the high half of its fp32, so a 64-byte load of 32
 * weights gives the odd columns' fp32 by clearing the low halves (one AND) and the even columns'
 * by shifting them up (one shift); they meet the fp32 activations (each 32-column chunk's 16 even
 * columns, then its 16 odd ones: hm_build_xf_bf16) in FMAs: 4 ops of the two vector ports per 32
 * weights, against two VDPBF16PS, which hold both ports about 2.2 cycles each. In L1, one thread,
 * the two run about as fast (3.6 against 4.0 cycles per 32 weights: this one's loads of the fp32
 * activations weigh too), but from DRAM this one reads faster: 2048 x 7168 and
 * 7168 x 2048 copies over 1 GB, 2 threads, one process alternating, 0.97-0.98 against 0.86-0.88
 * of a plain read of the same bytes. The products are exact and summed in fp32 against the
 * activations as given (the bf16 kernel rounds them to bf16 first).
 * Rows are read one after the other, one linear stream prefetched into L2 twice (HM_PREFETCH_TWICE). */
static inline int hm_bf16_f32_applies(const hm_weight *w, int T) {
    return w->fmt == HM_DENSE_BF16 && T == 1 && w->cols >= 32;
}

/* Words of that layout: the columns, padded to 16. */
static inline size_t hm_bf16_f32_xb_words(int64_t cols) { return ((size_t)cols + 15) / 16 * 16; }

/* One token's fp32 activations -> xf: each full 32-column chunk's even columns, then its odd
 * ones; the tail (past the last full 32) as it is. */
HM_AVX512 static void hm_build_xf_bf16(const float *x, int64_t cols, float *xf) {
    const __m512i ie = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i io = _mm512_add_epi32(ie, _mm512_set1_epi32(1));
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {
        const __m512 a = _mm512_loadu_ps(x + c), b = _mm512_loadu_ps(x + c + 16);
        _mm512_store_ps(xf + c, _mm512_permutex2var_ps(a, ie, b));
        _mm512_store_ps(xf + c + 16, _mm512_permutex2var_ps(a, io, b));
    }
    for (; c < cols; c++) xf[c] = x[c];
}

/* The 32 weights at row + c against xf + c, into the even and odd sums. */
HM_AVX512 static inline __attribute__((always_inline)) void hm_bf16_f32_step(const uint16_t *row, int64_t c,
                                                                            const float *xf, __m512 *ae,
                                                                            __m512 *ao) {
    HM_PREFETCH_TWICE(row + c);
    __m512i v = _mm512_loadu_si512(row + c);
    __asm__("" : "+v"(v)); /* one load: GCC would fold it into both the shift and the AND */
    *ae = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_load_ps(xf + c), *ae);
    *ao = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000))),
                          _mm512_load_ps(xf + c + 16), *ao);
}

HM_AVX512 static void hm_rows_bf16_f32(const hm_weight *w, const float *xf, float *y, int64_t r0, int64_t r1) {
    const int64_t full = w->cols / 32 * 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *row = (const uint16_t *)w->data + r * w->cols;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0; /* two chains each: FMA latency */
        int64_t c = 0;
        for (; c + 64 <= full; c += 64) {
            hm_bf16_f32_step(row, c, xf, &a0, &a1);
            hm_bf16_f32_step(row, c + 32, xf, &a2, &a3);
        }
        if (c < full) hm_bf16_f32_step(row, c, xf, &a0, &a1);
        float tail = 0.f;
        for (c = full; c < w->cols; c++) tail += hm_bf16_to_f32(row[c]) * xf[c];
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + tail;
    }
}

/* r[t] (16 dwords each) -> r[k] = dword k of r[0..15]: a 16 x 16 transpose in 64 shuffles. */
HM_AVX512 static inline void hm_transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* r[i + k], lane L: dword 4L + k of rows i..i+3 */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; k++) {
        __m512i u0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x44), u1 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x44);
        __m512i u2 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xEE), u3 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xEE);
        t[k] = _mm512_shuffle_i32x4(u0, u1, 0x88);
        t[4 + k] = _mm512_shuffle_i32x4(u0, u1, 0xDD);
        t[8 + k] = _mm512_shuffle_i32x4(u2, u3, 0x88);
        t[12 + k] = _mm512_shuffle_i32x4(u2, u3, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

#include "gemv_amx.h"

static void hm_gemv_rows_avx512(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T, float *y,
                                int64_t ldy, int64_t r0, int64_t r1) {
    if (xb && hm_int4_vnni_applies(w, T)) {
        hm_rows_int4_vnni(w, xb, T, y, ldy, r0, r1);
        return;
    }
    if (xb && hm_fp8_fp16_applies(w, T)) {
        hm_rows_fp8_t1_fp16(w, xp, xb, y, r0, r1);
        return;
    }
    if (xb && hm_fp8_t1_applies(w, T)) {
        hm_rows_fp8_t1(w, xp, (const uint16_t *)xb, y, r0, r1);
        return;
    }
    if (xb && hm_bf16_f32_applies(w, T)) {
        hm_rows_bf16_f32(w, (const float *)xb, y, r0, r1);
        return;
    }
    if (xb && hm_amx_applies(w, T))
        for (; r0 + 16 <= r1; r0 += 16) {
            if (w->fmt == HM_FP8_B128 && T > HM_AMX_MAX_T) hm_rows16_fp8_amx_wide(w, xp, xb, T, y, ldy, r0);
            else if (w->fmt == HM_FP8_B128) hm_rows16_fp8_amx(w, xp, xb, T, y, ldy, r0);
            else if (w->fmt == HM_INT4 && hm_int4_amx8_applies(w, T)) hm_rows16_int4_amx8(w, xb, T, y, ldy, r0);
            else if (w->fmt == HM_INT4) hm_rows16_int4_amx(w, xp, xb, T, y, ldy, r0);
            else if (T > HM_AMX_MAX_T) hm_rows16_bf16_amx_wide(w, xp, xb, T, y, ldy, r0);
            else hm_rows16_bf16_amx(w, xp, xb, T, y, ldy, r0);
        }
    for (int64_t r = r0; r < r1; r++) {
        if (w->fmt == HM_FP8_B128) hm_row_fp8(w, r, xp, T, y, ldy);
        else if (w->fmt == HM_INT4) hm_row_int4(w, r, xp, T, y, ldy);
        else hm_row_bf16(w, r, xp, T, y, ldy);
    }
}

#endif /* __x86_64__ */
#endif
