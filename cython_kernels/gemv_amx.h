/* AMX kernels (included by gemv_avx512.h, whose AVX-512 helpers they use): the common tile
 * set-up, BF16 and FP8 here, INT4 in gemv_amx_int4.h, and the activation layouts they read. */
#ifndef HYBRIDMOE_GEMV_AMX_H
#define HYBRIDMOE_GEMV_AMX_H

/* ---- AMX ---------------------------------------------------------------------------------------
 * Above a token or two the kernels above become bound by VDPBF16PS (each token is one more
 * dot product per 32 weights). AMX's TDPBF16PS multiplies a 16x32 tile of weights by a 32xT tile of activations in
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
#define HM_AMX_WIDE_T 64 /* FP8 and BF16: up to 4 tiles of tokens against one decode or load (the _wide kernels) */
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
    hm_amx_int8_enabled = hm_amx_int8 && !hm_env_off("HYBRIDMOE_AMX_INT8");
    hm_amx_enabled = !hm_env_off("HYBRIDMOE_AMX");
}

/* Whether this call takes the AMX path: then xb must hold hm_build_xb's layout of xp. */
static inline int hm_amx_applies(const hm_weight *w, int T) {
    /* Fewest tokens at which AMX wins (measured at DeepSeek-V3 shapes): FP8 from two (rows of
     * 1024 columns and more; on shorter rows the pipeline's fill and drain and the tile
     * configuration per 16 rows weigh more; one token takes hm_rows_fp8_t1), INT4 from one
     * (AMX-INT8 where it applies, see hm_int4_amx8_applies, else bf16; one or two tokens take
     * VNNI where it applies), BF16 from three. */
    const int min_t = w->fmt == HM_FP8_B128 ? (w->cols >= 1024 ? 2 : 3) : w->fmt == HM_INT4 ? 1 : 3;
    return hm_amx_enabled && (w->fmt != HM_INT4 || w->cols % 128 == 0) && T >= min_t
           && T <= (w->fmt == HM_INT4 ? HM_AMX_MAX_T : HM_AMX_WIDE_T) && w->cols % 2 == 0 && w->cols >= 64;
}

/* The T this thread's tiles are configured for, 0: none. LDTILECFG and TILERELEASE cost about
 * 500 cycles a pair, as much as a tile of 16 rows x 2048 INT4 weights' products at 4 tokens, so a
 * configuration stays loaded from one tile of rows to the next and from one kernel to the next
 * while T is the same (every kernel zeroes its C tiles itself); hm_amx_release ends it when the
 * thread's share of a call is done. */
static __thread int hm_amx_cfg_t = 0;

HM_AMX static void hm_amx_config(int T) {
    if (hm_amx_cfg_t == T) return;
    hm_amx_cfg_t = T;
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

/* Tiles back to their initial state (so that the kernel's context switches save no tile data). */
HM_AMX static void hm_amx_release(void) {
    if (!hm_amx_cfg_t) return;
    hm_amx_cfg_t = 0;
    _tile_release();
}

/* v[n] (row r0 + n, lane t = token t) -> y[t * ldy + r0 + n] for t < T: transposed, one 64-byte
 * store per token. Scalar stores at ldy apart cost up to 1.6x the whole call at 16 tokens when
 * ldy is a multiple of 1024 floats (DeepSeek-V3's 2048 and 7168 rows are): 256 stores 4 KB apart
 * alias in the store buffer with the loads behind them (measured, rows 1024 x 2048 INT4: 212
 * against 130 us at ldy 1024 and 1040). */
HM_AVX512 static inline void hm_store_rows16(const __m512 v[16], int T, float *y, int64_t ldy, int64_t r0) {
    __m512i r[16];
    for (int n = 0; n < 16; n++) r[n] = _mm512_castps_si512(v[n]);
    hm_transpose16(r);
    for (int t = 0; t < T; t++) _mm512_storeu_ps(y + t * ldy + r0, _mm512_castsi512_ps(r[t]));
}

/* C tile (16 rows x T, through cb) plus each row's scalar tail -> y. */
HM_AVX512 static void hm_amx_store(const hm_weight *w, const uint16_t *xp, int T, const __m512 *tot, float *y,
                                   int64_t ldy, int64_t r0) {
    const int64_t full = w->cols / 64 * 64;
    __m512 v[16];
    for (int n = 0; n < 16; n++) {
        v[n] = tot[n];
        if (full < w->cols) {
            float tl[16] = {0};
            for (int t = 0; t < T; t++) tl[t] = hm_tail(w, r0 + n, full, xp + (int64_t)t * w->cols);
            v[n] = _mm512_add_ps(v[n], _mm512_loadu_ps(tl));
        }
    }
    hm_store_rows16(v, T, y, ldy, r0);
}

/* hm_amx_store for row sums the caller keeps in registers: it is handed a copy, so that their
 * address is not taken (see HM_UNROLL). (Inlining hm_amx_store instead left them in memory: its
 * loops over them are not unrolled.) */
HM_AVX512 static inline __attribute__((always_inline)) void hm_amx_store_regs(const hm_weight *w, const uint16_t *xp,
                                                                             int T, const __m512 *tot, float *y,
                                                                             int64_t ldy, int64_t r0) {
    __m512 out[16];
    HM_UNROLL
    for (int n = 0; n < 16; n++) out[n] = tot[n];
    hm_amx_store(w, xp, T, out, y, ldy, r0);
}

/* The first HM_AMX_NEXT_HEAD bytes of each of the next 16 rows (r0 + 16 on, rb bytes a row) into
 * L2, spread over the nb steps of this 16-row tile: a tile reads its 16 rows side by side, so the
 * next tile would otherwise start on 16 cold rows at once (with guided tiles, the next rows are
 * usually this thread's next tile). On rows of 2048 FP8 weights: +8-10 % of bandwidth. */
#define HM_AMX_NEXT_HEAD 256
static inline __attribute__((always_inline)) void hm_prefetch_next_heads(const hm_weight *w, int64_t r0, int64_t rb,
                                                                         int64_t k, int64_t nb) {
    const int64_t nrows = w->rows - (r0 + 16) < 16 ? w->rows - (r0 + 16) : 16;
    if (nrows <= 0 || k >= nb) return;
    const char *next = (const char *)w->data + (r0 + 16) * rb;
    const int64_t lines = nrows * (HM_AMX_NEXT_HEAD / 64), per = (lines + nb - 1) / nb;
    /* row by row (q / 4, a shift): the divisions by nrows cost 2 cycles per 64 weight bytes in the
     * loop on its own (inside the kernels they hid behind the rest) */
    for (int64_t q = k * per; q < (k + 1) * per && q < lines; q++)
        _mm_prefetch(next + (q / (HM_AMX_NEXT_HEAD / 64)) * rb + (q % (HM_AMX_NEXT_HEAD / 64)) * 64, _MM_HINT_T1);
}

/* In each of the 16 rows of the tile at r0 (rb bytes a row), the line HM_AMX_ROWS_AHEAD bytes past
 * this step's offset `off` into L2; past a row's end, the same place in the next tile's rows
 * (contiguous after this tile's, and usually this thread's next tile). For rows of at least twice
 * the distance (the caller checks, once per tile; shorter ones are left to the next heads). Used by
 * the AMX-INT8 INT4 kernel, whose few-token steps are short: from DRAM (probe, 2 threads, one
 * process alternating) at 4 tokens 7168 x 2048 4-9 % faster and 2048 x 7168 1-3 %, at 2 tokens
 * 2048 x 7168 2-5 %, at 8 tokens 1-3 %. The same in the FP8 and bf16-tile INT4 kernels went both
 * ways (FP8 3 % faster at 4 tokens and up to 4 % slower at 16; INT4 on bf16 tiles up to 5 % slower
 * on 2048 x 7168), so they go without. */
#ifndef HM_AMX_ROWS_AHEAD
#define HM_AMX_ROWS_AHEAD 512
#endif
static inline __attribute__((always_inline)) void hm_prefetch_rows_ahead(const hm_weight *w, int64_t r0, int64_t rb,
                                                                        int64_t off) {
    int64_t at = off + HM_AMX_ROWS_AHEAD, rr = r0;
    if (at >= rb) {
        at -= rb, rr = r0 + 16;
        if (rr + 16 > w->rows) return;
    }
    const char *p = (const char *)w->data + rr * rb + at;
    for (int n = 0; n < 16; n++) _mm_prefetch(p + n * rb, _MM_HINT_T1);
}

#include "gemv_amx_int4.h"
#include "gemv_int4_vnni.h"

/* The BF16 kernels' step at column c: A tiles 1 and 2 loaded from the 16 rows at rows (columns c
 * and c + 32), what comes next prefetched. */
HM_AMX static inline __attribute__((always_inline)) void hm_bf16_amx_load_a(const hm_weight *w, int64_t r0,
                                                                           const uint16_t *rows, int64_t c,
                                                                           int64_t full) {
    hm_prefetch_next_heads(w, r0, w->cols * 2, c / 64, full / 64);
    for (int n = 0; n < 16; n++) {
        const char *p = (const char *)(rows + n * w->cols + c) + HM_AMX_PREFETCH;
        _mm_prefetch(p, _MM_HINT_T0);
        _mm_prefetch(p + 64, _MM_HINT_T0);
    }
    _tile_loadd(1, rows + c, w->cols * 2);
    _tile_loadd(2, rows + c + 32, w->cols * 2);
}

/* BF16 rows [r0, r0 + 16) for up to 16 tokens: the A tiles load straight from the weight rows,
 * nothing to decode. */
HM_AMX static void hm_rows16_bf16_amx(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T,
                                      float *y, int64_t ldy, int64_t r0) {
    const int64_t full = w->cols / 64 * 64;
    const uint16_t *rows = (const uint16_t *)w->data + r0 * w->cols;
    float cb[16 * 16] __attribute__((aligned(64)));
    hm_amx_config(T);
    _tile_zero(0);
    for (int64_t c = 0; c < full; c += 64) {
        hm_bf16_amx_load_a(w, r0, rows, c, full);
        _tile_loadd(3, xb + (c / 32) * 16 * T, T * 4);
        _tile_loadd(4, xb + (c / 32 + 1) * 16 * T, T * 4);
        _tile_dpbf16ps(0, 1, 3);
        _tile_dpbf16ps(0, 2, 4);
    }
    _tile_stored(0, cb, 64);
    const __mmask16 tm = (__mmask16)((1u << T) - 1);
    __m512 tot[16];
    for (int n = 0; n < 16; n++) tot[n] = _mm512_maskz_load_ps(tm, cb + n * 16);
    hm_amx_store(w, xp, T, tot, y, ldy, r0);
}

/* One group's multiply in the wide kernels: C tile c += the A tiles (1, 2) times that group's
 * activations for 32-column chunks q and q + 1 (xb: hm_build_xb's groups of 16 tokens, gw words
 * each). Tile numbers are immediates, hence a macro. */
#define HM_AMX_WIDE_GROUP(c, g, q)                                            \
    do {                                                                      \
        _tile_loadd(3, xb + (g) * gw + (q) * 256, 64);                        \
        _tile_loadd(4, xb + (g) * gw + ((q) + 1) * 256, 64);                  \
        _tile_dpbf16ps(c, 1, 3);                                              \
        _tile_dpbf16ps(c, 2, 4);                                              \
    } while (0)

/* The wide kernels' C tiles of G groups (0, 5, 6, 7) zeroed, or stored to cbs[0..G-1]. */
#define HM_AMX_WIDE_ZERO(G)                                                   \
    do {                                                                      \
        _tile_zero(0);                                                        \
        if ((G) > 1) _tile_zero(5);                                           \
        if ((G) > 2) _tile_zero(6);                                           \
        if ((G) > 3) _tile_zero(7);                                           \
    } while (0)
#define HM_AMX_WIDE_STORE(G, cbs)                                             \
    do {                                                                      \
        _tile_stored(0, (cbs)[0], 64);                                        \
        if ((G) > 1) _tile_stored(5, (cbs)[1], 64);                           \
        if ((G) > 2) _tile_stored(6, (cbs)[2], 64);                           \
        if ((G) > 3) _tile_stored(7, (cbs)[3], 64);                           \
    } while (0)

/* BF16 rows [r0, r0 + 16) for 17-64 tokens: each pair of A tiles loaded once and multiplied by
 * every group of 16 tokens (C tiles 0, 5, 6, 7). */
HM_AMX static void hm_rows16_bf16_amx_wide(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T,
                                           float *y, int64_t ldy, int64_t r0) {
    const int64_t full = w->cols / 64 * 64;
    const uint16_t *rows = (const uint16_t *)w->data + r0 * w->cols;
    const int G = (T + HM_AMX_MAX_T - 1) / HM_AMX_MAX_T;
    const size_t gw = (size_t)HM_AMX_MAX_T * (size_t)(w->cols / 2);
    float cb[4][16 * 16] __attribute__((aligned(64)));
    hm_amx_config(HM_AMX_MAX_T);
    HM_AMX_WIDE_ZERO(G);
    for (int64_t c = 0; c < full; c += 64) {
        hm_bf16_amx_load_a(w, r0, rows, c, full);
        HM_AMX_WIDE_GROUP(0, 0, c / 32);
        if (G > 1) HM_AMX_WIDE_GROUP(5, 1, c / 32);
        if (G > 2) HM_AMX_WIDE_GROUP(6, 2, c / 32);
        if (G > 3) HM_AMX_WIDE_GROUP(7, 3, c / 32);
    }
    HM_AMX_WIDE_STORE(G, cb);
    for (int g = 0; g < G; g++) {
        const int t0 = g * HM_AMX_MAX_T, n = T - t0 < HM_AMX_MAX_T ? T - t0 : HM_AMX_MAX_T;
        __m512 tot[16];
        for (int r = 0; r < 16; r++) tot[r] = _mm512_load_ps(cb[g] + r * 16);
        hm_amx_store(w, xp + (int64_t)t0 * w->cols, n, tot, y + t0 * ldy, ldy, r0);
    }
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

/* hm_build_xb's layout for T <= 16 tokens, ld tokens wide (ld >= T; the caller zeroes the rest). */
HM_AVX512 static void hm_build_xb_group(const uint16_t *xp, int T, int ld, int64_t cols, uint32_t *xb, int xexp) {
    const int64_t full = cols / 64 * 64;
    const __mmask16 tm = (__mmask16)((1u << T) - 1);
    if (ld == 1) {
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
        for (int kk = 0; kk < 16; kk++) _mm512_mask_storeu_epi32(xb + (i + kk) * ld, tm, r[kk]);
    }
}

/* xp [T][cols] bf16 (decode order) -> xb: for each 32-column block j, 16 rows of T dword pairs:
 * xb[(j * 16 + kk) * T + t] = columns (32j + 2kk, 32j + 2kk + 1) of token t, times 2^xexp.
 * 16 pairs at a time: stored as they are at one token, through a transpose otherwise. Over 16
 * tokens (FP8's wide kernel), that layout per group of 16 tokens, 16 wide, one group after the
 * other (cols / 2 x 16 words each), the last group's missing tokens zero. */
HM_AVX512 static void hm_build_xb(const uint16_t *xp, int T, int64_t cols, uint32_t *xb, int xexp) {
    if (T > HM_AMX_MAX_T) { /* groups of 16 tokens one after the other, the last padded with zeros */
        for (int t0 = 0; t0 < T; t0 += HM_AMX_MAX_T) {
            const int n = T - t0 < HM_AMX_MAX_T ? T - t0 : HM_AMX_MAX_T;
            uint32_t *g = xb + (size_t)(t0 / HM_AMX_MAX_T) * HM_AMX_MAX_T * (size_t)(cols / 2);
            if (n < HM_AMX_MAX_T) memset(g, 0, sizeof(uint32_t) * HM_AMX_MAX_T * (size_t)(cols / 2));
            hm_build_xb_group(xp + (int64_t)t0 * cols, n, HM_AMX_MAX_T, cols, g, xexp);
        }
        return;
    }
    hm_build_xb_group(xp, T, T, cols, xb, xexp);
}

/* FP8 rows [r0, r0 + 16) for 2-16 tokens through AMX, software-pipelined per 128-column scale
 * block: block k is decoded into one half of a double buffer while the tiles multiply block
 * k - 1 from the other half (a tile load must wait for the stores it reads to leave the store
 * buffer, so loading what was just stored would stall every block), and block k - 2's C tile is
 * scaled into the row sums. Its decode is three cheap ops per 32 weights (see hm_fp8s_*) and the
 * products run on the tile unit; but the tile work does not overlap the decode, so one token
 * takes hm_rows_fp8_t1 instead.
 *
 * The fast decode works in a scaled domain: e4m3 magnitude bits shifted into a bf16 (exponent
 * field e, mantissa m) with 16 added to the exponent field is exactly value * 2^-104, for every
 * byte with e != 0. A 64-byte row chunk with any e == 0 byte (zeros, subnormals: rare in real
 * weights) is decoded by table lookup into the same domain, where subnormals are normal bf16.
 * The tile unit flushes products below 2^-126, so the activations go in scaled by 2^64 (see
 * hm_build_xb) and the C tiles are scaled back by 2^40. */
#define HM_FP8_AMX_XEXP 64 /* products come out times 2^-40: flushed below 2^-86, activations overflow from 2^64 */
#define HM_FP8S_BACK 0x1p40f /* what scales the products back: 2^104 / 2^HM_FP8_AMX_XEXP */

HM_AVX512 static inline __attribute__((always_inline)) __m512i hm_fp8s_fast(__m512i w16) {
    /* w16: words with the e4m3 byte in the high half, low half zero */
    return _mm512_ternarylogic_epi32(_mm512_srai_epi16(w16, 4), _mm512_set1_epi16((short)0x87FF),
                                     _mm512_set1_epi16(0x0800), 0xEA); /* (a & b) | c */
}

/* The table decode's tables for the scaled domain (hm_fp8s_*). */
HM_AVX512 static inline __attribute__((always_inline)) hm_fp8_tables hm_fp8s_tables_load(void) {
    return hm_fp8_tables_of(hm_fp8s_bf16_lo, hm_fp8s_bf16_hi);
}

/* 64 e4m3 bytes -> two vectors of 32 bf16 times 2^-104, in hm_prepare_x_avx512's order: the fast
 * decode, or (a byte with e == 0 among them) the lookup through ts (hm_fp8s_tables_load). */
HM_AVX512 static inline __attribute__((always_inline)) void hm_fp8s_decode64(const hm_fp8_tables *ts, __m512i b,
                                                                            __m512i *w0, __m512i *w1) {
    if (__builtin_expect(!_mm512_testn_epi8_mask(b, _mm512_set1_epi8(0x78)), 1)) {
        *w0 = hm_fp8s_fast(_mm512_unpacklo_epi8(_mm512_setzero_si512(), b));
        *w1 = hm_fp8s_fast(_mm512_unpackhi_epi8(_mm512_setzero_si512(), b));
    } else {
        hm_fp8_decode64(ts, b, w0, w1);
    }
}

/* Scale block k (128 columns, or the last full 64) of FP8 rows [r0, r0 + 16) decoded into the A
 * tiles d[0..3] (16 rows of 32 bf16 each, 64-column halves in hm_prepare_x_avx512's order). */
HM_AVX512 static inline __attribute__((always_inline)) void hm_fp8s_decode_block(
    const hm_fp8_tables *ts, const hm_weight *w, int64_t r0, int64_t k, int64_t full, uint16_t (*d)[16 * 32]) {
    const int64_t c0 = k * 128;
    const int halves = c0 + 128 <= full ? 2 : 1;
    for (int n = 0; n < 16; n++) {
        const uint8_t *row = w->data + (r0 + n) * w->cols + c0;
        _mm_prefetch((const char *)(row + HM_AMX_PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(row + 64 + HM_AMX_PREFETCH), _MM_HINT_T0);
        for (int h = 0; h < halves; h++) {
            __m512i w0, w1;
            hm_fp8s_decode64(ts, _mm512_loadu_si512(row + 64 * h), &w0, &w1);
            _mm512_store_si512(d[2 * h] + n * 32, w0);
            _mm512_store_si512(d[2 * h + 1] + n * 32, w1);
        }
    }
}

HM_AMX static void hm_rows16_fp8_amx(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T,
                                     float *y, int64_t ldy, int64_t r0) {
    const hm_fp8_tables ts = hm_fp8s_tables_load();
    const int64_t full = w->cols / 64 * 64, nb = (full + 127) / 128, nbi = (w->cols + 127) / 128;
    const float *sc = (const float *)w->scale + (r0 / 128) * nbi;
    hm_amx_config(T);
    uint16_t a[2][4][16 * 32] __attribute__((aligned(64)));
    float cb[2][16 * 16] __attribute__((aligned(64)));
    __m512 tot[16];
    HM_UNROLL
    for (int n = 0; n < 16; n++) tot[n] = _mm512_setzero_ps();
    const __mmask16 tm = (__mmask16)((1u << T) - 1);
    for (int64_t k = 0; k <= nb + 1; k++) {
        hm_prefetch_next_heads(w, r0, w->cols, k, nb);
        if (k < nb) hm_fp8s_decode_block(&ts, w, r0, k, full, a[k & 1]); /* decode block k */
        if (k >= 2) { /* scale block k - 2 */
            const __m512 s = _mm512_set1_ps(sc[k - 2] * HM_FP8S_BACK);
            const float *c = cb[k & 1];
            HM_UNROLL
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
    hm_amx_store_regs(w, xp, T, tot, y, ldy, r0);
}

/* FP8 rows [r0, r0 + 16) for 17-64 tokens: hm_rows16_fp8_amx's pipeline, with each decoded block
 * multiplied by every group of 16 tokens (C tiles 0, 5, 6, 7, HM_AMX_WIDE_GROUP), so that
 * a weight is decoded once for up to 64 tokens instead of once per 16: the decode, not the tile
 * unit, is what the narrow kernel spends its time on. The groups' row sums stay in memory (up to
 * 4 x 16 vectors), scaled from the C tiles block by block as there. */
HM_AMX static void hm_rows16_fp8_amx_wide(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T,
                                          float *y, int64_t ldy, int64_t r0) {
    const hm_fp8_tables ts = hm_fp8s_tables_load();
    const int64_t full = w->cols / 64 * 64, nb = (full + 127) / 128, nbi = (w->cols + 127) / 128;
    const float *sc = (const float *)w->scale + (r0 / 128) * nbi;
    const int G = (T + HM_AMX_MAX_T - 1) / HM_AMX_MAX_T;
    const size_t gw = (size_t)HM_AMX_MAX_T * (size_t)(w->cols / 2); /* words of a group's activations */
    hm_amx_config(HM_AMX_MAX_T);
    uint16_t a[2][4][16 * 32] __attribute__((aligned(64)));
    float cb[2][4][16 * 16] __attribute__((aligned(64)));
    __m512 tot[4][16];
    for (int g = 0; g < 4; g++)
        for (int n = 0; n < 16; n++) tot[g][n] = _mm512_setzero_ps();
    for (int64_t k = 0; k <= nb + 1; k++) {
        hm_prefetch_next_heads(w, r0, w->cols, k, nb);
        if (k < nb) hm_fp8s_decode_block(&ts, w, r0, k, full, a[k & 1]); /* decode block k */
        if (k >= 2) { /* scale block k - 2 */
            const __m512 s = _mm512_set1_ps(sc[k - 2] * HM_FP8S_BACK);
            for (int g = 0; g < G; g++) {
                const float *c = cb[k & 1][g];
                for (int n = 0; n < 16; n++) tot[g][n] = _mm512_fmadd_ps(_mm512_load_ps(c + n * 16), s, tot[g][n]);
            }
        }
        if (k >= 1 && k <= nb) { /* multiply block k - 1 by every group */
            uint16_t(*d)[16 * 32] = a[(k - 1) & 1];
            const int64_t j = (k - 1) * 4; /* first 32-column chunk */
            const int chunks = (k - 1) * 128 + 128 <= full ? 4 : 2;
            HM_AMX_WIDE_ZERO(G);
            for (int h = 0; h < chunks; h += 2) {
                _tile_loadd(1, d[h], 64);
                _tile_loadd(2, d[h + 1], 64);
                HM_AMX_WIDE_GROUP(0, 0, j + h);
                if (G > 1) HM_AMX_WIDE_GROUP(5, 1, j + h);
                if (G > 2) HM_AMX_WIDE_GROUP(6, 2, j + h);
                if (G > 3) HM_AMX_WIDE_GROUP(7, 3, j + h);
            }
            HM_AMX_WIDE_STORE(G, cb[(k - 1) & 1]);
        }
    }
    for (int g = 0; g < G; g++) {
        const int t0 = g * HM_AMX_MAX_T, n = T - t0 < HM_AMX_MAX_T ? T - t0 : HM_AMX_MAX_T;
        hm_amx_store(w, xp + (int64_t)t0 * w->cols, n, tot[g], y + t0 * ldy, ldy, r0);
    }
}

/* Whether FP8 at one token takes hm_rows_fp8_t1 (with AMX or without): then xb holds
 * hm_build_xb's layout at one token. */
static inline int hm_fp8_t1_applies(const hm_weight *w, int T) { return w->fmt == HM_FP8_B128 && T == 1 && w->cols >= 64; }

/* FP8 rows [r0, r1) at one token on the vector units where the CPU has no AVX512-FP16 (with it,
 * hm_rows_fp8_t1_fp16 in gemv_fp8_fp16.h), in the AMX kernel's scaled domain: the fast
 * decode (hm_fp8s_decode64) meets the activations times 2^64 (xs: hm_build_xb's layout at one
 * token, which is xp's order) in VDPBF16PS, whose flush to zero the products then stay clear of.
 * Measured per 64 weights with the data in L1: 9.5-10 cycles, against 10.5-11 for the table
 * decode and 9-10 for the tile unit, whose work at one token does not overlap the decode's. Rows
 * are read one after the other, one linear stream prefetched HM_PREFETCH ahead into L2; four
 * rows side by side read 7-16 % slower from DRAM. */
HM_AVX512 static void hm_rows_fp8_t1(const hm_weight *w, const uint16_t *xp, const uint16_t *xs, float *y,
                                     int64_t r0, int64_t r1) {
    const hm_fp8_tables ts = hm_fp8s_tables_load();
    const int64_t full = w->cols / 64 * 64, nbi = (w->cols + 127) / 128;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->data + r * w->cols;
        const float *sc = (const float *)w->scale + (r / 128) * nbi;
        __m512 total = _mm512_setzero_ps(), b0 = total, b1 = total;
        for (int64_t c = 0; c < full; c += 64) {
            _mm_prefetch((const char *)(row + c + HM_PREFETCH), HM_ROW_HINT);
            __m512i w0, w1;
            hm_fp8s_decode64(&ts, _mm512_loadu_si512(row + c), &w0, &w1);
            b0 = hm_dp(b0, w0, _mm512_loadu_si512(xs + c));
            b1 = hm_dp(b1, w1, _mm512_loadu_si512(xs + c + 32));
            if ((c & 127) == 64 || c + 64 == full) { /* end of a 128-column scale block */
                total = _mm512_fmadd_ps(_mm512_add_ps(b0, b1), _mm512_set1_ps(sc[c / 128] * HM_FP8S_BACK), total);
                b0 = b1 = _mm512_setzero_ps();
            }
        }
        hm_store_row(w, r, full, xp, 0, 1, &total, y, 0);
    }
}

#include "gemv_fp8_fp16.h"

/* Whether the call takes a path that reads the activations in its own layout (AMX, VNNI for INT4
 * at 1-2 tokens, FP8 and BF16 at one token): then xb must hold hm_build_kernel_xb_part's layout of xp. */
static inline int hm_xb_applies(const hm_weight *w, int T) { /* (FP8 at one token with FP16 too) */
    return hm_int4_vnni_applies(w, T) || hm_fp8_t1_applies(w, T) || hm_bf16_f32_applies(w, T) || hm_amx_applies(w, T);
}

/* Words of the activation buffer that path needs. */
static inline size_t hm_kernel_xb_words(const hm_weight *w, int T) {
    if (hm_int4_vnni_applies(w, T)) return (size_t)T * hm_vnni_xb_words(w->cols, w->group);
    if (hm_fp8_fp16_applies(w, T)) return hm_fp16_xs_words(w->cols);
    if (hm_bf16_f32_applies(w, T)) return hm_bf16_f32_xb_words(w->cols);
    if (w->fmt != HM_INT4) /* (over 16 tokens, the wide kernels' groups of 16) */
        return (size_t)(T > HM_AMX_MAX_T ? (T + HM_AMX_MAX_T - 1) / HM_AMX_MAX_T * HM_AMX_MAX_T : T) * (size_t)(w->cols / 2);
    if (hm_int4_amx8_applies(w, T)) return hm_amx8_xb_words(w->cols, w->group, T);
    /* B tiles, then 136 x the group sums, laid out like C's columns block by block */
    return (size_t)hm_int4_amx_n(w, T) * (size_t)(w->cols / 2) + (size_t)(w->cols / 128) * 4 * (size_t)T;
}

/* xp (hm_prepare_x_avx512's order; x: the same T rows in fp32) -> xb (hm_kernel_xb_words(w, T)
 * words) in the layout that hm_gemv_rows_avx512's kernel for w and T reads (see hm_xb_applies). */
/* Share `part` of `parts` of that layout: the INT4 layouts split by 128-column blocks (at 4
 * tokens and 7168 columns the AMX-INT8 one took 15 of a call's 24 us of preparation, on the calling
 * thread alone while the others waited; on a socket of 32 cores the products take a sixteenth as
 * long, the preparation as long as ever); the others, cheap, are built whole by share 0. */
static void hm_build_kernel_xb_part(const hm_weight *w, const uint16_t *xp, const float *x, int T, uint32_t *xb,
                                    int part, int parts) {
    const int64_t nb = w->cols / 128, k0 = nb * part / parts, k1 = nb * (part + 1) / parts;
    if (hm_int4_vnni_applies(w, T)) hm_build_xb_int4_vnni(xp, T, w->cols, w->group, xb, k0, k1);
    else if (w->fmt == HM_INT4 && hm_int4_amx8_applies(w, T)) hm_build_xb_int4_i8(xp, T, w->cols, w->group, xb, k0, k1);
    else if (part != 0) return;
    else if (hm_fp8_fp16_applies(w, T)) hm_build_xs_fp16(x, w->cols, xb);
    else if (hm_bf16_f32_applies(w, T)) hm_build_xf_bf16(x, w->cols, (float *)xb);
    else if (w->fmt == HM_INT4) hm_build_xb_int4(xp, T, w->cols, w->group, xb);
    else hm_build_xb(xp, T, w->cols, xb, w->fmt == HM_FP8_B128 ? HM_FP8_AMX_XEXP : 0);
}

#endif
