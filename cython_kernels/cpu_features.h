/* CPU features that select a kernel variant at run time. __builtin_cpu_supports reads CPUID and
 * also checks, through XGETBV, that the OS saves the AVX/AVX-512 register state. */
#ifndef HYBRIDMOE_CPU_FEATURES_H
#define HYBRIDMOE_CPU_FEATURES_H

#if defined(__x86_64__) || defined(__i386__)
static inline int hm_cpu_avx2(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
static inline int hm_cpu_avx512f(void) { return __builtin_cpu_supports("avx512f"); }
static inline int hm_cpu_avx512bw(void) { return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"); }
static inline int hm_cpu_avx512bf16(void) { return __builtin_cpu_supports("avx512bf16"); }
static inline int hm_cpu_avx512vnni(void) { return __builtin_cpu_supports("avx512vnni"); }
static inline int hm_cpu_avx512vbmi(void) { return __builtin_cpu_supports("avx512vbmi"); }
#else
static inline int hm_cpu_avx2(void) { return 0; }
static inline int hm_cpu_avx512f(void) { return 0; }
static inline int hm_cpu_avx512bw(void) { return 0; }
static inline int hm_cpu_avx512bf16(void) { return 0; }
static inline int hm_cpu_avx512vnni(void) { return 0; }
static inline int hm_cpu_avx512vbmi(void) { return 0; }
#endif
#endif
