/* Portable C kernels: y[t][r] = sum_c W[r][c] * x[t][c] over a range of rows, for every format.
 *
 * Weights are read once per call whatever the number of tokens: each row is decoded in chunks
 * and every token's dot product is advanced from the same decoded chunk. Activations come in
 * prepared by hm_prepare_x_generic: fp32, rounded to bf16 so that every variant computes the
 * same products (the AVX-512 variant multiplies bf16 x bf16). */
#ifndef HYBRIDMOE_GEMV_GENERIC_H
#define HYBRIDMOE_GEMV_GENERIC_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

enum { HM_DENSE_BF16 = 0, HM_FP8_B128 = 1, HM_INT4 = 2 };
#define HM_MAX_TOKENS 64
#define HM_CHUNK 128 /* columns decoded at a time */

/* Whether the environment switches a kernel path off: the variable is set and starts with '0'
 * (HYBRIDMOE_AMX=0 and the like; read once, at import). */
static inline int hm_env_off(const char *name) {
    const char *v = getenv(name);
    return v && v[0] == '0';
}

/* AMX (see gemv_avx512.h), declared here so that every build has the switches. */
static int hm_amx_available = 0; /* the CPU has AMX-BF16 and the OS let this process use it */
static int hm_amx_enabled = 0;   /* ... and it is not switched off (HYBRIDMOE_AMX=0, or set_amx) */

typedef struct {
    int fmt;          /* HM_DENSE_BF16, HM_FP8_B128, HM_INT4 */
    int group;        /* INT4 group size (32 or 128) */
    int64_t rows, cols; /* logical [out, in] */
    const uint8_t *data;  /* bf16 [out][in] | e4m3 [out][in] | int4 [out][in/2] */
    const void *scale;    /* fp8: float [ceil(out/128)][ceil(in/128)]; int4: bf16 [out][in/group] */
} hm_weight;

/* Bytes of one stored row of w. */
static inline int64_t hm_row_bytes(const hm_weight *w) {
    return w->fmt == HM_DENSE_BF16 ? 2 * w->cols : w->fmt == HM_FP8_B128 ? w->cols : w->cols / 2;
}

static inline float hm_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t hm_f32_to_bf16(float f) { /* round to nearest even; NaN kept NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float hm_e4m3_to_f32(uint8_t b) {
    int e = (b >> 3) & 0xf, m = b & 7;
    float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
    return (b & 0x80) ? -v : v;
}

static float hm_fp8_lut[256];
static int hm_fp8_lut_ready = 0;

static void hm_init_generic(void) {
    if (hm_fp8_lut_ready) return;
    for (int i = 0; i < 256; i++) hm_fp8_lut[i] = hm_e4m3_to_f32((uint8_t)i);
    hm_fp8_lut_ready = 1;
}

/* x [T][in] fp32 -> xp [T][in] fp32 rounded to bf16 precision. */
static void hm_prepare_x_generic(const float *x, int T, int64_t in, float *xp) {
    for (int64_t i = 0; i < (int64_t)T * in; i++) xp[i] = hm_bf16_to_f32(hm_f32_to_bf16(x[i]));
}

static inline void hm_decode_chunk(const hm_weight *w, int64_t r, int64_t c0, int n, float *dst) {
    if (w->fmt == HM_DENSE_BF16) {
        const uint16_t *row = (const uint16_t *)w->data + r * w->cols;
        for (int j = 0; j < n; j++) dst[j] = hm_bf16_to_f32(row[c0 + j]);
    } else if (w->fmt == HM_FP8_B128) {
        const uint8_t *row = w->data + r * w->cols;
        const float *sc = (const float *)w->scale;
        int64_t nbi = (w->cols + 127) / 128;
        for (int j = 0; j < n; j++) {
            int64_t c = c0 + j;
            dst[j] = hm_fp8_lut[row[c]] * sc[(r / 128) * nbi + c / 128];
        }
    } else {
        const uint8_t *row = w->data + r * (w->cols / 2);
        const uint16_t *sc = (const uint16_t *)w->scale + r * (w->cols / w->group);
        for (int j = 0; j < n; j++) {
            int64_t c = c0 + j;
            uint8_t byte = row[c >> 1];
            int q = ((c & 1) ? (byte >> 4) : (byte & 0xf)) - 8;
            dst[j] = (float)q * hm_bf16_to_f32(sc[c / w->group]);
        }
    }
}

/* Before every loop over an array of vector registers (a kernel's sums, its lane tables): GCC
 * keeps such an array in registers only where each of those loops is unrolled before its
 * scalarization pass runs, and where the array's address is not taken (a function is handed a
 * copy: hm_amx_store_regs); otherwise each step also stores every sum to the stack and loads its
 * tables back (16 extra 64-byte stores a block in the INT4 AMX kernels). */
#define HM_UNROLL _Pragma("GCC unroll 16")

/* Calls FN(w, r, xp, t0, nt, y, ldy) for each block of up to TBMAX (<= 8) tokens of T, with nt a
 * compile-time constant so that the SIMD kernels keep their sums in registers. Cases above TBMAX
 * are never taken; their nt is clamped only to stay in bounds. */
#define HM_TB_CLAMP(n, TBMAX) ((n) < (TBMAX) ? (n) : (TBMAX))
#define HM_TOKEN_BLOCKS(FN, TBMAX)                                                   \
    for (int t0 = 0; t0 < T; t0 += (TBMAX)) {                                        \
        switch (T - t0 < (TBMAX) ? T - t0 : (TBMAX)) {                               \
        case 1: FN(w, r, xp, t0, 1, y, ldy); break;                                  \
        case 2: FN(w, r, xp, t0, HM_TB_CLAMP(2, TBMAX), y, ldy); break;              \
        case 3: FN(w, r, xp, t0, HM_TB_CLAMP(3, TBMAX), y, ldy); break;              \
        case 4: FN(w, r, xp, t0, HM_TB_CLAMP(4, TBMAX), y, ldy); break;              \
        case 5: FN(w, r, xp, t0, HM_TB_CLAMP(5, TBMAX), y, ldy); break;              \
        case 6: FN(w, r, xp, t0, HM_TB_CLAMP(6, TBMAX), y, ldy); break;              \
        case 7: FN(w, r, xp, t0, HM_TB_CLAMP(7, TBMAX), y, ldy); break;              \
        default: FN(w, r, xp, t0, (TBMAX), y, ldy); break;                           \
        }                                                                            \
    }

/* Rows [r0, r1) of an FP8 weight dequantized to bf16 (fp32 product of value and block scale,
 * rounded to nearest even, as shared.quant.dequantize does): a table lookup per element. */
static void hm_dequant_fp8_rows(const hm_weight *w, uint16_t *out, int64_t r0, int64_t r1) {
    const float *sc = (const float *)w->scale;
    const int64_t nbi = (w->cols + 127) / 128;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->data + r * w->cols;
        uint16_t *o = out + r * w->cols;
        for (int64_t c0 = 0; c0 < w->cols; c0 += 128) {
            const float s = sc[(r / 128) * nbi + c0 / 128];
            const int64_t c1 = c0 + 128 < w->cols ? c0 + 128 : w->cols;
            for (int64_t c = c0; c < c1; c++) o[c] = hm_f32_to_bf16(hm_fp8_lut[row[c]] * s);
        }
    }
}

/* Rows [r0, r1) of y = W x for T tokens; x prepared, y [T][out] fp32 (row r of token t at
 * y[t * ldy + r]). */
static void hm_gemv_rows_generic(const hm_weight *w, const float *xp, int T, float *y, int64_t ldy,
                                 int64_t r0, int64_t r1) {
    float chunk[HM_CHUNK];
    for (int64_t r = r0; r < r1; r++) {
        double acc[HM_MAX_TOKENS] = {0};
        for (int64_t c0 = 0; c0 < w->cols; c0 += HM_CHUNK) {
            int n = (int)((w->cols - c0) < HM_CHUNK ? (w->cols - c0) : HM_CHUNK);
            hm_decode_chunk(w, r, c0, n, chunk);
            for (int t = 0; t < T; t++) {
                const float *xt = xp + (int64_t)t * w->cols + c0;
                float s = 0.f;
                for (int j = 0; j < n; j++) s += chunk[j] * xt[j];
                acc[t] += s;
            }
        }
        for (int t = 0; t < T; t++) y[t * ldy + r] = (float)acc[t];
    }
}

#endif
