/* The two instantiations of gemv_f32simd.h: AVX-512F (16 fp32 lanes, AVX-512 Foundation
 * instructions only) and AVX2 + FMA (8 lanes). Each section maps the body's primitives onto its
 * intrinsics, includes the body, and unmaps them. Target attributes let the build run anywhere
 * with no special flags. */
#ifndef HYBRIDMOE_GEMV_F32SIMD_VARIANTS_H
#define HYBRIDMOE_GEMV_F32SIMD_VARIANTS_H

#if defined(__x86_64__)
#include <immintrin.h>
#include "gemv_generic.h"
#ifndef HM_PREFETCH
#define HM_PREFETCH 4096
#endif

/* ---- AVX-512F ---------------------------------------------------------------------------- */
#define HM_TGT __attribute__((target("avx512f")))

HM_TGT static inline __m512i hm_load_u8_avx512f(const uint8_t *p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
}
HM_TGT static inline __m512i hm_load_u16_avx512f(const uint16_t *p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
}
/* e4m3 exponent 0: f = (1 + m/8) 2^-7 was built, the value is (m/8) 2^-6 = 2f - 2^-6 */
HM_TGT static inline __m512 hm_fix_subnormal_avx512f(__m512 f, __m512i b) {
    __mmask16 sub = _mm512_testn_epi32_mask(b, _mm512_set1_epi32(0x78));
    return _mm512_mask_fmsub_ps(f, sub, _mm512_set1_ps(2.f), _mm512_set1_ps(0.015625f));
}

#define HM_SFX(name) name##_avx512f
#define HM_VW 16
#define HM_TBV 8
#define hm_v __m512
#define hm_vi __m512i
#define hm_v_zero _mm512_setzero_ps
#define hm_v_set1 _mm512_set1_ps
#define hm_v_loadu _mm512_loadu_ps
#define hm_v_fmadd _mm512_fmadd_ps
#define hm_v_reduce _mm512_reduce_add_ps
#define hm_vi_set1 _mm512_set1_epi32
#define hm_vi_load_u8 hm_load_u8_avx512f
#define hm_vi_load_u16 hm_load_u16_avx512f
#define hm_vi_and _mm512_and_si512
#define hm_vi_or _mm512_or_si512
#define hm_vi_add _mm512_add_epi32
#define hm_vi_sub _mm512_sub_epi32
#define hm_vi_slli _mm512_slli_epi32
#define hm_vi_srli _mm512_srli_epi32
#define hm_vi_as_v _mm512_castsi512_ps
#define hm_v_as_vi _mm512_castps_si512
#define hm_vi_to_v _mm512_cvtepi32_ps
#define hm_v_fix_subnormal hm_fix_subnormal_avx512f
#include "gemv_f32simd.h"
#include "gemv_f32simd_unmap.h"

/* ---- AVX2 + FMA -------------------------------------------------------------------------- */
#define HM_TGT __attribute__((target("avx2,fma")))

HM_TGT static inline float hm_reduce_avx2(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
HM_TGT static inline __m256i hm_load_u8_avx2(const uint8_t *p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}
HM_TGT static inline __m256i hm_load_u16_avx2(const uint16_t *p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
}
HM_TGT static inline __m256 hm_fix_subnormal_avx2(__m256 f, __m256i b) {
    __m256i sub = _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x78)), _mm256_setzero_si256());
    __m256 fixed = _mm256_fmsub_ps(f, _mm256_set1_ps(2.f), _mm256_set1_ps(0.015625f));
    return _mm256_blendv_ps(f, fixed, _mm256_castsi256_ps(sub));
}

#define HM_SFX(name) name##_avx2
#define HM_VW 8
#define HM_TBV 4 /* 16 ymm registers: 2 x 4 sums plus the decode temporaries */
#define hm_v __m256
#define hm_vi __m256i
#define hm_v_zero _mm256_setzero_ps
#define hm_v_set1 _mm256_set1_ps
#define hm_v_loadu _mm256_loadu_ps
#define hm_v_fmadd _mm256_fmadd_ps
#define hm_v_reduce hm_reduce_avx2
#define hm_vi_set1 _mm256_set1_epi32
#define hm_vi_load_u8 hm_load_u8_avx2
#define hm_vi_load_u16 hm_load_u16_avx2
#define hm_vi_and _mm256_and_si256
#define hm_vi_or _mm256_or_si256
#define hm_vi_add _mm256_add_epi32
#define hm_vi_sub _mm256_sub_epi32
#define hm_vi_slli _mm256_slli_epi32
#define hm_vi_srli _mm256_srli_epi32
#define hm_vi_as_v _mm256_castsi256_ps
#define hm_v_as_vi _mm256_castps_si256
#define hm_vi_to_v _mm256_cvtepi32_ps
#define hm_v_fix_subnormal hm_fix_subnormal_avx2
#include "gemv_f32simd.h"
#include "gemv_f32simd_unmap.h"

#endif /* __x86_64__ */
#endif
