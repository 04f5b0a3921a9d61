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
 * VFMADDPH takes one port for one cycle.
 *
 * Scales folded into the activations. The 128x128 block scales are not applied per block of
 * products: for each 128-row block of a weight, the activations are multiplied by that row block's
 * column-block scales (and by 2^k, k chosen per row block so that the largest is below 2^11) and
 * rounded to fp16 once, in the kernel's column order (hm_fold_build). The products of 256 columns
 * (two scale blocks) then sum in fp16, eight to a lane, with no scale step between blocks, and are
 * folded to 16 lanes and converted to fp32 once per 256 columns. Per block, the scale step cost 8
 * of the vector ports' uops against the decode's and products' 12, on the two ports AVX-512 has:
 * measured with the data in L1, one thread, 5.2 against 7.0 cycles per 64 weights; from DRAM (the
 * loop alone over 1 GB of 2048 x 7168 copies, 2 threads) 0.87-0.90 against 0.73-0.81 of a plain
 * read of the same bytes. A kernel's speed in cache sets how much of the bandwidth it gets: a
 * loop that only loads the same bytes (2.4 cycles) read at 0.96-1.0, the old kernel at 0.8.
 * The folded activations are 2 bytes a column per 128 rows (1/64 of the weight's bytes); each
 * thread keeps those of the row blocks it is in (hm_fold_get: gate and up alternate, and the MoE
 * call's down projection goes through every active expert at one row block).
 *
 * Precision: an activation is rounded to fp16 (11 bits) once, scale included; a lane's product goes
 * through at most six more roundings (four chained FMAs, the sum of the even and odd chains, the fold
 * of 32 lanes to 16), so each output is within 7 x 2^-11 < 2^-8 of the sum of its products'
 * magnitudes; the lane sums stay below 16 x 1.75 x 2^11 = 57344, under fp16's 65504. The bf16
 * kernel's rounding of the activations alone allows 2^-8 (tests/test_kernels.py holds this one to
 * the 2^-8 bound against the fp32 activations). A column tail (past the last full 64) is the scalar
 * bf16 one. */
#ifndef HYBRIDMOE_GEMV_FP8_FP16_H
#define HYBRIDMOE_GEMV_FP8_FP16_H
#include <float.h>

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
static void hm_init_fp16(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 23))) return;
    hm_fp16_available = 1;
    hm_fp16_enabled = !hm_env_off("HYBRIDMOE_FP16");
}

static inline int hm_fp8_fp16_applies(const hm_weight *w, int T) { return hm_fp16_enabled && hm_fp8_t1_applies(w, T); }

/* The activations' layout (the call's xb): cols fp32 (padded to 16), then per 128-column block
 * the largest magnitude over its full 64-column chunks, then a generation number (64 bits), so
 * that the folds made from one call's activations are never taken for another's. */
static inline size_t hm_fp16_max_word(int64_t cols) { return ((size_t)cols + 15) / 16 * 16; }
static inline size_t hm_fp16_gen_word(int64_t cols) {
    return hm_fp16_max_word(cols) + ((size_t)(cols + 127) / 128 + 15) / 16 * 16;
}
static inline size_t hm_fp16_xs_words(int64_t cols) { return hm_fp16_gen_word(cols) + 16; }
static uint64_t hm_fp16_gen = 0;

HM_FP16 static void hm_build_xs_fp16(const float *x, int64_t cols, uint32_t *xb) {
    float *xf = (float *)xb, *mx = xf + hm_fp16_max_word(cols);
    const int64_t full = cols / 64 * 64;
    memcpy(xf, x, sizeof(float) * (size_t)cols);
    for (int64_t b = 0; b < (cols + 127) / 128; b++) { /* magnitudes compared as bits: a NaN is the largest */
        __m512i m = _mm512_setzero_si512();
        for (int64_t c = b * 128; c < (b + 1) * 128 && c < full; c += 16)
            m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_loadu_si512(x + c), _mm512_set1_epi32(0x7fffffff)));
        const uint32_t bits = (uint32_t)_mm512_reduce_max_epu32(m);
        memcpy(mx + b, &bits, 4);
    }
    const uint64_t gen = __atomic_add_fetch(&hm_fp16_gen, 1, __ATOMIC_RELAXED);
    memcpy(xb + hm_fp16_gen_word(cols), &gen, sizeof gen);
}

/* 32 fp32 -> 32 fp16 of the values times s, rounded to nearest. */
HM_FP16 static inline __m512i hm_fp16x32(const float *x, __m512 s) {
    __m256i a = _mm256_castph_si256(_mm512_cvtxps_ph(_mm512_mul_ps(_mm512_loadu_ps(x), s)));
    __m256i b = _mm256_castph_si256(_mm512_cvtxps_ph(_mm512_mul_ps(_mm512_loadu_ps(x + 16), s)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

/* One row block's folded activations: fp16 of x times the block scales times 2^k, per full
 * 64-column chunk its even columns then its odd ones; back = 2^(8 - k) undoes 2^k and the
 * decode's 2^-8. */
typedef struct {
    const float *sc;      /* the row block's scales (NULL: empty slot) */
    uint64_t gen;         /* the generation of the activations' layout (one per layout built) */
    float back;
    uint16_t *x;
} hm_fold;
#define HM_FOLD_SLOTS 16 /* a MoE call's down projection goes through every active expert at a row block */
static __thread hm_fold hm_folds[HM_FOLD_SLOTS];
static __thread uint16_t *hm_fold_mem;
static __thread size_t hm_fold_cols; /* columns each slot has room for */
static __thread int hm_fold_next;

HM_FP16 static void hm_fold_build(const hm_weight *w, const float *sc, const uint32_t *xb, hm_fold *f) {
    const int64_t full = w->cols / 64 * 64, nbi = (w->cols + 127) / 128;
    const float *x = (const float *)xb, *mx = x + hm_fp16_max_word(w->cols);
    float m = 0.f;
    for (int64_t b = 0; b < nbi; b++) {
        const float v = mx[b] * fabsf(sc[b]);
        if (!(v <= m)) m = v;
    }
    int k = 0;
    if (m > 0.f && isfinite(m)) { /* (infinities and NaNs go through unscaled, and stay what they are) */
        int e;
        frexpf(m, &e); /* m < 2^e */
        k = 11 - e;
        if (k > 120) k = 120; /* (2^(8 - k) must stay a normal float) */
    }
    const __m512i ie = _mm512_load_si512(hm_pw_even), io = _mm512_load_si512(hm_pw_odd);
    const float p2k = ldexpf(1.f, k); /* (a normal float: |k| < 127) */
    for (int64_t c = 0; c < full; c += 64) {
        float fs = sc[c / 128] * p2k;
        if (isinf(fs) && !isinf(sc[c / 128])) fs = copysignf(FLT_MAX, fs); /* (only where every x is tiny) */
        const __m512 s = _mm512_set1_ps(fs);
        __m512i a = hm_fp16x32(x + c, s), b = hm_fp16x32(x + c + 32, s);
        _mm512_store_si512(f->x + c, _mm512_permutex2var_epi16(a, ie, b));
        _mm512_store_si512(f->x + c + 32, _mm512_permutex2var_epi16(a, io, b));
    }
    f->back = ldexpf(1.f, 8 - k);
}

/* This thread's fold of w's row block rb for the activations in xb, made if it has none (NULL if
 * memory ran out). */
HM_FP16 static const hm_fold *hm_fold_get(const hm_weight *w, int64_t rb, const uint32_t *xb) {
    const float *sc = (const float *)w->scale + rb * ((w->cols + 127) / 128);
    uint64_t gen;
    memcpy(&gen, xb + hm_fp16_gen_word(w->cols), sizeof gen);
    for (int i = 0; i < HM_FOLD_SLOTS; i++)
        if (hm_folds[i].sc == sc && hm_folds[i].gen == gen) return &hm_folds[i];
    const size_t need = (size_t)(w->cols / 64 * 64);
    if (need > hm_fold_cols) {
        free(hm_fold_mem);
        hm_fold_mem = aligned_alloc(64, sizeof(uint16_t) * need * HM_FOLD_SLOTS); /* (a multiple of 128 bytes) */
        hm_fold_cols = hm_fold_mem ? need : 0;
        for (int i = 0; i < HM_FOLD_SLOTS; i++) hm_folds[i].sc = NULL, hm_folds[i].x = hm_fold_mem + need * i;
        if (!hm_fold_mem) return NULL;
    }
    hm_fold *f = &hm_folds[hm_fold_next];
    hm_fold_next = (hm_fold_next + 1) % HM_FOLD_SLOTS;
    hm_fold_build(w, sc, xb, f);
    f->sc = sc, f->gen = gen;
    return f;
}

/* 32 weights from a word vector holding their e4m3 bytes in its high halves -> fp16, times 2^-8. */
HM_FP16 static inline __m512h hm_fp8_hi_fp16(__m512i v) {
    return _mm512_castsi512_ph(_mm512_and_si512(_mm512_srai_epi16(v, 1), _mm512_set1_epi16((short)0xBF80)));
}

/* The 64 weights at row + c against the folded activations xs + c, into the even and odd sums. The
 * even bytes are read one byte early, which puts them in the high halves (the byte before a
 * row's first is not read: it may lie outside the weight). */
HM_FP16 static inline __attribute__((always_inline)) void hm_fp8_fp16_step(const uint8_t *row, int64_t c,
                                                                          const uint16_t *xs, __m512h *ae,
                                                                          __m512h *ao) {
    HM_PREFETCH_TWICE(row + c);
    __m512i even = c ? _mm512_loadu_si512(row + c - 1) : _mm512_maskz_loadu_epi8(~1ull, row - 1);
    *ae = _mm512_fmadd_ph(hm_fp8_hi_fp16(even), _mm512_load_ph(xs + c), *ae);
    *ao = _mm512_fmadd_ph(hm_fp8_hi_fp16(_mm512_loadu_si512(row + c)), _mm512_load_ph(xs + c + 32), *ao);
}

/* The even and odd sums (32 fp16 lanes each) folded to 16 lanes, in fp32. */
HM_FP16 static inline __m512 hm_fp16_sums(__m512h ae, __m512h ao) {
    __m512i s = _mm512_castph_si512(_mm512_add_ph(ae, ao));
    return _mm512_cvtxph_ps(_mm256_add_ph(_mm256_castsi256_ph(_mm512_castsi512_si256(s)),
                                          _mm256_castsi256_ph(_mm512_extracti64x4_epi64(s, 1))));
}

/* FP8 rows [r0, r1) at one token (xb: hm_build_xs_fp16's layout). Rows are read one after the
 * other, one linear stream prefetched into L2 twice, HM_PREFETCH and HM_PREFETCH_NEAR ahead
 * (HM_PREFETCH_TWICE; hm_rows_fp8_t1 asks once). */
HM_FP16 static void hm_rows_fp8_t1_fp16(const hm_weight *w, const uint16_t *xp, const uint32_t *xb, float *y,
                                        int64_t r0, int64_t r1) {
    const int64_t full = w->cols / 64 * 64, full4 = w->cols / 256 * 256;
    const hm_fold *f = NULL;
    for (int64_t r = r0; r < r1; r++) {
        if (!f || r % 128 == 0) f = hm_fold_get(w, r / 128, xb);
        if (!f) { /* (out of memory) */
            hm_row_fp8(w, r, xp, 1, y, 0);
            continue;
        }
        const uint8_t *row = w->data + r * w->cols;
        const uint16_t *xs = f->x;
        __m512 total = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c < full4; c += 256) {
            __m512h ae = _mm512_setzero_ph(), ao = ae;
            hm_fp8_fp16_step(row, c, xs, &ae, &ao);
            hm_fp8_fp16_step(row, c + 64, xs, &ae, &ao);
            hm_fp8_fp16_step(row, c + 128, xs, &ae, &ao);
            hm_fp8_fp16_step(row, c + 192, xs, &ae, &ao);
            total = _mm512_add_ps(total, hm_fp16_sums(ae, ao));
        }
        if (c < full) {
            __m512h ae = _mm512_setzero_ph(), ao = ae;
            for (; c < full; c += 64) hm_fp8_fp16_step(row, c, xs, &ae, &ao);
            total = _mm512_add_ps(total, hm_fp16_sums(ae, ao));
        }
        total = _mm512_mul_ps(total, _mm512_set1_ps(f->back));
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
