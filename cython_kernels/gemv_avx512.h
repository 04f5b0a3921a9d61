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
static uint8_t hm_int4_bf16_lo[64] __attribute__((aligned(64)));
static uint8_t hm_int4_bf16_hi[64] __attribute__((aligned(64)));
static int hm_avx512_ready = 0;

static void hm_init_amx(void);

static void hm_init_avx512(void) {
    if (hm_avx512_ready) return;
    hm_init_generic();
    hm_init_amx();
    for (int em = 0; em < 128; em++) {
        uint16_t h = em == 0x7f ? 0 : hm_f32_to_bf16(hm_e4m3_to_f32((uint8_t)em)); /* 0x7f is NaN */
        hm_fp8_bf16_lo[em] = (uint8_t)(h & 0xff);
        hm_fp8_bf16_hi[em] = (uint8_t)(h >> 8);
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

/* x [T][in] fp32 -> xp [T][in] bf16, each full chunk in the order its weights decode to. */
static void hm_prepare_x_avx512(int fmt, const float *x, int T, int64_t in, uint16_t *xp) {
    for (int t = 0; t < T; t++) {
        const float *xt = x + (int64_t)t * in;
        uint16_t *dt = xp + (int64_t)t * in;
        int64_t c = 0;
        if (fmt == HM_FP8_B128) {
            for (; c + 64 <= in; c += 64)
                for (int p = 0; p < 64; p++) dt[c + p] = hm_f32_to_bf16(xt[c + hm_unpack_src(p)]);
        } else if (fmt == HM_INT4) {
            for (; c + 128 <= in; c += 128)
                for (int v = 0; v < 2; v++) /* v = 0: low nibbles (even weights), 1: high (odd) */
                    for (int p = 0; p < 64; p++)
                        dt[c + v * 64 + p] = hm_f32_to_bf16(xt[c + 2 * hm_unpack_src(p) + v]);
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

/* ---- AMX: FP8 for several tokens ----------------------------------------------------------------
 * Above a couple of tokens the kernels above become bound by VDPBF16PS (each token is one more
 * dot product per 32 weights). AMX's TDPBF16PS multiplies a 16x32 tile of weights by a 32xT tile
 * of activations in one instruction, so the weights' decode, not the products, sets the pace
 * whatever the number of tokens (up to 16 per tile). The weights are the A operand: 16 rows of
 * decoded bf16, exactly as they come out of the decode above, no transposition. The activations
 * are the B operand, in AMX's pair-interleaved layout (hm_build_xb), built once per call and
 * shared by every tile. One C tile per 128-column scale block: stored, scaled and summed. */
#include <unistd.h>
#include <sys/syscall.h>
#include <cpuid.h>

#define HM_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16,amx-tile,amx-bf16")))
#define HM_AMX_MIN_T 3  /* below this the kernels above are as fast */
#define HM_AMX_MAX_T 16 /* tokens per tile */

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
    const char *env = getenv("HYBRIDMOE_AMX");
    hm_amx_enabled = !(env && env[0] == '0');
}

/* Whether this call takes the AMX path: then xb must hold hm_build_xb's layout of xp. */
static inline int hm_amx_applies(const hm_weight *w, int T) {
    return hm_amx_enabled && (w->fmt == HM_FP8_B128 || w->fmt == HM_DENSE_BF16 || (w->fmt == HM_INT4 && w->group == 128))
           && T >= HM_AMX_MIN_T
           && T <= HM_AMX_MAX_T && w->cols % 2 == 0 && w->cols >= 64;
}

HM_AMX static void hm_amx_config(int T) {
    hm_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = 16, cfg.colsb[0] = (uint16_t)(T * 4);                        /* C: 16 rows x T fp32 */
    cfg.rows[1] = cfg.rows[2] = 16, cfg.colsb[1] = cfg.colsb[2] = 64;         /* A: 16 rows x 32 bf16 */
    cfg.rows[3] = cfg.rows[4] = 16, cfg.colsb[3] = cfg.colsb[4] = (uint16_t)(T * 4); /* B: 16 x T pairs */
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

/* INT4 (groups of 128) rows [r0, r0 + 16): each 128 columns decode into four A tiles (the
 * low nibbles then the high ones, in the order hm_prepare_x_avx512 laid the activations out);
 * one C tile per group, scaled row by row. */
HM_AMX static void hm_rows16_int4_amx(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T,
                                      float *y, int64_t ldy, int64_t r0) {
    const __m512i tlo = _mm512_load_si512(hm_int4_bf16_lo), thi = _mm512_load_si512(hm_int4_bf16_hi);
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const int64_t full = w->cols / 128 * 128, groups = w->cols / 128;
    hm_amx_config(T);
    uint16_t a[4][16 * 32] __attribute__((aligned(64)));
    float cb[16 * 16] __attribute__((aligned(64)));
    __m512 tot[16];
    for (int n = 0; n < 16; n++) tot[n] = _mm512_setzero_ps();
    const __mmask16 tm = (__mmask16)((1u << T) - 1);
    for (int64_t c = 0; c < full; c += 128) {
        for (int n = 0; n < 16; n++) {
            const uint8_t *row = w->data + (r0 + n) * (w->cols / 2);
            _mm_prefetch((const char *)(row + c / 2 + HM_PREFETCH), _MM_HINT_T0);
            __m512i b = _mm512_loadu_si512(row + c / 2);
            __m512i ql = _mm512_and_si512(b, nib), qh = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
            __m512i ll = _mm512_shuffle_epi8(tlo, ql), lh = _mm512_shuffle_epi8(thi, ql);
            __m512i hl = _mm512_shuffle_epi8(tlo, qh), hh = _mm512_shuffle_epi8(thi, qh);
            _mm512_store_si512(a[0] + n * 32, _mm512_unpacklo_epi8(ll, lh));
            _mm512_store_si512(a[1] + n * 32, _mm512_unpackhi_epi8(ll, lh));
            _mm512_store_si512(a[2] + n * 32, _mm512_unpacklo_epi8(hl, hh));
            _mm512_store_si512(a[3] + n * 32, _mm512_unpackhi_epi8(hl, hh));
        }
        _tile_zero(0);
        _tile_loadd(1, a[0], 64);
        _tile_loadd(2, a[1], 64);
        _tile_loadd(3, xb + (c / 32) * 16 * T, T * 4);
        _tile_loadd(4, xb + (c / 32 + 1) * 16 * T, T * 4);
        _tile_dpbf16ps(0, 1, 3);
        _tile_dpbf16ps(0, 2, 4);
        _tile_loadd(1, a[2], 64);
        _tile_loadd(2, a[3], 64);
        _tile_loadd(3, xb + (c / 32 + 2) * 16 * T, T * 4);
        _tile_loadd(4, xb + (c / 32 + 3) * 16 * T, T * 4);
        _tile_dpbf16ps(0, 1, 3);
        _tile_dpbf16ps(0, 2, 4);
        _tile_stored(0, cb, 64);
        const uint16_t *sc = (const uint16_t *)w->scale + r0 * groups + c / 128;
        for (int n = 0; n < 16; n++)
            tot[n] = _mm512_fmadd_ps(_mm512_maskz_load_ps(tm, cb + n * 16), _mm512_set1_ps(hm_bf16_to_f32(sc[n * groups])),
                                     tot[n]);
    }
    _tile_release();
    hm_amx_store(w, xp, T, tot, y, ldy, r0);
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
            const char *p = (const char *)(rows + n * w->cols + c) + HM_PREFETCH;
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

/* xp [T][cols] bf16 (decode order) -> xb: for each 32-column block j, 16 rows of T dword pairs:
 * xb[(j * 16 + kk) * T + t] = columns (32j + 2kk, 32j + 2kk + 1) of token t. */
static void hm_build_xb(const uint16_t *xp, int T, int64_t cols, uint32_t *xb) {
    const int64_t full = cols / 64 * 64;
    for (int t = 0; t < T; t++) {
        const uint32_t *x32 = (const uint32_t *)(xp + (int64_t)t * cols);
        for (int64_t i = 0; i < full / 2; i++) xb[i * T + t] = x32[i];
    }
}

/* Rows [r0, r0 + 16) for T tokens through AMX. */
HM_AMX static void hm_rows16_fp8_amx(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T,
                                     float *y, int64_t ldy, int64_t r0) {
    const __m512i lo_a = _mm512_load_si512(hm_fp8_bf16_lo), lo_b = _mm512_load_si512(hm_fp8_bf16_lo + 64);
    const __m512i hi_a = _mm512_load_si512(hm_fp8_bf16_hi), hi_b = _mm512_load_si512(hm_fp8_bf16_hi + 64);
    const __m512i sign = _mm512_set1_epi8((char)0x80);
    const int64_t full = w->cols / 64 * 64, nbi = (w->cols + 127) / 128;
    const float *sc = (const float *)w->scale + (r0 / 128) * nbi;
    hm_amx_config(T);
    uint16_t a0[16 * 32] __attribute__((aligned(64))), a1[16 * 32] __attribute__((aligned(64)));
    float cb[16 * 16] __attribute__((aligned(64)));
    __m512 tot[16];
    for (int n = 0; n < 16; n++) tot[n] = _mm512_setzero_ps();
    const __mmask16 tm = (__mmask16)((1u << T) - 1);
    for (int64_t s0 = 0; s0 < full; s0 += 128) {
        const int64_t s1 = s0 + 128 < full ? s0 + 128 : full;
        _tile_zero(0);
        for (int64_t c = s0; c < s1; c += 64) {
            for (int n = 0; n < 16; n++) {
                const uint8_t *row = w->data + (r0 + n) * w->cols;
                _mm_prefetch((const char *)(row + c + HM_PREFETCH), _MM_HINT_T0);
                __m512i b = _mm512_loadu_si512(row + c);
                __m512i lo = _mm512_permutex2var_epi8(lo_a, b, lo_b);
                __m512i hi = _mm512_ternarylogic_epi32(sign, b, _mm512_permutex2var_epi8(hi_a, b, hi_b), 0xCA);
                _mm512_store_si512(a0 + n * 32, _mm512_unpacklo_epi8(lo, hi));
                _mm512_store_si512(a1 + n * 32, _mm512_unpackhi_epi8(lo, hi));
            }
            _tile_loadd(1, a0, 64);
            _tile_loadd(2, a1, 64);
            _tile_loadd(3, xb + (c / 32) * 16 * T, T * 4);
            _tile_loadd(4, xb + (c / 32 + 1) * 16 * T, T * 4);
            _tile_dpbf16ps(0, 1, 3);
            _tile_dpbf16ps(0, 2, 4);
        }
        _tile_stored(0, cb, 64);
        const __m512 s = _mm512_set1_ps(sc[s0 / 128]);
        for (int n = 0; n < 16; n++) tot[n] = _mm512_fmadd_ps(_mm512_maskz_load_ps(tm, cb + n * 16), s, tot[n]);
    }
    _tile_release();
    hm_amx_store(w, xp, T, tot, y, ldy, r0);
}

static void hm_gemv_rows_avx512(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T, float *y,
                                int64_t ldy, int64_t r0, int64_t r1) {
    if (xb && hm_amx_applies(w, T))
        for (; r0 + 16 <= r1; r0 += 16) {
            if (w->fmt == HM_FP8_B128) hm_rows16_fp8_amx(w, xp, xb, T, y, ldy, r0);
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
