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

static void hm_init_avx512(void) {
    if (hm_avx512_ready) return;
    hm_init_generic();
    hm_init_amx();
    hm_init_int4_amx();
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
    const char *env = getenv("HYBRIDMOE_AMX");
    hm_amx_enabled = !(env && env[0] == '0');
}

/* Whether this call takes the AMX path: then xb must hold hm_build_xb's layout of xp. */
static inline int hm_amx_applies(const hm_weight *w, int T) {
    /* Fewest tokens at which AMX wins (measured at DeepSeek-V3 shapes): FP8 from one (rows of
     * 1024 columns and more; on shorter rows the pipeline's fill and drain and the tile
     * configuration per 16 rows weigh more), INT4 with groups of 128 from two, with groups of 32
     * (four C tiles to scale per block) and BF16 from three. */
    const int min_t = w->fmt == HM_FP8_B128 ? (w->cols >= 1024 ? 1 : 3)
                      : w->fmt == HM_INT4 && w->group == 128 ? 2 : 3;
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

/* INT4 rows [r0, r0 + 16) through AMX, pipelined like the FP8 kernel below. Each 64-byte row
 * chunk (128 columns) decodes into four A chunks of 32 columns, each chunk one group of 32:
 * a byte permute puts each group's 16 bytes where the nibble split and the in-lane unpack will
 * gather them (low nibbles in lanes 0-1, high nibbles in lanes 2-3), so one C tile per group of
 * 32 (four per block) or one per block for groups of 128 is scaled row by row. hm_build_xb_int4
 * lays the activations out in the same order. */
static uint8_t hm_int4_amx_perm[64] __attribute__((aligned(64))); /* chunk byte q <- source byte */
static uint8_t hm_int4_amx_xp[128]; /* AMX position (chunk * 32 + word) -> place in xp's block */

static void hm_init_int4_amx(void) {
    for (int q = 0; q < 64; q++) { /* q = lane * 16 + half * 8 + i; bytes 32.. for the second pair */
        int lane = (q >> 4) & 3, half = (q >> 3) & 1, i = q & 7;
        hm_int4_amx_perm[q] = (uint8_t)(16 * half + 8 * (lane & 1) + i);
    }
    uint8_t xp_pos[128]; /* column in the block -> its place in hm_prepare_x_avx512's INT4 order */
    for (int p = 0; p < 64; p++)
        for (int v = 0; v < 2; v++) xp_pos[2 * hm_unpack_src(p) + v] = (uint8_t)(v * 64 + p);
    for (int c = 0; c < 4; c++)
        for (int p = 0; p < 32; p++) {
            int lane = p >> 3, i = p & 7, half = c & 1;
            int byte = 32 * (c >> 1) + 16 * half + 8 * (lane & 1) + i;
            hm_int4_amx_xp[c * 32 + p] = xp_pos[2 * byte + (lane >> 1)];
        }
}

#define HM_INT4_AMX_MUL(D, CT, J)                                                     \
    do {                                                                              \
        _tile_loadd(1, (D)[0], 64);                                                   \
        _tile_loadd(3, xb + (J) * 16 * T, T * 4);                                     \
        _tile_loadd(2, (D)[1], 64);                                                   \
        _tile_loadd(4, xb + ((J) + 1) * 16 * T, T * 4);                               \
        _tile_dpbf16ps(CT##0, 1, 3);                                                  \
        _tile_dpbf16ps(CT##1, 2, 4);                                                  \
        _tile_loadd(1, (D)[2], 64);                                                   \
        _tile_loadd(3, xb + ((J) + 2) * 16 * T, T * 4);                               \
        _tile_loadd(2, (D)[3], 64);                                                   \
        _tile_loadd(4, xb + ((J) + 3) * 16 * T, T * 4);                               \
        _tile_dpbf16ps(CT##2, 1, 3);                                                  \
        _tile_dpbf16ps(CT##3, 2, 4);                                                  \
    } while (0)
#define HM_G128_0 0
#define HM_G128_1 0
#define HM_G128_2 0
#define HM_G128_3 0
#define HM_G32_0 0
#define HM_G32_1 5
#define HM_G32_2 6
#define HM_G32_3 7

HM_AMX static void hm_rows16_int4_amx(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T,
                                      float *y, int64_t ldy, int64_t r0) {
    const __m512i tlo = _mm512_load_si512(hm_int4_bf16_lo), thi = _mm512_load_si512(hm_int4_bf16_hi);
    const __m512i nib = _mm512_set1_epi8(0x0f), perm_a = _mm512_load_si512(hm_int4_amx_perm);
    const __m512i perm_b = _mm512_add_epi8(perm_a, _mm512_set1_epi8(32));
    const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1); /* lanes 2-3 */
    const int64_t nb = w->cols / 128, groups = w->cols / w->group;
    const int ng = w->group == 32 ? 4 : 1; /* C tiles per block */
    const uint16_t *sc = (const uint16_t *)w->scale + r0 * groups;
    hm_amx_config(T);
    uint16_t a[2][4][16 * 32] __attribute__((aligned(64)));
    float cb[2][4][16 * 16] __attribute__((aligned(64)));
    __m512 tot[16];
    for (int n = 0; n < 16; n++) tot[n] = _mm512_setzero_ps();
    const __mmask16 tm = (__mmask16)((1u << T) - 1);
    for (int64_t k = 0; k <= nb + 1; k++) {
        if (k < nb) { /* decode block k */
            uint16_t(*d)[16 * 32] = a[k & 1];
            for (int n = 0; n < 16; n++) {
                const uint8_t *row = w->data + (r0 + n) * (w->cols / 2) + k * 64;
                _mm_prefetch((const char *)(row + HM_AMX_PREFETCH), _MM_HINT_T0);
                __m512i b = _mm512_loadu_si512(row);
                __m512i na = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(perm_a, b), shift), nib);
                __m512i nb2 = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(perm_b, b), shift), nib);
                __m512i al = _mm512_shuffle_epi8(tlo, na), ah = _mm512_shuffle_epi8(thi, na);
                __m512i bl = _mm512_shuffle_epi8(tlo, nb2), bh = _mm512_shuffle_epi8(thi, nb2);
                _mm512_store_si512(d[0] + n * 32, _mm512_unpacklo_epi8(al, ah));
                _mm512_store_si512(d[1] + n * 32, _mm512_unpackhi_epi8(al, ah));
                _mm512_store_si512(d[2] + n * 32, _mm512_unpacklo_epi8(bl, bh));
                _mm512_store_si512(d[3] + n * 32, _mm512_unpackhi_epi8(bl, bh));
            }
        }
        if (k >= 2) { /* scale block k - 2, row by row and group by group */
            for (int g = 0; g < ng; g++) {
                const float *c = cb[k & 1][g];
                const uint16_t *s = sc + (k - 2) * ng + g;
                for (int n = 0; n < 16; n++)
                    tot[n] = _mm512_fmadd_ps(_mm512_maskz_load_ps(tm, c + n * 16),
                                             _mm512_set1_ps(hm_bf16_to_f32(s[n * groups])), tot[n]);
            }
        }
        if (k >= 1 && k <= nb) { /* multiply block k - 1 */
            uint16_t(*d)[16 * 32] = a[(k - 1) & 1];
            float(*c)[16 * 16] = cb[(k - 1) & 1];
            const int64_t j = (k - 1) * 4;
            if (ng == 1) {
                _tile_zero(0);
                HM_INT4_AMX_MUL(d, HM_G128_, j);
                _tile_stored(0, c[0], 64);
            } else {
                _tile_zero(0);
                _tile_zero(5);
                _tile_zero(6);
                _tile_zero(7);
                HM_INT4_AMX_MUL(d, HM_G32_, j);
                _tile_stored(0, c[0], 64);
                _tile_stored(5, c[1], 64);
                _tile_stored(6, c[2], 64);
                _tile_stored(7, c[3], 64);
            }
        }
    }
    _tile_release();
    hm_amx_store(w, xp, T, tot, y, ldy, r0);
}

/* xp [T][cols] (hm_prepare_x_avx512's INT4 order) -> xb in hm_rows16_int4_amx's order. */
static void hm_build_xb_int4(const uint16_t *xp, int T, int64_t cols, uint32_t *xb) {
    for (int t = 0; t < T; t++) {
        const uint16_t *x16 = xp + (int64_t)t * cols;
        for (int64_t c0 = 0; c0 + 128 <= cols; c0 += 128)
            for (int i = 0; i < 64; i++) { /* pair i of the block: AMX positions 2i, 2i + 1 */
                uint16_t lo = x16[c0 + hm_int4_amx_xp[2 * i]], hi = x16[c0 + hm_int4_amx_xp[2 * i + 1]];
                xb[(c0 / 2 + i) * T + t] = (uint32_t)lo | (uint32_t)hi << 16;
            }
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

/* bf16 h times 2^e (e > 0): exponent field plus e; zeros and subnormals (which the tile unit
 * reads as zero anyway) stay, and what would overflow becomes infinity, as the product would. */
static inline uint16_t hm_bf16_ldexp(uint16_t h, int e) {
    int f = (h >> 7) & 0xff;
    if (f == 0 || f == 0xff) return h;
    if (f + e >= 0xff) return (uint16_t)((h & 0x8000) | 0x7f80);
    return (uint16_t)(h + (e << 7));
}

/* xp [T][cols] bf16 (decode order) -> xb: for each 32-column block j, 16 rows of T dword pairs:
 * xb[(j * 16 + kk) * T + t] = columns (32j + 2kk, 32j + 2kk + 1) of token t, times 2^xexp. */
static void hm_build_xb(const uint16_t *xp, int T, int64_t cols, uint32_t *xb, int xexp) {
    const int64_t full = cols / 64 * 64;
    for (int t = 0; t < T; t++) {
        const uint16_t *x16 = xp + (int64_t)t * cols;
        for (int64_t i = 0; i < full / 2; i++) {
            uint16_t lo = x16[2 * i], hi = x16[2 * i + 1];
            if (xexp) lo = hm_bf16_ldexp(lo, xexp), hi = hm_bf16_ldexp(hi, xexp);
            xb[i * T + t] = (uint32_t)lo | (uint32_t)hi << 16;
        }
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
