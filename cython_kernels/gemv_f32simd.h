/* FP32-FMA kernels for CPUs without AVX-512 BF16: one body, instantiated twice by moe.h through
 * gemv_f32simd_variants.h, as AVX-512F (16 lanes) and AVX2 + FMA (8 lanes).
 *
 * The includer defines, before each inclusion:
 *   HM_SFX(name)   the variant's suffix pasted onto every function name
 *   HM_TGT         the target attribute
 *   HM_VW          lanes per vector; HM_TBV tokens whose sums stay in registers
 *   hm_v, hm_vi    the float and integer vector types, and the primitives below
 *
 * Weights become fp32 in registers and meet the activations (fp32, rounded to bf16 like every
 * variant's, so that all variants compute the same products) in one FMA per token.
 *  - FP8 e4m3: the 7 magnitude bits shifted into an fp32 exponent/mantissa and the exponent
 *    re-biased by an integer add (no multiply by 2^120, so no subnormal fp32 is ever formed and
 *    the result does not depend on the DAZ/FTZ bits of MXCSR); e4m3 subnormals (exponent 0) are
 *    fixed with one masked/blended 2f - 2^-6; then the sign bit is OR-ed in.
 *  - INT4: each byte's nibbles give an even and an odd column: (q & 15) - 8 and (q >> 4) - 8,
 *    converted to fp32; activations are laid out per chunk of 2 * HM_VW columns as evens then odds.
 *  - BF16: widened to 32 bits and shifted into place. */

/* 8/16 e4m3 bytes (one per 32-bit lane) -> fp32 */
HM_TGT static inline hm_v HM_SFX(hm_fp8_f32)(hm_vi b) {
    hm_vi mag = hm_vi_add(hm_vi_slli(hm_vi_and(b, hm_vi_set1(0x7f)), 20), hm_vi_set1(120 << 23));
    hm_v f = hm_v_fix_subnormal(hm_vi_as_v(mag), b);
    return hm_vi_as_v(hm_vi_or(hm_v_as_vi(f), hm_vi_and(hm_vi_slli(b, 24), hm_vi_set1((int)0x80000000u))));
}

/* x [T][in] fp32 -> xp [T][in] fp32 rounded to bf16; INT4 chunks in even-then-odd order. */
static void HM_SFX(hm_prepare_x)(int fmt, const float *x, int T, int64_t in, float *xp) {
    const int ch = 2 * HM_VW;
    for (int t = 0; t < T; t++) {
        const float *xt = x + (int64_t)t * in;
        float *dt = xp + (int64_t)t * in;
        int64_t c = 0;
        if (fmt == HM_INT4)
            for (; c + ch <= in; c += ch)
                for (int p = 0; p < HM_VW; p++) {
                    dt[c + p] = hm_bf16_to_f32(hm_f32_to_bf16(xt[c + 2 * p]));
                    dt[c + HM_VW + p] = hm_bf16_to_f32(hm_f32_to_bf16(xt[c + 2 * p + 1]));
                }
        for (; c < in; c++) dt[c] = hm_bf16_to_f32(hm_f32_to_bf16(xt[c]));
    }
}

/* Scalar tail [c0, cols) of row r against token t's prepared activations (natural order there). */
static inline float HM_SFX(hm_tail)(const hm_weight *w, int64_t r, int64_t c0, const float *xt) {
    float chunk[HM_CHUNK], s = 0.f;
    for (int64_t c = c0; c < w->cols; c += HM_CHUNK) {
        int n = (int)((w->cols - c) < HM_CHUNK ? (w->cols - c) : HM_CHUNK);
        hm_decode_chunk(w, r, c, n, chunk);
        for (int j = 0; j < n; j++) s += chunk[j] * xt[c + j];
    }
    return s;
}

HM_TGT static inline __attribute__((always_inline)) void HM_SFX(hm_store_row)(
        const hm_weight *w, int64_t r, int64_t full, const float *xp, int t0, const int nt,
        const hm_v *total, float *y, int64_t ldy) {
    for (int t = 0; t < nt; t++) {
        float tail = full < w->cols ? HM_SFX(hm_tail)(w, r, full, xp + (int64_t)(t0 + t) * w->cols) : 0.f;
        y[(t0 + t) * ldy + r] = hm_v_reduce(total[t]) + tail;
    }
}

HM_TGT static inline __attribute__((always_inline)) void HM_SFX(hm_row_fp8_nt)(
        const hm_weight *w, int64_t r, const float *xp, int t0, const int nt, float *y, int64_t ldy) {
    const uint8_t *row = w->data + r * w->cols;
    const float *sc = (const float *)w->scale + (r / 128) * ((w->cols + 127) / 128);
    const int64_t full = w->cols / HM_VW * HM_VW;
    hm_v total[HM_TBV], acc[HM_TBV];
    for (int t = 0; t < nt; t++) total[t] = acc[t] = hm_v_zero();
    for (int64_t c = 0; c < full; c += HM_VW) {
        if ((c & 63) == 0) _mm_prefetch((const char *)(row + c + HM_PREFETCH), HM_ROW_HINT);
        hm_v wv = HM_SFX(hm_fp8_f32)(hm_vi_load_u8(row + c));
        for (int t = 0; t < nt; t++) acc[t] = hm_v_fmadd(wv, hm_v_loadu(xp + (int64_t)(t0 + t) * w->cols + c), acc[t]);
        if (((c + HM_VW) & 127) == 0 || c + HM_VW == full) { /* end of a 128-column scale block */
            hm_v s = hm_v_set1(sc[c / 128]);
            for (int t = 0; t < nt; t++) { total[t] = hm_v_fmadd(acc[t], s, total[t]); acc[t] = hm_v_zero(); }
        }
    }
    HM_SFX(hm_store_row)(w, r, full, xp, t0, nt, total, y, ldy);
}

HM_TGT static inline __attribute__((always_inline)) void HM_SFX(hm_row_int4_nt)(
        const hm_weight *w, int64_t r, const float *xp, int t0, const int nt, float *y, int64_t ldy) {
    const uint8_t *row = w->data + r * (w->cols / 2);
    const uint16_t *sc = (const uint16_t *)w->scale + r * (w->cols / w->group);
    const hm_vi nib = hm_vi_set1(0x0f), eight = hm_vi_set1(8);
    hm_v total[HM_TBV], acc[HM_TBV];
    for (int t = 0; t < nt; t++) total[t] = acc[t] = hm_v_zero();
    /* cols is a multiple of the group (32 or 128), hence of the 2 * HM_VW columns of a step */
    for (int64_t c = 0; c < w->cols; c += 2 * HM_VW) {
        if ((c & 127) == 0) _mm_prefetch((const char *)(row + c / 2 + HM_PREFETCH), HM_ROW_HINT);
        hm_vi b = hm_vi_load_u8(row + c / 2);
        hm_v we = hm_vi_to_v(hm_vi_sub(hm_vi_and(b, nib), eight));
        hm_v wo = hm_vi_to_v(hm_vi_sub(hm_vi_srli(b, 4), eight));
        for (int t = 0; t < nt; t++) {
            const float *xt = xp + (int64_t)(t0 + t) * w->cols + c;
            acc[t] = hm_v_fmadd(wo, hm_v_loadu(xt + HM_VW), hm_v_fmadd(we, hm_v_loadu(xt), acc[t]));
        }
        if (((c + 2 * HM_VW) & (w->group - 1)) == 0) { /* group is 32 or 128 */
            hm_v s = hm_v_set1(hm_bf16_to_f32(sc[c / w->group]));
            for (int t = 0; t < nt; t++) { total[t] = hm_v_fmadd(acc[t], s, total[t]); acc[t] = hm_v_zero(); }
        }
    }
    HM_SFX(hm_store_row)(w, r, w->cols, xp, t0, nt, total, y, ldy);
}

HM_TGT static inline __attribute__((always_inline)) void HM_SFX(hm_row_bf16_nt)(
        const hm_weight *w, int64_t r, const float *xp, int t0, const int nt, float *y, int64_t ldy) {
    const uint16_t *row = (const uint16_t *)w->data + r * w->cols;
    const int64_t full = w->cols / HM_VW * HM_VW;
    hm_v total[HM_TBV];
    for (int t = 0; t < nt; t++) total[t] = hm_v_zero();
    for (int64_t c = 0; c < full; c += HM_VW) {
        if ((c & 31) == 0) _mm_prefetch((const char *)(row + c) + HM_PREFETCH, HM_ROW_HINT);
        hm_v wv = hm_vi_as_v(hm_vi_slli(hm_vi_load_u16(row + c), 16));
        for (int t = 0; t < nt; t++) total[t] = hm_v_fmadd(wv, hm_v_loadu(xp + (int64_t)(t0 + t) * w->cols + c), total[t]);
    }
    HM_SFX(hm_store_row)(w, r, full, xp, t0, nt, total, y, ldy);
}

HM_TGT static void HM_SFX(hm_gemv_rows)(const hm_weight *w, const float *xp, int T, float *y, int64_t ldy,
                                       int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        if (w->fmt == HM_FP8_B128) { HM_TOKEN_BLOCKS(HM_SFX(hm_row_fp8_nt), HM_TBV) }
        else if (w->fmt == HM_INT4) { HM_TOKEN_BLOCKS(HM_SFX(hm_row_int4_nt), HM_TBV) }
        else { HM_TOKEN_BLOCKS(HM_SFX(hm_row_bf16_nt), HM_TBV) }
    }
}

