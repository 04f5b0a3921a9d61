/* INT4 at one and two tokens through AVX-512 VNNI (included by gemv_amx.h, after the AMX-INT8
 * kernel whose activation split it shares).
 *
 * At a token or two the tile paths spend their time writing decoded weights out and loading them
 * back into tiles (work the tile unit does not overlap with the decode), and the tile unit does so
 * few products no faster than a vector port. Here a
 * row is read once, front to back: each 64-byte chunk (128 columns, one block) gives its low and
 * high nibbles n = q + 8 with an AND and a shift, and VPDPBUSD multiplies them, as unsigned bytes,
 * by the activations split into signed bytes xi = 256 h + l (hm_int4_i8_block): four VPDPBUSD
 * per 128 weights, exact in int32, no shuffles. Per block the int32 sums are converted and scaled
 * by group scale x 2^e; the offset 8 sum(xi) of each group is taken off once per row, as a dot
 * product of the row's scales with the groups' offsets.
 *
 * Rows are contiguous, so the weights stream linearly; they are prefetched into L2, not L1: a
 * prefetch into L1 holds one of the core's few line-fill buffers until DRAM answers, which caps
 * the reads in flight (measured: 0.5-0.8 of the bandwidth into L1 at distances of 256 B to 8 KB,
 * 0.9 into L2 at 4 KB). */
#ifndef HYBRIDMOE_GEMV_INT4_VNNI_H
#define HYBRIDMOE_GEMV_INT4_VNNI_H

#define HM_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16,avx512vnni")))
#define HM_VNNI_PREFETCH 4096 /* bytes ahead, into L2 */

static int hm_vnni_available = 0; /* AVX512-VNNI */
static int hm_vnni_enabled = 0;   /* ... and INT4 at 1-2 tokens may use it (HYBRIDMOE_VNNI=0, set_vnni) */

static void hm_init_vnni(void) {
    if (!hm_cpu_avx512vnni()) return;
    hm_vnni_available = 1;
    hm_vnni_enabled = !hm_env_off("HYBRIDMOE_VNNI");
}

/* Tokens up to which INT4 takes VNNI rather than AMX-INT8 (DeepSeek-V3 shapes from DRAM, 2
 * threads: at two tokens 5-55 % faster, groups of 32 12-27 %; at three the longer rows lose 14-28 %,
 * at four all lose, the products being the work). Since AMX-INT8 keeps its tile configuration and
 * builds its layout in vector registers, it wins at two tokens and groups of 128 on rows of 4096
 * columns and more (2048 x 7168 from DRAM: 331-337 against 347-354 us), VNNI still on rows of 2048
 * (7168 x 2048: 372 against 381 us). Groups of 32 take VNNI at two tokens on every row length since
 * its scales are made four blocks at a time (2048 x 7168: 390 against 410-416 us; 4096 x 4096: 440-448
 * against 463-483). */
#define HM_VNNI_MAX_T 2
#define HM_VNNI_T2_MAX_COLS 4096 /* two tokens at groups of 128 take VNNI below this many columns where AMX-INT8 runs */

static inline int hm_int4_vnni_applies(const hm_weight *w, int T) {
    const int amx8 = hm_amx_enabled && hm_amx_int8_enabled;
    return hm_vnni_enabled && w->fmt == HM_INT4 && w->cols % 128 == 0
           && (T == 1 || (T == HM_VNNI_MAX_T && (w->group == 32 || !(amx8 && w->cols >= HM_VNNI_T2_MAX_COLS))));
}

/* Words of one token's activations: per block 256 bytes (h of the low nibbles' columns, h of the
 * high nibbles', then l of each), then per block 2^e, then per group 8 sum(xi) 2^e; rounded up to
 * 64 bytes, so that every token's blocks stay aligned. */
static inline size_t hm_vnni_xb_words(int64_t cols, int group) {
    return ((size_t)(cols / 128) * 65 + (size_t)(cols / group) + 15) / 16 * 16;
}

/* xp [T][cols] (hm_prepare_x_avx512's INT4 order) -> hm_rows_int4_vnni's activations: per token
 * hm_vnni_xb_words(cols, group) words, one after the other; 128-column blocks [k0, k1). */
HM_AVX512 static void hm_build_xb_int4_vnni(const uint16_t *xp, int T, int64_t cols, int group, uint32_t *xb,
                                            int64_t k0, int64_t k1) {
    const int G = hm_i8_groups(group);
    const int64_t nb = cols / 128;
    for (int t = 0; t < T; t++) {
        uint32_t *xt = xb + (size_t)t * hm_vnni_xb_words(cols, group);
        float *ex = (float *)(xt + nb * 64), *off = ex + nb;
        for (int64_t k = k0; k < k1; k++) {
            __m512i hl[2][2]; /* [piece][parity] */
            float gsum[4];
            int e;
            hm_int4_i8_block(xp + (int64_t)t * cols + k * 128, G, hl[0], hl[1], gsum, &e);
            for (int piece = 0; piece < 2; piece++) /* block k: [piece][parity][64 bytes] */
                for (int c = 0; c < 2; c++) _mm512_storeu_si512(xt + k * 64 + (piece * 2 + c) * 16, hl[piece][c]);
            ex[k] = ldexpf(1.f, e);
            for (int g = 0; g < G; g++) off[k * G + g] = 8.f * gsum[g] * ex[k];
        }
    }
}

/* Row r's block scales (groups of 128) times the activations' block factors 2^e, for blocks
 * [k0, k0 + n) (n <= 16), in fp32 (the kernel broadcasts each from memory: a load, no shuffle). */
HM_VNNI static inline __attribute__((always_inline)) void hm_vnni_scales(const float *ex, const uint16_t *sc,
                                                                        int64_t k0, int n, float *out) {
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, sc + k0)), 16));
    _mm512_storeu_ps(out, _mm512_mul_ps(f, _mm512_maskz_loadu_ps(m, ex + k0)));
}

/* Block k of the row (its 64 bytes at row + 64 k) against nt tokens' activations, into tot[t] with
 * scale SCALE (an expression of t: fp32, a float per group lane), in the caller's row, nib, xb,
 * words, nt and tot. Two ANDs and a shift, then per token four VPDPBUSD, a shift, a convert and an
 * FMA. (A macro: as an inline function taking the scales as vectors, the groups-of-128 instance
 * broadcast each scale apart from its FMA and read 4 % slower from DRAM.) */
#define HM_VNNI_BLOCK(k, SCALE)                                                                          \
    do {                                                                                                 \
        _mm_prefetch((const char *)row + 64 * (k) + HM_VNNI_PREFETCH, _MM_HINT_T1);                      \
        const __m512i b = _mm512_loadu_si512(row + 64 * (k));                                            \
        const __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib); \
        for (int t = 0; t < nt; t++) {                                                                   \
            const uint32_t *xk = xb + t * words + (k) * 64;                                              \
            __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xk));      \
            acc = _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512(xk + 16));                             \
            acc = _mm512_slli_epi32(acc, 8);                                                             \
            acc = _mm512_dpbusd_epi32(acc, lo, _mm512_loadu_si512(xk + 32));                             \
            acc = _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512(xk + 48));                             \
            tot[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), (SCALE), tot[t]);                         \
        }                                                                                                \
    } while (0)

/* y[t][r] for rows [r0, r1) and nt tokens, groups of 32 or not (constants where inlined, so that
 * the sums stay in registers). Rows are contiguous, so reading them one after the other is one
 * linear stream, prefetched HM_VNNI_PREFETCH ahead into L2 (through the next rows). Each block's
 * sums are scaled by its group scales times the activations' factor 2^e: at groups of 128 one
 * float, from hm_vnni_scales' 16 blocks at a time; at groups of 32 a vector whose 128-bit lane g
 * holds group g's, made four blocks at a time in registers (their 16 scales converted and
 * multiplied in one vector, then spread by a permute per block: 2.5 vector uops a block against 7
 * for a conversion, broadcast, multiply and store per block; one thread, data in L1, 12.5 -> 9.7
 * cycles per 64 bytes, as groups of 128 take; from DRAM 7-9 % faster at one token, 13-14 % at two).
 * (Four rows side by side share the activation loads, but four interleaved streams read 7-16 %
 * slower from DRAM here than one. A scalar bf16 scale conversion and broadcast per chunk, and sums
 * indexed by k & 1, which the compiler kept in memory, cost a fifth of the time with the data in
 * L1.) */
HM_VNNI static inline __attribute__((always_inline)) void hm_rows_int4_vnni_nt(const hm_weight *w, const uint32_t *xb,
                                                                              float *y, int64_t ldy, int64_t r0,
                                                                              int64_t r1, const int nt,
                                                                              const int g32) {
    const int64_t nb = w->cols / 128, G = w->cols / w->group, rb = w->cols / 2;
    const size_t words = hm_vnni_xb_words(w->cols, w->group);
    const __m512i nib = _mm512_set1_epi8(0x0f);
    float sv[HM_VNNI_MAX_T][16] __attribute__((aligned(64))); /* hm_vnni_scales of the current 16 blocks (g128) */
    const __m512i quarter = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2);
    const __m512i spread[4] = {quarter, _mm512_add_epi32(quarter, _mm512_set1_epi32(4)),
                               _mm512_add_epi32(quarter, _mm512_set1_epi32(8)),
                               _mm512_add_epi32(quarter, _mm512_set1_epi32(12))};
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->data + r * rb;
        const uint16_t *sc = (const uint16_t *)w->scale + r * G;
        __m512 tot[HM_VNNI_MAX_T];
        for (int t = 0; t < nt; t++) tot[t] = _mm512_setzero_ps();
        if (g32) {
            for (int64_t k = 0; k < nb; k += 4) {
                const int m = nb - k < 4 ? (int)(nb - k) : 4;
                const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16((__mmask16)((1u << (4 * m)) - 1), sc + 4 * k)), 16));
                __m512 p[HM_VNNI_MAX_T];
                for (int t = 0; t < nt; t++) {
                    const float *ex = (const float *)(xb + t * words + nb * 64);
                    p[t] = _mm512_mul_ps(f, _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(
                                                _mm_maskz_loadu_ps((__mmask8)((1u << m) - 1), ex + k))));
                }
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    if (i >= m) break;
                    HM_VNNI_BLOCK(k + i, _mm512_permutexvar_ps(spread[i], p[t]));
                }
            }
        } else {
            for (int64_t k0 = 0; k0 < nb; k0 += 16) {
                const int n = nb - k0 < 16 ? (int)(nb - k0) : 16;
                for (int t = 0; t < nt; t++) hm_vnni_scales((const float *)(xb + t * words + nb * 64), sc, k0, n, sv[t]);
                for (int64_t k = k0; k < k0 + n; k++) HM_VNNI_BLOCK(k, _mm512_set1_ps(sv[t][k - k0]));
            }
        }
        for (int t = 0; t < nt; t++) {
            const float *off = (const float *)(xb + t * words + nb * 64) + nb;
            __m512 o = _mm512_setzero_ps();
            int64_t g = 0;
            for (; g + 16 <= G; g += 16)
                o = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(
                                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(sc + g))), 16)),
                                    _mm512_loadu_ps(off + g), o);
            float corr = _mm512_reduce_add_ps(o);
            for (; g < G; g++) corr += hm_bf16_to_f32(sc[g]) * off[g];
            y[t * ldy + r] = _mm512_reduce_add_ps(tot[t]) - corr;
        }
    }
}

/* y [T][ldy] for rows [r0, r1), T in 1..HM_VNNI_MAX_T (2). */
HM_VNNI static void hm_rows_int4_vnni(const hm_weight *w, const uint32_t *xb, int T, float *y, int64_t ldy,
                                     int64_t r0, int64_t r1) {
    const int g32 = w->group == 32; /* (a constant in each instance: the other path's setup left out) */
    if (T == 1 && g32) hm_rows_int4_vnni_nt(w, xb, y, ldy, r0, r1, 1, 1);
    else if (T == 1) hm_rows_int4_vnni_nt(w, xb, y, ldy, r0, r1, 1, 0);
    else if (g32) hm_rows_int4_vnni_nt(w, xb, y, ldy, r0, r1, 2, 1);
    else hm_rows_int4_vnni_nt(w, xb, y, ldy, r0, r1, 2, 0);
}

#endif
