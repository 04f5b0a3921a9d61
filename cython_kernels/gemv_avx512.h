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
#include "gemv_generic.h"

#define HM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")))
#define HM_TB 8 /* tokens whose sums stay in registers */
#ifndef HM_PREFETCH
#define HM_PREFETCH 4096 /* bytes ahead of the weight stream: hides DRAM latency behind the decode */
#endif

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
static int hm_amx_int8 = 0;         /* AMX-INT8 too (with AMX-BF16 usable) */
static int hm_amx_int8_enabled = 0; /* ... and INT4 may use it (HYBRIDMOE_AMX_INT8=0, set_amx_int8) */

static void hm_init_avx512(void) {
    if (hm_avx512_ready) return;
    hm_init_generic();
    hm_init_amx();
    hm_init_int4_amx();
    hm_init_prepare();
    hm_init_amx8();
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

/* One row, tokens [t0, t0 + nt): inlined with nt a constant so that the sums stay in registers. */
HM_AVX512 static inline __attribute__((always_inline)) void hm_row_fp8_nt(
        const hm_weight *w, int64_t r, const uint16_t *xp, int t0, const int nt, float *y, int64_t ldy) {
    const __m512i lo_a = _mm512_load_si512(hm_fp8_bf16_lo), lo_b = _mm512_load_si512(hm_fp8_bf16_lo + 64);
    const __m512i hi_a = _mm512_load_si512(hm_fp8_bf16_hi), hi_b = _mm512_load_si512(hm_fp8_bf16_hi + 64);
    const __m512i sign = _mm512_set1_epi8((char)0x80);
    const uint8_t *row = w->data + r * w->cols;
    const float *sc = (const float *)w->scale + (r / 128) * ((w->cols + 127) / 128);
    const int64_t full = w->cols / 64 * 64;
    __m512 total[HM_TB], b0[HM_TB], b1[HM_TB];
    for (int t = 0; t < nt; t++) total[t] = b0[t] = b1[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 64) {
        _mm_prefetch((const char *)(row + c + HM_PREFETCH), _MM_HINT_T0);
        __m512i b = _mm512_loadu_si512(row + c);
        __m512i lo = _mm512_permutex2var_epi8(lo_a, b, lo_b);
        __m512i hi = _mm512_ternarylogic_epi32(sign, b, _mm512_permutex2var_epi8(hi_a, b, hi_b), 0xCA);
        __m512i w0 = _mm512_unpacklo_epi8(lo, hi), w1 = _mm512_unpackhi_epi8(lo, hi);
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

HM_AVX512 static inline __m512 hm_int4_scales(const hm_weight *w, int64_t r, int64_t c) {
    const uint16_t *sc = (const uint16_t *)w->scale + r * (w->cols / w->group) + c / w->group;
    if (w->group == 128) return _mm512_set1_ps(hm_bf16_to_f32(sc[0]));
    __m128i four = _mm_loadl_epi64((const __m128i *)sc); /* 4 bf16 scales, one per lane */
    __m128 f = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(four), 16));
    return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                                 _mm512_castps128_ps512(f));
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
        _mm_prefetch((const char *)(row + c / 2 + HM_PREFETCH), _MM_HINT_T0);
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
        _mm_prefetch((const char *)(row + c) + HM_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(row + c) + HM_PREFETCH + 64, _MM_HINT_T0);
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

/* ---- AMX ---------------------------------------------------------------------------------------
 * Above a couple of tokens the kernels above become bound by VDPBF16PS (each token is one more
 * dot product per 32 weights), and even at one token FP8's decode and products share two vector
 * ports. AMX's TDPBF16PS multiplies a 16x32 tile of weights by a 32xT tile of activations in
 * one instruction on the tile unit, so the weights' decode, not the products, sets the pace
 * whatever the number of tokens (up to 16 per tile). The weights are the A operand: 16 rows of
 * decoded bf16, no transposition (each format's kernel below says in which column order). The
 * activations are the B operand, in AMX's pair-interleaved layout in that same order
 * (hm_build_xb, hm_build_xb_int4), built once per call and shared by every tile. C tiles hold a
 * scale block's (or INT4 group's) sums; they are stored, scaled and summed. */
#include <unistd.h>
#include <sys/syscall.h>
#include <cpuid.h>

#define HM_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16,amx-tile,amx-bf16")))
#define HM_AMX_MAX_T 16 /* tokens per tile */
#define HM_AMX_PREFETCH 256 /* bytes ahead in each of a tile's 16 rows: 16 streams, so keep it short */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} hm_tilecfg;

static void hm_init_amx(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return;
    /* Linux hands out the 8 KB of tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA). */
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return;
    hm_amx_available = 1;
    hm_amx_int8 = (d >> 25) & 1;
    const char *env8 = getenv("HYBRIDMOE_AMX_INT8");
    hm_amx_int8_enabled = hm_amx_int8 && !(env8 && env8[0] == '0');
    const char *env = getenv("HYBRIDMOE_AMX");
    hm_amx_enabled = !(env && env[0] == '0');
}

/* Whether this call takes the AMX path: then xb must hold hm_build_xb's layout of xp. */
static inline int hm_amx_applies(const hm_weight *w, int T) {
    /* Fewest tokens at which AMX wins (measured at DeepSeek-V3 shapes): FP8 from one (rows of
     * 1024 columns and more; on shorter rows the pipeline's fill and drain and the tile
     * configuration per 16 rows weigh more), INT4 from one (AMX-INT8 where it applies, see
     * hm_int4_amx8_applies, else bf16), BF16 from three. */
    const int min_t = w->fmt == HM_FP8_B128 ? (w->cols >= 1024 ? 1 : 3) : w->fmt == HM_INT4 ? 1 : 3;
    return hm_amx_enabled && (w->fmt != HM_INT4 || w->cols % 128 == 0) && T >= min_t
           && T <= HM_AMX_MAX_T && w->cols % 2 == 0 && w->cols >= 64;
}

HM_AMX static void hm_amx_config(int T) {
    hm_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = 16, cfg.colsb[0] = (uint16_t)(T * 4);                        /* C: 16 rows x T fp32 */
    cfg.rows[1] = cfg.rows[2] = 16, cfg.colsb[1] = cfg.colsb[2] = 64;         /* A: 16 rows x 32 bf16 */
    cfg.rows[3] = cfg.rows[4] = 16, cfg.colsb[3] = cfg.colsb[4] = (uint16_t)(T * 4); /* B: 16 x T pairs */
    for (int i = 5; i < 8; i++) cfg.rows[i] = 16, cfg.colsb[i] = (uint16_t)(T * 4);     /* more C tiles */
    /* GCC does not see LDTILECFG read the struct and drops the stores above without this barrier
     * (the instruction then faults on a half-written configuration). */
    __asm__ volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

/* C tile (16 rows x T, through cb) plus each row's scalar tail -> y. */
HM_AVX512 static void hm_amx_store(const hm_weight *w, const uint16_t *xp, int T, const __m512 *tot, float *y,
                                   int64_t ldy, int64_t r0) {
    const int64_t full = w->cols / 64 * 64;
    for (int n = 0; n < 16; n++) {
        float v[16];
        _mm512_storeu_ps(v, tot[n]);
        for (int t = 0; t < T; t++) {
            float tail = full < w->cols ? hm_tail(w, r0 + n, full, xp + (int64_t)t * w->cols) : 0.f;
            y[t * ldy + r0 + n] = v[t] + tail;
        }
    }
}

/* INT4 rows [r0, r0 + 16) through AMX, pipelined like the FP8 kernel below.
 *
 * Decode: each weight byte is unpacked next to the constant byte 0x43 and one nibble kept, which
 * makes the bf16 0x430n = 128 + n: with n = q + 8 that is q + 136, exact, in two or three cheap
 * ops per 32 weights and no table lookup. The tile unit then sums (q + 136) x per group, and
 * 136 times the group's activation sum (computed once per call, see hm_build_xb_int4) is taken
 * off before the group's scale multiplies it. The cancellation costs nothing that matters: the
 * sums are fp32, the activations were rounded to bf16 on the way in.
 *
 * Each 64-byte row chunk (128 columns) decodes into four A chunks of 32 columns. Three layouts:
 *  - groups of 128 (one C tile, T columns): the unpacks straight from the bytes (layout 0);
 *  - groups of 32, up to 4 tokens (one C tile, 4T columns): layout 0 again, whose A chunks hold
 *    8 columns of each of the block's four groups (one group per 128-bit lane); B puts each
 *    group's activations in its own 4 of C's columns (column t * 4 + group), zeros elsewhere, so
 *    the tile unit, idle at so few tokens, keeps the groups apart;
 *  - groups of 32, 5-16 tokens (four C tiles, T columns): a byte permute first puts each group's
 *    16 bytes where the nibble split and the in-lane unpack gather them into one A chunk
 *    (layout 1: low nibbles in lanes 0-1, high nibbles in lanes 2-3). */
#define HM_INT4_OFFSET 136.f
#ifndef HM_INT4_AMX_PREFETCH
#define HM_INT4_AMX_PREFETCH 192
#endif
#define HM_INT4_SCALE_STAGE 64 /* blocks whose scales are staged at a time (8 KB at groups of 32) */
static uint8_t hm_int4_amx_perm[64] __attribute__((aligned(64))); /* chunk byte q <- source byte */
static uint8_t hm_int4_amx_xp[2][128]; /* [layout][AMX position (chunk * 32 + word)] -> place in xp's block */
/* hm_build_xb_int4's word permutes per layout and A chunk: indices into xp's words 0-63 and
 * 64-127 of the block, and which of the two each AMX word comes from */
static uint16_t hm_int4_xb_idx[2][4][2][32] __attribute__((aligned(64)));
static uint32_t hm_int4_xb_from_b[2][4];

static void hm_init_int4_amx(void) {
    for (int q = 0; q < 64; q++) { /* q = lane * 16 + half * 8 + i; bytes 32.. for the second pair */
        int lane = (q >> 4) & 3, half = (q >> 3) & 1, i = q & 7;
        hm_int4_amx_perm[q] = (uint8_t)(16 * half + 8 * (lane & 1) + i);
    }
    uint8_t xp_pos[128]; /* column in the block -> its place in hm_prepare_x_avx512's INT4 order */
    for (int p = 0; p < 64; p++)
        for (int v = 0; v < 2; v++) {
            xp_pos[2 * hm_unpack_src(p) + v] = (uint8_t)(v * 64 + p);
        }
    for (int c = 0; c < 4; c++)
        for (int p = 0; p < 32; p++) {
            int lane = p >> 3, i = p & 7;
            int byte0 = 16 * lane + 8 * (c >> 1) + i; /* layout 0: chunk c = nibble c & 1 of unpack c >> 1 */
            hm_int4_amx_xp[0][c * 32 + p] = xp_pos[2 * byte0 + (c & 1)];
            int byte1 = 32 * (c >> 1) + 16 * (c & 1) + 8 * (lane & 1) + i;
            hm_int4_amx_xp[1][c * 32 + p] = xp_pos[2 * byte1 + (lane >> 1)];
        }
    for (int l = 0; l < 2; l++)
        for (int c = 0; c < 4; c++) {
            hm_int4_xb_from_b[l][c] = 0;
            for (int p = 0; p < 32; p++) {
                int src = hm_int4_amx_xp[l][c * 32 + p];
                hm_int4_xb_idx[l][c][0][p] = (uint16_t)(src & 63);
                hm_int4_xb_idx[l][c][1][p] = (uint16_t)(src & 63);
                if (src >= 64) hm_int4_xb_from_b[l][c] |= 1u << p;
            }
        }
}

/* C's columns per token block and the layout (see above) of an INT4 AMX call. */
static inline int hm_int4_amx_n(const hm_weight *w, int T) { return w->group == 32 && T <= 4 ? 4 * T : T; }
static inline int hm_int4_amx_grouped(const hm_weight *w, int T) { return w->group == 32 && T > 4; }

/* Words of the activation buffer an AMX call needs (hm_build_xb, hm_build_xb_int4). */
static inline size_t hm_amx_xb_words(const hm_weight *w, int T) {
    if (w->fmt != HM_INT4) return (size_t)T * (size_t)(w->cols / 2);
    /* B tiles, then 136 x the group sums, laid out like C's columns block by block */
    return (size_t)hm_int4_amx_n(w, T) * (size_t)(w->cols / 2) + (size_t)(w->cols / 128) * 4 * (size_t)T;
}

#define HM_INT4_AMX_MUL(D, CT, J, N)                                                  \
    do {                                                                              \
        _tile_loadd(1, (D)[0], 64);                                                   \
        _tile_loadd(3, xb + (J) * 16 * (N), (N) * 4);                                 \
        _tile_loadd(2, (D)[1], 64);                                                   \
        _tile_loadd(4, xb + ((J) + 1) * 16 * (N), (N) * 4);                           \
        _tile_dpbf16ps(CT##0, 1, 3);                                                  \
        _tile_dpbf16ps(CT##1, 2, 4);                                                  \
        _tile_loadd(1, (D)[2], 64);                                                   \
        _tile_loadd(3, xb + ((J) + 2) * 16 * (N), (N) * 4);                           \
        _tile_loadd(2, (D)[3], 64);                                                   \
        _tile_loadd(4, xb + ((J) + 3) * 16 * (N), (N) * 4);                           \
        _tile_dpbf16ps(CT##2, 1, 3);                                                  \
        _tile_dpbf16ps(CT##3, 2, 4);                                                  \
    } while (0)
#define HM_C1_0 0
#define HM_C1_1 0
#define HM_C1_2 0
#define HM_C1_3 0
#define HM_C4_0 0
#define HM_C4_1 5
#define HM_C4_2 6
#define HM_C4_3 7

HM_AMX static void hm_rows16_int4_amx(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T,
                                      float *y, int64_t ldy, int64_t r0) {
    const __m512i c43 = _mm512_set1_epi8(0x43), keep_lo = _mm512_set1_epi16((short)0xFF0F);
    const __m512i nib16 = _mm512_set1_epi16(0x000F), hi43 = _mm512_set1_epi16(0x4300);
    const __m512i nib = _mm512_set1_epi8(0x0f), perm_a = _mm512_load_si512(hm_int4_amx_perm);
    const __m512i perm_b = _mm512_add_epi8(perm_a, _mm512_set1_epi8(32));
    const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1); /* lanes 2-3 */
    const int64_t nb = w->cols / 128, groups = w->cols / w->group;
    const int N = hm_int4_amx_n(w, T), grouped = hm_int4_amx_grouped(w, T), g32 = w->group == 32;
    const int xw = g32 ? 4 * T : T; /* group-sum floats per block */
    const float *xs = (const float *)(xb + (size_t)N * (size_t)(w->cols / 2));
    const uint16_t *sc = (const uint16_t *)w->scale + r0 * groups;
    hm_amx_config(N);
    uint16_t a[2][4][16 * 32] __attribute__((aligned(64)));
    float cb[2][4][16 * 16] __attribute__((aligned(64)));
    float sf[64] __attribute__((aligned(64)));
    uint16_t stage[HM_INT4_SCALE_STAGE * 16 * 4] __attribute__((aligned(64)));
    const int ng = g32 ? 4 : 1; /* groups per block */
    __m512 tot[16];
    for (int n = 0; n < 16; n++) tot[n] = _mm512_setzero_ps();
    const __mmask16 nm = (__mmask16)((1u << N) - 1), tm = (__mmask16)((1u << T) - 1);
    for (int64_t k = 0; k <= nb + 1; k++) {
        if (k >= 1 && k <= nb) { /* multiply block k - 1 (the tile unit works through it while the decode runs) */
            uint16_t(*d)[16 * 32] = a[(k - 1) & 1];
            const int64_t j = (k - 1) * 4;
            if (!grouped) {
                _tile_zero(0);
                HM_INT4_AMX_MUL(d, HM_C1_, j, N);
            } else {
                _tile_zero(0);
                _tile_zero(5);
                _tile_zero(6);
                _tile_zero(7);
                HM_INT4_AMX_MUL(d, HM_C4_, j, N);
            }
        }
        if (k < nb) { /* decode block k */
            uint16_t(*d)[16 * 32] = a[k & 1];
            for (int n = 0; n < 16; n++) {
                const uint8_t *row = w->data + (r0 + n) * (w->cols / 2) + k * 64;
                _mm_prefetch((const char *)(row + HM_INT4_AMX_PREFETCH), _MM_HINT_T0);
                __m512i b = _mm512_loadu_si512(row);
                if (!grouped) {
                    __m512i u0 = _mm512_unpacklo_epi8(b, c43), u1 = _mm512_unpackhi_epi8(b, c43);
                    _mm512_store_si512(d[0] + n * 32, _mm512_and_si512(u0, keep_lo));
                    _mm512_store_si512(d[1] + n * 32, _mm512_ternarylogic_epi32(_mm512_srli_epi16(u0, 4), nib16, hi43, 0xEA));
                    _mm512_store_si512(d[2] + n * 32, _mm512_and_si512(u1, keep_lo));
                    _mm512_store_si512(d[3] + n * 32, _mm512_ternarylogic_epi32(_mm512_srli_epi16(u1, 4), nib16, hi43, 0xEA));
                } else {
                    __m512i na = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(perm_a, b), shift), nib);
                    __m512i nb2 = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(perm_b, b), shift), nib);
                    _mm512_store_si512(d[0] + n * 32, _mm512_unpacklo_epi8(na, c43));
                    _mm512_store_si512(d[1] + n * 32, _mm512_unpackhi_epi8(na, c43));
                    _mm512_store_si512(d[2] + n * 32, _mm512_unpacklo_epi8(nb2, c43));
                    _mm512_store_si512(d[3] + n * 32, _mm512_unpackhi_epi8(nb2, c43));
                }
            }
        }
        if (k >= 2) { /* scale block k - 2: (C - 136 x the group sums) x the rows' group scales */
            const int64_t kb = k - 2;
            const float *xk = xs + kb * xw;
            if (kb % HM_INT4_SCALE_STAGE == 0) { /* the rows' scales of the next blocks, block by block */
                const int64_t nbk = nb - kb < HM_INT4_SCALE_STAGE ? nb - kb : HM_INT4_SCALE_STAGE;
                for (int n = 0; n < 16; n++) {
                    const uint16_t *sn = sc + n * groups + kb * ng;
                    if (g32)
                        for (int64_t b = 0; b < nbk; b++) memcpy(stage + (b * 16 + n) * 4, sn + 4 * b, 8);
                    else
                        for (int64_t b = 0; b < nbk; b++) stage[b * 16 + n] = sn[b];
                }
            }
            const uint16_t *sk = stage + (kb % HM_INT4_SCALE_STAGE) * 16 * ng;
            __m512 sv[4]; /* fp32 scales: row n (and group g) in lane n (n * 4 + g) of sv[0..ng) */
            for (int q = 0; q < ng; q++)
                sv[q] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_load_si256((const __m256i *)(sk + 16 * q))), 16));
            if (T == 1) { /* C stored densely: across rows, 16 (or 4 rows x 4 groups) per register */
                const float *c = cb[k & 1][0];
                const __m512 xv = g32 ? _mm512_broadcast_f32x4(_mm_loadu_ps(xk)) : _mm512_set1_ps(xk[0]);
                for (int q = 0; q < ng; q++)
                    tot[q] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_load_ps(c + 16 * q), xv), sv[q], tot[q]);
            } else {
                for (int q = 0; q < ng; q++) _mm512_store_ps(sf + 16 * q, sv[q]);
                if (!g32) {
                    const __m512 xv = _mm512_maskz_loadu_ps(tm, xk);
                    const float *c = cb[k & 1][0];
                    for (int n = 0; n < 16; n++)
                        tot[n] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_load_ps(tm, c + n * 16), xv),
                                                 _mm512_set1_ps(sf[n]), tot[n]);
                } else if (!grouped) { /* column t * 4 + g: group g's scale in every 128-bit lane */
                    const __m512 xv = _mm512_maskz_loadu_ps(nm, xk);
                    const float *c = cb[k & 1][0];
                    for (int n = 0; n < 16; n++)
                        tot[n] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_load_ps(nm, c + n * 16), xv),
                                                 _mm512_broadcast_f32x4(_mm_load_ps(sf + 4 * n)), tot[n]);
                } else {
                    for (int g = 0; g < 4; g++) {
                        const __m512 xv = _mm512_maskz_loadu_ps(tm, xk + g * T);
                        const float *c = cb[k & 1][g];
                        for (int n = 0; n < 16; n++)
                            tot[n] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_load_ps(tm, c + n * 16), xv),
                                                     _mm512_set1_ps(sf[4 * n + g]), tot[n]);
                    }
                }
            }
        }
        if (k >= 1 && k <= nb) { /* ... and block k - 1's C tiles out, now that the decode ran meanwhile */
            float(*c)[16 * 16] = cb[(k - 1) & 1];
            if (!grouped) {
                _tile_stored(0, c[0], T == 1 ? N * 4 : 64);
            } else {
                _tile_stored(0, c[0], 64);
                _tile_stored(5, c[1], 64);
                _tile_stored(6, c[2], 64);
                _tile_stored(7, c[3], 64);
            }
        }
    }
    _tile_release();
    if (T == 1) { /* no column tail: INT4 AMX rows are whole blocks */
        float v[64];
        for (int q = 0; q < (g32 ? 4 : 1); q++) _mm512_storeu_ps(v + 16 * q, tot[q]);
        for (int n = 0; n < 16; n++)
            y[r0 + n] = g32 ? v[4 * n] + v[4 * n + 1] + v[4 * n + 2] + v[4 * n + 3] : v[n];
        return;
    }
    if (N != T) /* columns t * 4 + g -> token t */
        for (int n = 0; n < 16; n++) {
            float v[16], s[16] = {0};
            _mm512_storeu_ps(v, tot[n]);
            for (int t = 0; t < T; t++) s[t] = v[4 * t] + v[4 * t + 1] + v[4 * t + 2] + v[4 * t + 3];
            tot[n] = _mm512_loadu_ps(s);
        }
    hm_amx_store(w, xp, T, tot, y, ldy, r0);
}

/* xp [T][cols] (hm_prepare_x_avx512's INT4 order) -> xb: B tiles in hm_rows16_int4_amx's layout,
 * then for each 128-column block 136 x each group's activation sum, in C's column order. Each
 * block's 128 words go into AMX order by word permutes (hm_int4_xb_idx), 16 pairs at a time
 * stored, or scattered N apart. The sums need no reordering: in xp's order each 128-bit lane of
 * a 32-word register is 8 columns of one group of 32 (lanes 0-3: groups 0-3 of the block). */
HM_AVX512 static void hm_build_xb_int4(const uint16_t *xp, int T, int64_t cols, int group, uint32_t *xb) {
    const hm_weight shape = {HM_INT4, group, 0, cols, NULL, NULL};
    const int N = hm_int4_amx_n(&shape, T), grouped = hm_int4_amx_grouped(&shape, T);
    const int xw = group == 32 ? 4 * T : T;
    float *xs = (float *)(xb + (size_t)N * (size_t)(cols / 2));
    if (N != T && T > 1) memset(xb, 0, sizeof(uint32_t) * (size_t)N * (size_t)(cols / 2));
    __m512i ia[4], ib[4];
    __mmask32 from_b[4];
    for (int j = 0; j < 4; j++) {
        ia[j] = _mm512_load_si512(hm_int4_xb_idx[grouped][j][0]);
        ib[j] = _mm512_load_si512(hm_int4_xb_idx[grouped][j][1]);
        from_b[j] = hm_int4_xb_from_b[grouped][j];
    }
    /* layout 0 with groups of 32: token t's pair of group g goes to column t * 4 + g */
    const __mmask16 tm = (__mmask16)((1u << T) - 1), spread = (__mmask16)(0x1111 & ((1u << (4 * T)) - 1));
    for (int64_t c0 = 0; c0 + 128 <= cols; c0 += 128) {
        __m512i ch[4][16]; /* [A chunk][token]: 16 pairs */
        for (int t = 0; t < 16; t++) {
            if (t >= T) {
                for (int j = 0; j < 4; j++) ch[j][t] = _mm512_setzero_si512();
                continue;
            }
            const uint16_t *x16 = xp + (int64_t)t * cols + c0;
            const __m512i x0 = _mm512_loadu_si512(x16), x1 = _mm512_loadu_si512(x16 + 32);
            const __m512i x2 = _mm512_loadu_si512(x16 + 64), x3 = _mm512_loadu_si512(x16 + 96);
            for (int j = 0; j < 4; j++)
                ch[j][t] = _mm512_mask_blend_epi16(from_b[j], _mm512_permutex2var_epi16(x0, ia[j], x1),
                                                   _mm512_permutex2var_epi16(x2, ib[j], x3));
            __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
            const __m512i xq[4] = {x0, x1, x2, x3};
            for (int q = 0; q < 4; q++) {
                lo = _mm512_add_ps(lo, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(xq[q])), 16)));
                hi = _mm512_add_ps(hi, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(xq[q], 1)), 16)));
            }
            float *xk = xs + (c0 / 128) * xw;
            if (group == 128) {
                xk[t] = HM_INT4_OFFSET * _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
            } else {
                const float sum[4] = {_mm512_mask_reduce_add_ps(0x00ff, lo), _mm512_mask_reduce_add_ps(0xff00, lo),
                                      _mm512_mask_reduce_add_ps(0x00ff, hi), _mm512_mask_reduce_add_ps(0xff00, hi)};
                for (int g = 0; g < 4; g++) xk[grouped ? g * T + t : t * 4 + g] = HM_INT4_OFFSET * sum[g];
            }
        }
        for (int j = 0; j < 4; j++) {
            uint32_t *dst = xb + (c0 / 2 + 16 * j) * N;
            if (N == 1) {
                _mm512_storeu_si512(dst, ch[j][0]);
                continue;
            }
            if (T == 1) { /* pair kk to dword kk * 4 + kk / 4, zeros around it: four registers */
                for (int q = 0; q < 4; q++)
                    _mm512_storeu_si512(dst + 16 * q, _mm512_maskz_permutexvar_epi32(
                        (__mmask16)(0x1111 << q), _mm512_add_epi32(_mm512_set1_epi32(4 * q), _mm512_srli_epi32(
                        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2)), ch[j][0]));
                continue;
            }
            hm_transpose16(ch[j]);
            for (int kk = 0; kk < 16; kk++) {
                if (N == T) _mm512_mask_storeu_epi32(dst + kk * N, tm, ch[j][kk]);
                else _mm512_mask_storeu_epi32(dst + kk * N + (kk >> 2), spread, _mm512_maskz_expand_epi32(spread, ch[j][kk]));
            }
        }
    }
}

/* ---- INT4 through AMX-INT8, exact to within the activations' rounding --------------------------
 * The bf16 path above writes 4 bytes of decoded weights per INT4 byte and reads them back into
 * tiles; at one token that traffic, not the products, sets its pace. TDPBUSD multiplies unsigned
 * by signed bytes, so the weights go in as their nibbles n = q + 8 (one AND, or a shift and an
 * AND, per 64 weights: 2 bytes written per INT4 byte, half the tile multiplies). The activations
 * go in as 16-bit integers split into two signed bytes: per token and 128-column block,
 * xi = round(x / 2^e) with 2^e chosen so that |xi| <= 32639, and xi = 256 h + l with h, l in
 * [-128, 127]. The products are exact in int32; per (row, group, token)
 *     sum q x = 2^e (256 C_h + C_l - 8 sum xi)
 * with C_h and C_l two columns of C (B holds h and l side by side). The rounding to xi moves each
 * activation by at most 2^-16 of its block's largest, far below the bf16 rounding every other
 * path applies, so the results match the bf16-activation reference as closely as the others.
 * (A block whose largest activation is below 2^-134 has 2^e underflow and comes out as zero.)
 *
 * C's columns: (piece, group in block, token), piece 0 = h, 1 = l; groups of 32 are 4 per block
 * and A's 64 bytes per row hold 16 columns of each (a group's 16 bytes), so quad-rows 4g..4g+3 of
 * B carry group g's activations in group g's columns and zeros elsewhere. Up to 64 columns, in
 * up to four C tiles of 16; more (groups of 32 beyond 8 tokens) takes the bf16 path. */
#define HM_AMX8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16,amx-tile,amx-int8")))
#define HM_I8_HALF 32639 /* largest |xi|: h = (xi + 128) >> 8 stays within a signed byte */
static uint16_t hm_pw_nat[2][32] __attribute__((aligned(64))); /* xp's INT4 order -> natural, per parity */

/* groups per block, and C's columns: (piece, group, token) */
static inline int hm_i8_groups(int group) { return group == 32 ? 4 : 1; }
static inline int hm_i8_cols(int group, int T) { return 2 * hm_i8_groups(group) * T; }

static inline int hm_int4_amx8_applies(const hm_weight *w, int T) {
    return hm_amx_int8_enabled && w->fmt == HM_INT4 && hm_i8_cols(w->group, T) <= 16;
}

/* Words of the AMX-INT8 activation buffer: per block the two B tiles (one per A chunk, 16 x NC
 * dwords), then per block NC column weights and NC column offsets (floats). */
static inline size_t hm_amx8_xb_words(const hm_weight *w, int T) {
    return (size_t)(w->cols / 128) * (size_t)hm_i8_cols(w->group, T) * 34;
}

static void hm_init_amx8(void) {
    for (int p = 0; p < 64; p++) { /* natural position p of a parity's 64 columns -> xp's place */
        for (int q = 0; q < 64; q++)
            if (hm_unpack_src(q) == p) hm_pw_nat[p >> 5][p & 31] = (uint16_t)q;
    }
}

/* xp [T][cols] (hm_prepare_x_avx512's INT4 order) -> hm_rows16_int4_amx8's B tiles and column
 * weights and offsets. */
HM_AVX512 static void hm_build_xb_int4_i8(const uint16_t *xp, int T, int64_t cols, int group, uint32_t *xb) {
    const int G = hm_i8_groups(group), NC = hm_i8_cols(group, T);
    const int64_t nb = cols / 128;
    float *W = (float *)(xb + nb * 32 * NC), *O = W + nb * NC;
    memset(xb, 0, sizeof(uint32_t) * hm_amx8_xb_words(&(hm_weight){HM_INT4, group, 0, cols, NULL, NULL}, T));
    const __m512i nat0 = _mm512_load_si512(hm_pw_nat[0]), nat1 = _mm512_load_si512(hm_pw_nat[1]);
    for (int t = 0; t < T; t++)
        for (int64_t k = 0; k < nb; k++) {
            const uint16_t *x16 = xp + (int64_t)t * cols + k * 128;
            __m512 f[2][4]; /* [parity = A chunk][16 positions] as fp32, natural order */
            __m512 amax = _mm512_setzero_ps();
            for (int c = 0; c < 2; c++) {
                __m512i a = _mm512_loadu_si512(x16 + 64 * c), b = _mm512_loadu_si512(x16 + 64 * c + 32);
                __m512i n[2] = {_mm512_permutex2var_epi16(a, nat0, b), _mm512_permutex2var_epi16(a, nat1, b)};
                for (int q = 0; q < 4; q++) {
                    __m256i h = q & 1 ? _mm512_extracti64x4_epi64(n[q >> 1], 1) : _mm512_castsi512_si256(n[q >> 1]);
                    f[c][q] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
                    amax = _mm512_max_ps(amax, _mm512_abs_ps(f[c][q]));
                }
            }
            const float m = _mm512_reduce_max_ps(amax);
            int e = 0;
            if (m > 0.f) {
                frexpf(m, &e);
                e -= 15; /* m / 2^e < 2^15 */
                if (ldexpf(m, -e) > (float)HM_I8_HALF) e++;
            }
            const __m512 ne = _mm512_set1_ps((float)-e);
            uint8_t hb[2][64], lb[2][64];
            float gsum[4] = {0.f, 0.f, 0.f, 0.f};
            for (int c = 0; c < 2; c++)
                for (int q = 0; q < 4; q++) {
                    __m512i xi = _mm512_cvtps_epi32(_mm512_scalef_ps(f[c][q], ne)); /* exact scaling, nearest */
                    __m512i h = _mm512_srai_epi32(_mm512_add_epi32(xi, _mm512_set1_epi32(128)), 8);
                    __m512i l = _mm512_sub_epi32(xi, _mm512_slli_epi32(h, 8));
                    _mm_storeu_si128((__m128i *)(hb[c] + 16 * q), _mm512_cvtepi32_epi8(h));
                    _mm_storeu_si128((__m128i *)(lb[c] + 16 * q), _mm512_cvtepi32_epi8(l));
                    gsum[G == 4 ? q : 0] += (float)_mm512_reduce_add_epi32(xi); /* positions 16q.. = group q */
                }
            const float sx = ldexpf(1.f, e);
            uint32_t *bk = xb + k * 32 * NC;
            for (int piece = 0; piece < 2; piece++)
                for (int g = 0; g < G; g++) {
                    const int col = (piece * G + g) * T + t;
                    W[k * NC + col] = piece == 0 ? 256.f * sx : sx;
                    O[k * NC + col] = piece == 0 ? 8.f * gsum[g] * sx : 0.f;
                    for (int c = 0; c < 2; c++) { /* quad-row kk: positions 4kk..4kk+3 (group kk / 4) */
                        const uint8_t *src = piece == 0 ? hb[c] : lb[c];
                        for (int kk = (G == 4 ? 4 * g : 0); kk < (G == 4 ? 4 * g + 4 : 16); kk++)
                            memcpy(bk + (c * 16 + kk) * NC + col, src + 4 * kk, 4);
                    }
                }
        }
}

#define HM_I8_MUL(CT)                                                                    \
    do {                                                                                 \
        _tile_zero(CT);                                                                  \
        _tile_loadd(3, bk, NC * 4);                                                      \
        _tile_loadd(4, bk + 16 * NC, NC * 4);                                            \
        _tile_dpbusd(CT, 1, 3);                                                          \
        _tile_dpbusd(CT, 2, 4);                                                          \
    } while (0)

/* INT4 rows [r0, r0 + 16) through AMX-INT8 (see above), pipelined like the others: block k - 1
 * is multiplied first, block k - 2's C scaled, then block k decoded while the tile unit works,
 * then block k - 1's C stored (in one of two C tiles by turns, so that block k's products need
 * not wait for that store). */
HM_AMX8 static void hm_rows16_int4_amx8(const hm_weight *w, const uint32_t *xb, int T, float *y, int64_t ldy,
                                        int64_t r0) {
    const int G = hm_i8_groups(w->group), NC = hm_i8_cols(w->group, T);
    const int64_t nb = w->cols / 128, groups = w->cols / w->group;
    const float *W = (const float *)(xb + nb * 32 * NC), *O = W + nb * NC;
    const uint16_t *sc = (const uint16_t *)w->scale + r0 * groups;
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const __mmask16 cm = (__mmask16)((1u << NC) - 1);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    /* Scale lanes. Several tokens: C row n's column -> its group, in a vector of row n's group
     * scales. One token, C stored densely as [row][column], 16 / NC rows per register: groups of
     * 128 (NC = 2), register q holds rows 8q + l / 2; groups of 32 (NC = 8), register q holds
     * rows 2q + l / 8 (group l % 4), whose scales are in sf's register q / 2 at lanes
     * 8 (q % 2) + 4 (l / 8) + l % 4. */
    int gl[16];
    for (int l = 0; l < 16; l++) gl[l] = (l / T) % G;
    const __m512i gsel = _mm512_loadu_si512(gl);
    __m512i srow[2];
    for (int h = 0; h < 2; h++)
        srow[h] = NC == 2 ? _mm512_add_epi32(_mm512_srli_epi32(lane, 1), _mm512_set1_epi32(8 * h))
                          : _mm512_add_epi32(_mm512_add_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(3)),
                                                              _mm512_set1_epi32(8 * h)),
                                             _mm512_slli_epi32(_mm512_srli_epi32(lane, 3), 2));
    hm_amx_config(NC);
    uint8_t a[2][2][16 * 64] __attribute__((aligned(64)));
    int32_t cb[2][16 * 16] __attribute__((aligned(64)));
    uint16_t stage[HM_INT4_SCALE_STAGE * 16 * 4] __attribute__((aligned(64)));
    float sf[64] __attribute__((aligned(64)));
    __m512 acc[16];
    for (int n = 0; n < 16; n++) acc[n] = _mm512_setzero_ps();
    for (int64_t k = 0; k <= nb + 1; k++) {
        if (k >= 1 && k <= nb) { /* multiply block k - 1 */
            const uint32_t *bk = xb + (k - 1) * 32 * NC;
            _tile_loadd(1, a[(k - 1) & 1][0], 64);
            _tile_loadd(2, a[(k - 1) & 1][1], 64);
            if (k & 1) HM_I8_MUL(5);
            else HM_I8_MUL(0);
        }
        if (k >= 2) { /* scale block k - 2 */
            const int64_t kb = k - 2;
            if (kb % HM_INT4_SCALE_STAGE == 0) { /* the rows' scales of the next blocks, block by block */
                const int64_t nbk = nb - kb < HM_INT4_SCALE_STAGE ? nb - kb : HM_INT4_SCALE_STAGE;
                for (int n = 0; n < 16; n++) {
                    const uint16_t *sn = sc + n * groups + kb * G;
                    if (G == 4)
                        for (int64_t b = 0; b < nbk; b++) memcpy(stage + (b * 16 + n) * 4, sn + 4 * b, 8);
                    else
                        for (int64_t b = 0; b < nbk; b++) stage[b * 16 + n] = sn[b];
                }
            }
            const uint16_t *sk = stage + (kb % HM_INT4_SCALE_STAGE) * 16 * G;
            for (int q = 0; q < G; q++) /* fp32 scales, [row] or [row][group] */
                _mm512_store_ps(sf + 16 * q, _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_load_si256((const __m256i *)(sk + 16 * q))), 16)));
            const __m512 wv = _mm512_maskz_loadu_ps(cm, W + kb * NC), ov = _mm512_maskz_loadu_ps(cm, O + kb * NC);
            const int32_t *c = cb[k & 1];
            if (T == 1) {
                const __m512 wr = NC == 2 ? _mm512_permutexvar_ps(_mm512_and_si512(lane, _mm512_set1_epi32(1)), wv)
                                          : _mm512_shuffle_f32x4(wv, wv, 0x44);
                const __m512 orr = NC == 2 ? _mm512_permutexvar_ps(_mm512_and_si512(lane, _mm512_set1_epi32(1)), ov)
                                           : _mm512_shuffle_f32x4(ov, ov, 0x44);
                for (int q = 0; q < NC; q++) {
                    const __m512 sv = _mm512_permutexvar_ps(srow[q & 1], _mm512_load_ps(sf + (NC == 2 ? 0 : 16 * (q >> 1))));
                    const __m512 v = _mm512_cvtepi32_ps(_mm512_load_epi32(c + 16 * q));
                    acc[q] = _mm512_fmadd_ps(_mm512_fmsub_ps(v, wr, orr), sv, acc[q]);
                }
            } else {
                for (int n = 0; n < 16; n++) {
                    const __m512 sv = G == 1 ? _mm512_set1_ps(sf[n])
                                             : _mm512_permutexvar_ps(gsel, _mm512_castps128_ps512(_mm_load_ps(sf + 4 * n)));
                    const __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_load_epi32(cm, c + n * 16));
                    acc[n] = _mm512_fmadd_ps(_mm512_fmsub_ps(v, wv, ov), sv, acc[n]);
                }
            }
        }
        if (k < nb) { /* decode block k: low nibbles (even columns) and high nibbles (odd) */
            for (int n = 0; n < 16; n++) {
                const uint8_t *row = w->data + (r0 + n) * (w->cols / 2) + k * 64;
                _mm_prefetch((const char *)(row + HM_INT4_AMX_PREFETCH), _MM_HINT_T0);
                __m512i b = _mm512_loadu_si512(row);
                _mm512_store_si512(a[k & 1][0] + n * 64, _mm512_and_si512(b, nib));
                _mm512_store_si512(a[k & 1][1] + n * 64, _mm512_and_si512(_mm512_srli_epi16(b, 4), nib));
            }
        }
        if (k >= 1 && k <= nb) { /* block k - 1's C out: one token densely, [row][column] */
            const int ld = T == 1 ? NC * 4 : 64;
            if (k & 1) _tile_stored(5, cb[(k - 1) & 1], ld);
            else _tile_stored(0, cb[(k - 1) & 1], ld);
        }
    }
    _tile_release();
    float v[16 * 16];
    if (T == 1)
        for (int q = 0; q < NC; q++) _mm512_storeu_ps(v + 16 * q, acc[q]);
    else
        for (int n = 0; n < 16; n++) _mm512_storeu_ps(v + 16 * n, acc[n]);
    for (int n = 0; n < 16; n++)
        for (int t = 0; t < T; t++) {
            float sum = 0.f;
            for (int pg = 0; pg < 2 * G; pg++) sum += T == 1 ? v[n * NC + pg] : v[16 * n + pg * T + t];
            y[t * ldy + r0 + n] = sum;
        }
}

/* BF16 rows [r0, r0 + 16): the A tiles load straight from the weight rows, nothing to decode. */
HM_AMX static void hm_rows16_bf16_amx(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T,
                                      float *y, int64_t ldy, int64_t r0) {
    const int64_t full = w->cols / 64 * 64, stride = w->cols * 2;
    const uint16_t *rows = (const uint16_t *)w->data + r0 * w->cols;
    float cb[16 * 16] __attribute__((aligned(64)));
    hm_amx_config(T);
    _tile_zero(0);
    for (int64_t c = 0; c < full; c += 64) {
        for (int n = 0; n < 16; n++) {
            const char *p = (const char *)(rows + n * w->cols + c) + HM_AMX_PREFETCH;
            _mm_prefetch(p, _MM_HINT_T0);
            _mm_prefetch(p + 64, _MM_HINT_T0);
        }
        _tile_loadd(1, rows + c, stride);
        _tile_loadd(2, rows + c + 32, stride);
        _tile_loadd(3, xb + (c / 32) * 16 * T, T * 4);
        _tile_loadd(4, xb + (c / 32 + 1) * 16 * T, T * 4);
        _tile_dpbf16ps(0, 1, 3);
        _tile_dpbf16ps(0, 2, 4);
    }
    _tile_stored(0, cb, 64);
    _tile_release();
    const __mmask16 tm = (__mmask16)((1u << T) - 1);
    __m512 tot[16];
    for (int n = 0; n < 16; n++) tot[n] = _mm512_maskz_load_ps(tm, cb + n * 16);
    hm_amx_store(w, xp, T, tot, y, ldy, r0);
}

/* 32 bf16 times 2^e (e > 0): exponent field plus e; zeros and subnormals (which the tile unit
 * reads as zero anyway) stay, and what would overflow becomes infinity, as the product would. */
HM_AVX512 static inline __m512i hm_bf16_ldexp32(__m512i h, int e) {
    const __m512i f = _mm512_and_si512(_mm512_srli_epi16(h, 7), _mm512_set1_epi16(0xff));
    const __mmask32 keep = _mm512_cmpeq_epi16_mask(f, _mm512_setzero_si512())
                           | _mm512_cmpeq_epi16_mask(f, _mm512_set1_epi16(0xff));
    const __mmask32 inf = _mm512_cmpge_epi16_mask(f, _mm512_set1_epi16((short)(0xff - e))) & ~keep;
    __m512i r = _mm512_mask_add_epi16(h, ~keep, h, _mm512_set1_epi16((short)(e << 7)));
    return _mm512_mask_mov_epi16(r, inf, _mm512_or_si512(_mm512_and_si512(h, _mm512_set1_epi16((short)0x8000)),
                                                         _mm512_set1_epi16(0x7f80)));
}

/* xp [T][cols] bf16 (decode order) -> xb: for each 32-column block j, 16 rows of T dword pairs:
 * xb[(j * 16 + kk) * T + t] = columns (32j + 2kk, 32j + 2kk + 1) of token t, times 2^xexp.
 * 16 pairs at a time: stored as they are at one token, through a transpose otherwise. */
HM_AVX512 static void hm_build_xb(const uint16_t *xp, int T, int64_t cols, uint32_t *xb, int xexp) {
    const int64_t full = cols / 64 * 64;
    const __mmask16 tm = (__mmask16)((1u << T) - 1);
    if (T == 1) {
        for (int64_t i = 0; i < full / 2; i += 16) {
            __m512i v = _mm512_loadu_si512(xp + 2 * i);
            _mm512_storeu_si512(xb + i, xexp ? hm_bf16_ldexp32(v, xexp) : v);
        }
        return;
    }
    for (int64_t i = 0; i < full / 2; i += 16) {
        __m512i r[16];
        for (int t = 0; t < 16; t++) {
            r[t] = t < T ? _mm512_loadu_si512(xp + (int64_t)t * cols + 2 * i) : _mm512_setzero_si512();
            if (xexp && t < T) r[t] = hm_bf16_ldexp32(r[t], xexp);
        }
        hm_transpose16(r);
        for (int kk = 0; kk < 16; kk++) _mm512_mask_storeu_epi32(xb + (i + kk) * T, tm, r[kk]);
    }
}

/* FP8 rows [r0, r0 + 16) for 1-16 tokens through AMX, software-pipelined per 128-column scale
 * block: block k is decoded into one half of a double buffer while the tiles multiply block
 * k - 1 from the other half (a tile load must wait for the stores it reads to leave the store
 * buffer, so loading what was just stored would stall every block), and block k - 2's C tile is
 * scaled into the row sums. At one token this beats the AVX-512 kernel too: its decode is three
 * cheap ops per 32 weights (see hm_fp8s_*) and the products run on the tile unit, not on the
 * vector ports the decode needs.
 *
 * The fast decode works in a scaled domain: e4m3 magnitude bits shifted into a bf16 (exponent
 * field e, mantissa m) with 16 added to the exponent field is exactly value * 2^-104, for every
 * byte with e != 0. A 128-byte row chunk with any e == 0 byte (zeros, subnormals: rare in real
 * weights) is decoded by table lookup into the same domain, where subnormals are normal bf16.
 * The tile unit flushes products below 2^-126, so the activations go in scaled by 2^64 (see
 * hm_build_xb) and the C tiles are scaled back by 2^40. */
#define HM_FP8_AMX_XEXP 64 /* products come out times 2^-40: flushed below 2^-86, activations overflow from 2^64 */

HM_AVX512 static inline __attribute__((always_inline)) __m512i hm_fp8s_fast(__m512i w16) {
    /* w16: words with the e4m3 byte in the high half, low half zero */
    return _mm512_ternarylogic_epi32(_mm512_srai_epi16(w16, 4), _mm512_set1_epi16((short)0x87FF),
                                     _mm512_set1_epi16(0x0800), 0xEA); /* (a & b) | c */
}

HM_AMX static void hm_rows16_fp8_amx(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T,
                                     float *y, int64_t ldy, int64_t r0) {
    const __m512i lo_a = _mm512_load_si512(hm_fp8s_bf16_lo), lo_b = _mm512_load_si512(hm_fp8s_bf16_lo + 64);
    const __m512i hi_a = _mm512_load_si512(hm_fp8s_bf16_hi), hi_b = _mm512_load_si512(hm_fp8s_bf16_hi + 64);
    const __m512i sign = _mm512_set1_epi8((char)0x80), expo = _mm512_set1_epi8(0x78), z = _mm512_setzero_si512();
    const int64_t full = w->cols / 64 * 64, nb = (full + 127) / 128, nbi = (w->cols + 127) / 128;
    const float *sc = (const float *)w->scale + (r0 / 128) * nbi;
    const float back = 0x1p40f; /* 2^104 / 2^64 */
    hm_amx_config(T);
    uint16_t a[2][4][16 * 32] __attribute__((aligned(64)));
    float cb[2][16 * 16] __attribute__((aligned(64)));
    __m512 tot[16];
    for (int n = 0; n < 16; n++) tot[n] = _mm512_setzero_ps();
    const __mmask16 tm = (__mmask16)((1u << T) - 1);
    for (int64_t k = 0; k <= nb + 1; k++) {
        if (k < nb) { /* decode block k */
            const int64_t c0 = k * 128;
            const int halves = c0 + 128 <= full ? 2 : 1;
            uint16_t(*d)[16 * 32] = a[k & 1];
            for (int n = 0; n < 16; n++) {
                const uint8_t *row = w->data + (r0 + n) * w->cols + c0;
                _mm_prefetch((const char *)(row + HM_AMX_PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(row + 64 + HM_AMX_PREFETCH), _MM_HINT_T0);
                for (int h = 0; h < halves; h++) {
                    __m512i b = _mm512_loadu_si512(row + 64 * h);
                    if (__builtin_expect(!_mm512_testn_epi8_mask(b, expo), 1)) {
                        _mm512_store_si512(d[2 * h] + n * 32, hm_fp8s_fast(_mm512_unpacklo_epi8(z, b)));
                        _mm512_store_si512(d[2 * h + 1] + n * 32, hm_fp8s_fast(_mm512_unpackhi_epi8(z, b)));
                    } else {
                        __m512i lo = _mm512_permutex2var_epi8(lo_a, b, lo_b);
                        __m512i hi = _mm512_ternarylogic_epi32(sign, b, _mm512_permutex2var_epi8(hi_a, b, hi_b), 0xCA);
                        _mm512_store_si512(d[2 * h] + n * 32, _mm512_unpacklo_epi8(lo, hi));
                        _mm512_store_si512(d[2 * h + 1] + n * 32, _mm512_unpackhi_epi8(lo, hi));
                    }
                }
            }
        }
        if (k >= 2) { /* scale block k - 2 */
            const __m512 s = _mm512_set1_ps(sc[k - 2] * back);
            const float *c = cb[k & 1];
            for (int n = 0; n < 16; n++) tot[n] = _mm512_fmadd_ps(_mm512_maskz_load_ps(tm, c + n * 16), s, tot[n]);
        }
        if (k >= 1 && k <= nb) { /* multiply block k - 1 */
            uint16_t(*d)[16 * 32] = a[(k - 1) & 1];
            const int64_t j = (k - 1) * 4; /* first 32-column chunk */
            const int chunks = (k - 1) * 128 + 128 <= full ? 4 : 2;
            _tile_zero(0);
            _tile_loadd(1, d[0], 64);
            _tile_loadd(3, xb + j * 16 * T, T * 4);
            _tile_loadd(2, d[1], 64);
            _tile_loadd(4, xb + (j + 1) * 16 * T, T * 4);
            _tile_dpbf16ps(0, 1, 3);
            _tile_dpbf16ps(0, 2, 4);
            if (chunks == 4) {
                _tile_loadd(1, d[2], 64);
                _tile_loadd(3, xb + (j + 2) * 16 * T, T * 4);
                _tile_loadd(2, d[3], 64);
                _tile_loadd(4, xb + (j + 3) * 16 * T, T * 4);
                _tile_dpbf16ps(0, 1, 3);
                _tile_dpbf16ps(0, 2, 4);
            }
            _tile_stored(0, cb[(k - 1) & 1], 64);
        }
    }
    _tile_release();
    hm_amx_store(w, xp, T, tot, y, ldy, r0);
}

static void hm_gemv_rows_avx512(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T, float *y,
                                int64_t ldy, int64_t r0, int64_t r1) {
    if (xb && hm_amx_applies(w, T))
        for (; r0 + 16 <= r1; r0 += 16) {
            if (w->fmt == HM_FP8_B128) hm_rows16_fp8_amx(w, xp, xb, T, y, ldy, r0);
            else if (w->fmt == HM_INT4 && hm_int4_amx8_applies(w, T)) hm_rows16_int4_amx8(w, xb, T, y, ldy, r0);
            else if (w->fmt == HM_INT4) hm_rows16_int4_amx(w, xp, xb, T, y, ldy, r0);
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
