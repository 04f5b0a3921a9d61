/* FP8 at one token through AVX512-FP16 (included by gemv_amx.h, after hm_rows_fp8_t1 whose place
 * it takes where the CPU has AVX512-FP16).
 *
 * An e4m3 byte's seven magnitude bits, shifted to bits 7..13 of a word with the sign at bit 15, are
 * an fp16 whose value is exactly the e4m3 value times 2^-8: the exponent field's top bit stays
 * clear, the four exponent bits and three mantissa bits land in place, and e4m3's subnormals land
 * on fp16's, which the FP16 instructions compute with (they have no flush to zero). So the decode
 * is one arithmetic shift and one AND per 32 weights, with no test for zero exponents and no
 * table: for the odd bytes of a 64-byte chunk (the high halves of its words) the shift is of the
 * chunk as loaded; for the even bytes, of the chunk loaded one byte earlier, which puts them in
 * the high halves.
 *
 * Why: VDPBF16PS holds both vector ports for about 2.2 cycles on the machine measured (Sapphire
 * Rapids class), so the bf16 kernel spends 4.4 of its ~10 cycles per 64 weights on two of them;
 * VFMADDPH takes 0.7 on one. Measured with the data in L1, one thread: 7.4 cycles per 64 weights
 * against 10.7; from DRAM, one thread: 25.9 GB/s against 21.5.
 *
 * Precision: the products are summed in fp16, four to a lane (the two chunks of a 128-column scale
 * block, even and odd columns apart, then added), and the lane sums converted and scaled into fp32
 * per block. The activations go in from their fp32 values (not from xp's bf16) as fp16 times 2^k,
 * k chosen per call so that the largest is below 2^13: a lane's four products stay below
 * 4 x 1.75 x 2^13 = 57344, under fp16's 65504. Each activation is rounded to 11 bits (bf16: 8), and
 * a lane's two FMAs per chain and one add each round to 11 bits, so a block's lane is within about
 * 4 x 2^-11 = 2^-9 of the sum of its products' magnitudes, where the bf16 kernel's rounding of the
 * activations alone allows 2^-8. Against fp32 activations it errs about 4x less than the bf16
 * kernel (tests/test_kernels.py). A column tail (past the last full 64) is the scalar bf16 one. */
#ifndef HYBRIDMOE_GEMV_FP8_FP16_H
#define HYBRIDMOE_GEMV_FP8_FP16_H

/* GCC 12 and clang 14 first knew the FP16 intrinsics; an older compiler builds without this path. */
#if (defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12)
#define HM_HAVE_FP16 1
#else
#define HM_HAVE_FP16 0
#endif

static int hm_fp16_available = 0; /* AVX512-FP16 (and a compiler that knew it) */
static int hm_fp16_enabled = 0;   /* ... and FP8 at one token may use it (HYBRIDMOE_FP16=0, set_fp16) */

#if HM_HAVE_FP16
#define HM_FP16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16,avx512fp16")))
#define HM_FP16_XMAX_EXP 13 /* the activations are scaled below 2^13 */
static void hm_init_fp16(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 23))) return;
    hm_fp16_available = 1;
    hm_fp16_enabled = !hm_env_off("HYBRIDMOE_FP16");
}

static inline int hm_fp8_fp16_applies(const hm_weight *w, int T) { return hm_fp16_enabled && hm_fp8_t1_applies(w, T); }

/* Words of the activations: cols fp16, then (on a line of its own) the exponent k. */
static inline size_t hm_fp16_k_word(int64_t cols) { return ((size_t)cols / 2 + 15) / 16 * 16; }
static inline size_t hm_fp16_xs_words(int64_t cols) { return hm_fp16_k_word(cols) + 16; }

/* 32 fp32 -> 32 fp16 of the values times s (a power of two), rounded to nearest. */
HM_FP16 static inline __m512i hm_fp16x32(const float *x, __m512 s) {
    __m256i a = _mm256_castph_si256(_mm512_cvtxps_ph(_mm512_mul_ps(_mm512_loadu_ps(x), s)));
    __m256i b = _mm256_castph_si256(_mm512_cvtxps_ph(_mm512_mul_ps(_mm512_loadu_ps(x + 16), s)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

/* One token's fp32 activations -> xs: per full 64-column chunk the fp16 of its even columns, then
 * of its odd ones, times 2^k; k at word hm_fp16_k_word(cols). Made from the fp32 values, not from
 * their bf16 (xp): fp16 keeps 11 bits of each, bf16 8. */
HM_FP16 static void hm_build_xs_fp16(const float *x, int64_t cols, uint32_t *xb) {
    const int64_t full = cols / 64 * 64;
    __m512i mx = _mm512_setzero_si512(); /* the largest magnitude, compared as bits */
    for (int64_t c = 0; c < full; c += 16)
        mx = _mm512_max_epu32(mx, _mm512_and_si512(_mm512_loadu_si512(x + c), _mm512_set1_epi32(0x7fffffff)));
    const uint32_t m = (uint32_t)_mm512_reduce_max_epu32(mx);
    int k = 0;
    if (m != 0 && m < 0x7f800000u) { /* (infinities and NaNs go through unscaled, and stay what they are) */
        int e;
        float f;
        memcpy(&f, &m, 4);
        frexpf(f, &e); /* largest < 2^e */
        k = HM_FP16_XMAX_EXP - e;
        if (k > 120) k = 120; /* (2^(8 - k) must stay a normal float) */
    }
    const __m512 s = _mm512_set1_ps(ldexpf(1.f, k));
    /* (hm_pw_even / hm_pw_odd: a register pair's even words, and its odd ones) */
    const __m512i ie = _mm512_load_si512(hm_pw_even), io = _mm512_load_si512(hm_pw_odd);
    uint16_t *xs = (uint16_t *)xb;
    for (int64_t c = 0; c < full; c += 64) {
        __m512i a = hm_fp16x32(x + c, s), b = hm_fp16x32(x + c + 32, s);
        _mm512_store_si512(xs + c, _mm512_permutex2var_epi16(a, ie, b));
        _mm512_store_si512(xs + c + 32, _mm512_permutex2var_epi16(a, io, b));
    }
    ((int32_t *)xb)[hm_fp16_k_word(cols)] = k;
}

/* 32 weights from a word vector holding their e4m3 bytes in its high halves -> fp16, times 2^-8. */
HM_FP16 static inline __m512h hm_fp8_hi_fp16(__m512i v) {
    return _mm512_castsi512_ph(_mm512_and_si512(_mm512_srai_epi16(v, 1), _mm512_set1_epi16((short)0xBF80)));
}

/* FP8 rows [r0, r1) at one token (xs: hm_build_xs_fp16's layout). Rows are read one after the
 * other, one linear stream prefetched HM_PREFETCH ahead into L2, as hm_rows_fp8_t1. */
HM_FP16 static void hm_rows_fp8_t1_fp16(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, float *y,
                                        int64_t r0, int64_t r1) {
    const int64_t full = w->cols / 64 * 64, nbi = (w->cols + 127) / 128;
    const uint16_t *xs = (const uint16_t *)xb;
    const float back = ldexpf(1.f, 8 - ((const int32_t *)xb)[hm_fp16_k_word(w->cols)]);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->data + r * w->cols;
        const float *sc = (const float *)w->scale + (r / 128) * nbi;
        __m512 total = _mm512_setzero_ps();
        __m512h ae = _mm512_setzero_ph(), ao = ae;
        for (int64_t c = 0; c < full; c += 64) {
            _mm_prefetch((const char *)(row + c + HM_PREFETCH), HM_ROW_HINT);
            /* the byte before a row's first is not read (it may lie outside the weight) */
            __m512i even = c ? _mm512_loadu_si512(row + c - 1) : _mm512_maskz_loadu_epi8(~1ull, row - 1);
            ae = _mm512_fmadd_ph(hm_fp8_hi_fp16(even), _mm512_load_ph(xs + c), ae);
            ao = _mm512_fmadd_ph(hm_fp8_hi_fp16(_mm512_loadu_si512(row + c)), _mm512_load_ph(xs + c + 32), ao);
            if ((c & 127) == 64 || c + 64 == full) { /* end of a 128-column scale block */
                __m512i s = _mm512_castph_si512(_mm512_add_ph(ae, ao));
                __m512 lo = _mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_castsi512_si256(s)));
                __m512 hi = _mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_extracti64x4_epi64(s, 1)));
                total = _mm512_fmadd_ps(_mm512_add_ps(lo, hi), _mm512_set1_ps(sc[c / 128] * back), total);
                ae = ao = _mm512_setzero_ph();
            }
        }
        hm_store_row(w, r, full, xp, 0, 1, &total, y, 0);
    }
}

#else
static void hm_init_fp16(void) {}
static inline int hm_fp8_fp16_applies(const hm_weight *w, int T) { (void)w, (void)T; return 0; }
static inline size_t hm_fp16_xs_words(int64_t cols) { return (size_t)cols / 2; }
static void hm_build_xs_fp16(const float *x, int64_t cols, uint32_t *xb) { (void)x, (void)cols, (void)xb; }
static void hm_rows_fp8_t1_fp16(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, float *y, int64_t r0,
                                int64_t r1) { (void)w, (void)xp, (void)xb, (void)y, (void)r0, (void)r1; }
#endif /* HM_HAVE_FP16 */
#endif
