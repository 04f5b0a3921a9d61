/* INT4 through AMX (included by gemv_amx.h): on bf16 tiles, and exactly on AMX-INT8 tiles. */
#ifndef HYBRIDMOE_GEMV_AMX_INT4_H
#define HYBRIDMOE_GEMV_AMX_INT4_H

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

/* Block kb's scales of 16 rows as fp32 in sf: sf[n] (groups of 128, ng = 1) or sf[n * 4 + g]
 * (groups of 32, ng = 4). Every HM_INT4_SCALE_STAGE blocks the next blocks' scales are first
 * copied out of the rows into stage, block by block, so that each block's are contiguous. */
HM_AVX512 static inline void hm_int4_block_scales(const uint16_t *sc, int64_t groups, int64_t nb, int64_t kb, int ng,
                                                  uint16_t *stage, float *sf) {
    if (kb % HM_INT4_SCALE_STAGE == 0) {
        const int64_t nbk = nb - kb < HM_INT4_SCALE_STAGE ? nb - kb : HM_INT4_SCALE_STAGE;
        for (int n = 0; n < 16; n++) {
            const uint16_t *sn = sc + n * groups + kb * ng;
            if (ng == 4)
                for (int64_t b = 0; b < nbk; b++) memcpy(stage + (b * 16 + n) * 4, sn + 4 * b, 8);
            else
                for (int64_t b = 0; b < nbk; b++) stage[b * 16 + n] = sn[b];
        }
    }
    const uint16_t *sk = stage + (kb % HM_INT4_SCALE_STAGE) * 16 * ng;
    for (int q = 0; q < ng; q++)
        _mm512_store_ps(sf + 16 * q, _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_load_si256((const __m256i *)(sk + 16 * q))), 16)));
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

HM_AMX static inline __attribute__((always_inline)) void hm_rows16_int4_amx_v(
    const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T, float *y, int64_t ldy, int64_t r0,
    const int one, const int g32, const int grouped) {
    const __m512i c43 = _mm512_set1_epi8(0x43), keep_lo = _mm512_set1_epi16((short)0xFF0F);
    const __m512i nib16 = _mm512_set1_epi16(0x000F), hi43 = _mm512_set1_epi16(0x4300);
    const __m512i nib = _mm512_set1_epi8(0x0f), perm_a = _mm512_load_si512(hm_int4_amx_perm);
    const __m512i perm_b = _mm512_add_epi8(perm_a, _mm512_set1_epi8(32));
    const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1); /* lanes 2-3 */
    const int64_t nb = w->cols / 128, groups = w->cols / w->group;
    const int N = hm_int4_amx_n(w, T);
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
    HM_UNROLL
    for (int n = 0; n < 16; n++) tot[n] = _mm512_setzero_ps();
    const __mmask16 nm = (__mmask16)((1u << N) - 1), tm = (__mmask16)((1u << T) - 1);
    for (int64_t k = 0; k <= nb + 1; k++) {
        hm_prefetch_next_heads(w, r0, w->cols / 2, k, nb);
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
            hm_int4_block_scales(sc, groups, nb, kb, ng, stage, sf);
            if (one) { /* C stored densely: across rows, 16 (or 4 rows x 4 groups) per register */
                const float *c = cb[k & 1][0];
                const __m512 xv = g32 ? _mm512_broadcast_f32x4(_mm_loadu_ps(xk)) : _mm512_set1_ps(xk[0]);
                HM_UNROLL
                for (int q = 0; q < ng; q++)
                    tot[q] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_load_ps(c + 16 * q), xv), _mm512_load_ps(sf + 16 * q), tot[q]);
            } else {
                if (!g32) {
                    const __m512 xv = _mm512_maskz_loadu_ps(tm, xk);
                    const float *c = cb[k & 1][0];
                    HM_UNROLL
                    for (int n = 0; n < 16; n++)
                        tot[n] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_load_ps(tm, c + n * 16), xv),
                                                 _mm512_set1_ps(sf[n]), tot[n]);
                } else if (!grouped) { /* column t * 4 + g: group g's scale in every 128-bit lane */
                    const __m512 xv = _mm512_maskz_loadu_ps(nm, xk);
                    const float *c = cb[k & 1][0];
                    HM_UNROLL
                    for (int n = 0; n < 16; n++)
                        tot[n] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_load_ps(nm, c + n * 16), xv),
                                                 _mm512_broadcast_f32x4(_mm_load_ps(sf + 4 * n)), tot[n]);
                } else {
                    for (int g = 0; g < 4; g++) {
                        const __m512 xv = _mm512_maskz_loadu_ps(tm, xk + g * T);
                        const float *c = cb[k & 1][g];
                        HM_UNROLL
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
                _tile_stored(0, c[0], one ? N * 4 : 64);
            } else {
                _tile_stored(0, c[0], 64);
                _tile_stored(5, c[1], 64);
                _tile_stored(6, c[2], 64);
                _tile_stored(7, c[3], 64);
            }
        }
    }
    if (one) { /* no column tail: INT4 AMX rows are whole blocks */
        float v[64];
        HM_UNROLL
        for (int q = 0; q < 4; q++)
            if (q < ng) _mm512_storeu_ps(v + 16 * q, tot[q]);
        for (int n = 0; n < 16; n++)
            y[r0 + n] = g32 ? v[4 * n] + v[4 * n + 1] + v[4 * n + 2] + v[4 * n + 3] : v[n];
        return;
    }
    if (N != T) { /* columns t * 4 + g -> token t, in registers (scalar sums stored and loaded back
                   * as a vector stall on store forwarding) */
        const __mmask16 tm = (__mmask16)((1u << T) - 1);
        const __m512i four = _mm512_slli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2);
        HM_UNROLL
        for (int n = 0; n < 16; n++) {
            __m512 s = _mm512_maskz_permutexvar_ps(tm, four, tot[n]);
            for (int g = 1; g < 4; g++)
                s = _mm512_add_ps(s, _mm512_maskz_permutexvar_ps(tm, _mm512_add_epi32(four, _mm512_set1_epi32(g)), tot[n]));
            tot[n] = s;
        }
    }
    hm_amx_store_regs(w, xp, T, tot, y, ldy, r0);
}

/* One instance per (one token, groups of 32, grouped layout): with them constant, each instance's
 * loops over the row sums unroll and the sums stay in registers (16 tokens at groups of 128, in L2:
 * 26.1 -> 23.5 cycles per 64 weight bytes; one instance with HM_UNROLL alone: 26.1). */
HM_AMX static void hm_rows16_int4_amx(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, int T,
                                      float *y, int64_t ldy, int64_t r0) {
    if (T == 1 && w->group == 32) hm_rows16_int4_amx_v(w, xp, xb, T, y, ldy, r0, 1, 1, 0);
    else if (T == 1) hm_rows16_int4_amx_v(w, xp, xb, T, y, ldy, r0, 1, 0, 0);
    else if (w->group != 32) hm_rows16_int4_amx_v(w, xp, xb, T, y, ldy, r0, 0, 0, 0);
    else if (!hm_int4_amx_grouped(w, T)) hm_rows16_int4_amx_v(w, xp, xb, T, y, ldy, r0, 0, 1, 0);
    else hm_rows16_int4_amx_v(w, xp, xb, T, y, ldy, r0, 0, 1, 1);
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
 * B carry group g's activations in group g's columns and zeros elsewhere. Up to 16 columns, one
 * C tile (groups of 128 up to 8 tokens, groups of 32 up to 2); more takes the bf16 path. */
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
 * dwords), then per block the column weights and then the column offsets as the scale step's
 * registers hold C (16 floats each: lane l, column l % P, zero past NC), then the scale step's lane
 * tables (hm_amx8_lanes), which depend only on the group and T. */
#define HM_AMX8_LANE_WORDS (16 * 16 + 16)
static inline size_t hm_amx8_xb_words(int64_t cols, int group, int T) {
    return (size_t)(cols / 128) * ((size_t)hm_i8_cols(group, T) * 32 + 32) + HM_AMX8_LANE_WORDS;
}

/* C goes out P ints a row (P: NC rounded up to a power of two). Register q of the scale step
 * holds rows q * 16 / P .. of C, lane l = row l / P's column l % P; its scales come from register
 * sreg[q] of the block's scales (sf), lane sl[q][l]. Computed once per call, into xb (at 16 rows
 * a tile, the divisions cost as much as a tile's products). */
static inline int hm_amx8_p(int NC) {
    int P = 1;
    while (P < NC) P *= 2;
    return P;
}
static void hm_amx8_lanes(int G, int T, int32_t sl[16][16], int32_t sreg[16]) {
    const int P = hm_amx8_p(2 * G * T), R = 16 / P;
    for (int q = 0; q < 16; q++) {
        sreg[q] = q < P ? G * q * R / 16 : 0;
        for (int l = 0; l < 16; l++) sl[q][l] = q < P ? G * (q * R + l / P) + (l % P / T) % G - 16 * sreg[q] : 0;
    }
}

static void hm_init_amx8(void) {
    for (int p = 0; p < 64; p++) { /* natural position p of a parity's 64 columns -> xp's place */
        for (int q = 0; q < 64; q++)
            if (hm_unpack_src(q) == p) hm_pw_nat[p >> 5][p & 31] = (uint16_t)q;
    }
}

/* One token's 128-column block of xp (hm_prepare_x_avx512's INT4 order) as 16-bit integers split
 * into bytes (see above): byte j of hv[c], lv[c] for column 2j + c of the block (c = 0: the low
 * nibbles' columns, 1: the high nibbles'), gsum[g] the sum of xi over group g (one group at
 * groups of 128), and the block's exponent e (the activations are 2^e xi). In registers: written
 * out 16 bytes at a time and loaded back whole, they stalled on store forwarding. */
HM_AVX512 static void hm_int4_i8_block(const uint16_t *x16, int G, __m512i hv[2], __m512i lv[2], float gsum[4],
                                       int *exp) {
    const __m512i nat0 = _mm512_load_si512(hm_pw_nat[0]), nat1 = _mm512_load_si512(hm_pw_nat[1]);
    __m512 f[2][4]; /* [parity][16 positions] as fp32, natural order */
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
        /* m = f 2^x, f in [0.5, 1): x from m's exponent field (frexpf, a library call per block
         * and token, cost a tenth of the preparation; kept for subnormals), e = x - 15 so that
         * m / 2^e < 2^15, one more where that exceeds HM_I8_HALF (scalef: exact) */
        uint32_t bits;
        memcpy(&bits, &m, 4);
        if (bits >> 23) e = (int)(bits >> 23) - 126;
        else frexpf(m, &e);
        e -= 15;
        if (_mm_cvtss_f32(_mm_scalef_ss(_mm_set_ss(m), _mm_set_ss((float)-e))) > (float)HM_I8_HALF) e++;
    }
    const __m512 ne = _mm512_set1_ps((float)-e);
    __m512i gs[4];
    for (int q = 0; q < 4; q++) gs[q] = _mm512_setzero_si512();
    for (int c = 0; c < 2; c++) {
        __m128i hq[4], lq[4];
        for (int q = 0; q < 4; q++) {
            __m512i xi = _mm512_cvtps_epi32(_mm512_scalef_ps(f[c][q], ne)); /* exact scaling, nearest */
            __m512i h = _mm512_srai_epi32(_mm512_add_epi32(xi, _mm512_set1_epi32(128)), 8);
            __m512i l = _mm512_sub_epi32(xi, _mm512_slli_epi32(h, 8));
            hq[q] = _mm512_cvtepi32_epi8(h);
            lq[q] = _mm512_cvtepi32_epi8(l);
            gs[q] = _mm512_add_epi32(gs[q], xi); /* positions 16q.. = group q */
        }
        /* (the lane of VINSERTI32X4 is an immediate: spelled out, not a loop index) */
        hv[c] = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(hq[0]), hq[1], 1),
                                                      hq[2], 2), hq[3], 3);
        lv[c] = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(lq[0]), lq[1], 1),
                                                      lq[2], 2), lq[3], 3);
    }
    if (G == 4)
        for (int q = 0; q < 4; q++) gsum[q] = (float)_mm512_reduce_add_epi32(gs[q]);
    else
        gsum[0] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(gs[0], gs[1]),
                                                                  _mm512_add_epi32(gs[2], gs[3])));
    *exp = e;
}

/* xp [T][cols] (hm_prepare_x_avx512's INT4 order) -> hm_rows16_int4_amx8's B tiles and column
 * weights and offsets, for 128-column blocks [k0, k1) (the lane tables with the first): the blocks
 * are independent, so a call's threads can build a share each. */
HM_AVX512 static void hm_build_xb_int4_i8(const uint16_t *xp, int T, int64_t cols, int group, uint32_t *xb,
                                          int64_t k0, int64_t k1) {
    const int G = hm_i8_groups(group), NC = hm_i8_cols(group, T);
    const int64_t nb = cols / 128;
    const __mmask16 cm = (__mmask16)((1u << NC) - 1);
    const int P = hm_amx8_p(NC);
    float *W = (float *)(xb + nb * 32 * NC), *O = W + nb * 16;
    int32_t *lanes = (int32_t *)(O + nb * 16);
    if (k0 == 0 && k1 > 0) hm_amx8_lanes(G, T, (int32_t(*)[16])lanes, lanes + 16 * 16);
    for (int64_t k = k0; k < k1; k++) {
        /* v[c][col]: column col's 16 quad-rows (dwords) of parity c's B tile, transposed into
         * rows at the end (at groups of 32, group g's column holds quad-rows 4g..4g+3 only) */
        __m512i v[2][16];
        for (int c = 0; c < 2; c++)
            for (int col = NC; col < 16; col++) v[c][col] = _mm512_setzero_si512();
        float wk[16] = {0}, ok[16] = {0}; /* per column */
        for (int t = 0; t < T; t++) {
            __m512i hl[2][2]; /* [piece][parity] */
            float gsum[4];
            int e;
            hm_int4_i8_block(xp + (int64_t)t * cols + k * 128, G, hl[0], hl[1], gsum, &e);
            const float sx = ldexpf(1.f, e);
            for (int piece = 0; piece < 2; piece++)
                for (int g = 0; g < G; g++) {
                    const int col = (piece * G + g) * T + t;
                    wk[col] = piece == 0 ? 256.f * sx : sx;
                    ok[col] = piece == 0 ? 8.f * gsum[g] * sx : 0.f;
                    const __mmask16 gm = G == 4 ? (__mmask16)(0xfu << (4 * g)) : (__mmask16)0xffff;
                    for (int c = 0; c < 2; c++) v[c][col] = _mm512_maskz_mov_epi32(gm, hl[piece][c]);
                }
        }
        for (int l = 0; l < 16; l++) W[k * 16 + l] = wk[l % P], O[k * 16 + l] = ok[l % P];
        uint32_t *bk = xb + k * 32 * NC;
        for (int c = 0; c < 2; c++) {
            hm_transpose16(v[c]);
            for (int kk = 0; kk < 16; kk++) _mm512_mask_storeu_epi32(bk + (c * 16 + kk) * NC, cm, v[c][kk]);
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
 * not wait for that store).
 *
 * C goes out densely, P ints a row (P: NC rounded up to a power of two), so that each register
 * of the scale step holds 16 / P whole rows: P registers a block instead of one half-empty
 * register per row (4 tokens at groups of 128: 8 registers against 16, 19 -> 16 cycles per 64
 * weight bytes in L2). Register q, lane l: row q * 16 / P + l / P, column l % P; lanes past NC
 * meet zero column weights and offsets, so whatever the store left there adds nothing. */
HM_AMX8 static inline __attribute__((always_inline)) void hm_rows16_int4_amx8_gp(
    const hm_weight *w, const uint32_t *xb, int T, float *y, int64_t ldy, int64_t r0, const int G, const int P) {
    const int NC = hm_i8_cols(w->group, T);
    const int64_t nb = w->cols / 128, groups = w->cols / w->group;
    const float *W = (const float *)(xb + nb * 32 * NC), *O = W + nb * 16;
    const int32_t(*sl)[16] = (const int32_t(*)[16])(O + nb * 16), *sreg = sl[16];
    const uint16_t *sc = (const uint16_t *)w->scale + r0 * groups;
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const int ahead = w->cols / 2 >= 2 * HM_AMX_ROWS_AHEAD;
    hm_amx_config(NC);
    uint8_t a[2][2][16 * 64] __attribute__((aligned(64)));
    int32_t cb[2][16 * 16] __attribute__((aligned(64)));
    uint16_t stage[HM_INT4_SCALE_STAGE * 16 * 4] __attribute__((aligned(64)));
    float sf[64] __attribute__((aligned(64)));
    __m512 acc[16];
    /* the lane tables in registers (P constant: up to 8 of them beside the P sums) */
    __m512i slv[16];
    HM_UNROLL
    for (int q = 0; q < P; q++) acc[q] = _mm512_setzero_ps(), slv[q] = _mm512_loadu_si512(sl[q]);
    for (int64_t k = 0; k <= nb + 1; k++) {
        hm_prefetch_next_heads(w, r0, w->cols / 2, k, nb);
        if (k >= 1 && k <= nb) { /* multiply block k - 1 */
            const uint32_t *bk = xb + (k - 1) * 32 * NC;
            _tile_loadd(1, a[(k - 1) & 1][0], 64);
            _tile_loadd(2, a[(k - 1) & 1][1], 64);
            if (k & 1) HM_I8_MUL(5);
            else HM_I8_MUL(0);
        }
        if (k >= 2) { /* scale block k - 2 */
            const int64_t kb = k - 2;
            hm_int4_block_scales(sc, groups, nb, kb, G, stage, sf);
            const __m512 wr = _mm512_load_ps(W + kb * 16), orr = _mm512_load_ps(O + kb * 16);
            const int32_t *c = cb[k & 1];
            HM_UNROLL
            for (int q = 0; q < P; q++) {
                const __m512 sv = _mm512_permutexvar_ps(slv[q], _mm512_load_ps(sf + 16 * (G == 1 ? 0 : sreg[q])));
                const __m512 v = _mm512_cvtepi32_ps(_mm512_load_epi32(c + 16 * q));
                acc[q] = _mm512_fmadd_ps(_mm512_fmsub_ps(v, wr, orr), sv, acc[q]);
            }
        }
        if (k < nb) { /* decode block k: low nibbles (even columns) and high nibbles (odd) */
            if (ahead) hm_prefetch_rows_ahead(w, r0, w->cols / 2, k * 64);
            for (int n = 0; n < 16; n++) {
                const uint8_t *row = w->data + (r0 + n) * (w->cols / 2) + k * 64;
                _mm_prefetch((const char *)(row + HM_INT4_AMX_PREFETCH), _MM_HINT_T0);
                __m512i b = _mm512_loadu_si512(row);
                _mm512_store_si512(a[k & 1][0] + n * 64, _mm512_and_si512(b, nib));
                _mm512_store_si512(a[k & 1][1] + n * 64, _mm512_and_si512(_mm512_srli_epi16(b, 4), nib));
            }
        }
        if (k >= 1 && k <= nb) { /* block k - 1's C out, P ints a row */
            if (k & 1) _tile_stored(5, cb[(k - 1) & 1], P * 4);
            else _tile_stored(0, cb[(k - 1) & 1], P * 4);
        }
    }
    float v[16 * 16] __attribute__((aligned(64))); /* v[n * P + column], column (piece, group, token) */
    HM_UNROLL
    for (int q = 0; q < P; q++) _mm512_store_ps(v + 16 * q, acc[q]);
    /* row n's tokens: the sum over (piece, group) of T columns each, as vector loads (scalar sums
     * into a buffer loaded back as a vector stalled on store forwarding: 8 % of the call) */
    const __mmask16 tm = (__mmask16)((1u << T) - 1);
    __m512 out[16];
    for (int n = 0; n < 16; n++) {
        out[n] = _mm512_maskz_loadu_ps(tm, v + n * P);
        for (int pg = 1; pg < 2 * G; pg++) out[n] = _mm512_add_ps(out[n], _mm512_maskz_loadu_ps(tm, v + n * P + pg * T));
    }
    hm_store_rows16(out, T, y, ldy, r0);
}

/* One instance per (groups per block, P) that hm_int4_amx8_applies admits: with both constant the
 * scale step's loop unrolls and its lane tables stay in registers. */
HM_AMX8 static void hm_rows16_int4_amx8(const hm_weight *w, const uint32_t *xb, int T, float *y, int64_t ldy,
                                        int64_t r0) {
    const int G = hm_i8_groups(w->group), P = hm_amx8_p(hm_i8_cols(w->group, T));
    if (G == 1 && P == 2) hm_rows16_int4_amx8_gp(w, xb, T, y, ldy, r0, 1, 2);
    else if (G == 1 && P == 4) hm_rows16_int4_amx8_gp(w, xb, T, y, ldy, r0, 1, 4);
    else if (G == 1 && P == 8) hm_rows16_int4_amx8_gp(w, xb, T, y, ldy, r0, 1, 8);
    else if (G == 1) hm_rows16_int4_amx8_gp(w, xb, T, y, ldy, r0, 1, 16);
    else if (P == 8) hm_rows16_int4_amx8_gp(w, xb, T, y, ldy, r0, 4, 8);
    else hm_rows16_int4_amx8_gp(w, xb, T, y, ldy, r0, 4, 16);
}

#endif
