/* One build of the kernel headers for probe.c. probe.sh compiles this file once per header
 * directory, naming its entry points with PROBE_TAG (a or b), so that two versions of the kernels
 * link into one program and can be timed side by side in one process. */
#include "moe.h"

#define PROBE_CAT2(p, t) p##t
#define PROBE_CAT(p, t) PROBE_CAT2(p, t)

/* The kernel variant the extension would pick here first: AVX-512 BF16 where the CPU has it. */
static int probe_variant(void) {
    static int v = -1;
    if (v < 0) {
        hm_init();
        v = hm_cpu_avx512bf16() && hm_cpu_avx512bw() && hm_cpu_avx512vbmi() ? HM_AVX512_BF16
            : hm_cpu_avx512f()                                             ? HM_AVX512F
            : hm_cpu_avx2()                                                ? HM_AVX2
                                                                           : HM_GENERIC;
    }
    return v;
}

/* The threaded GEMV, as the Python API calls it. */
int PROBE_CAT(probe_gemv_, PROBE_TAG)(const hm_weight *w, const float *x, int T, float *y, void *xp, int nthreads) {
    return hm_gemv_multi(probe_variant(), w, 1, x, T, y, xp, nthreads);
}

/* One thread's pass over rows [0, rows) with the activations prepared once: the kernel alone. */
int PROBE_CAT(probe_rows_, PROBE_TAG)(const hm_weight *w, const float *x, int T, float *y, int reps) {
    const int v = probe_variant();
    void *xp = hm_alloc64((size_t)T * (size_t)w->cols * 4);
    const size_t xbb = hm_kernel_xb_bytes(v, w, T);
    uint32_t *xb = xbb ? hm_alloc64(xbb) : NULL;
    if (!xp || (xbb && !xb)) return -1;
    hm_prepare_x(v, w->fmt, x, T, w->cols, xp);
    if (xb) hm_build_kernel_xb_in(w, xp, x, T, xb);
    for (int i = 0; i < reps; i++) hm_gemv_rows(v, w, xp, xb, T, y, w->rows, 0, w->rows);
    hm_gemv_thread_done();
    free(xp), free(xb);
    return 0;
}

/* The benchmarks' plain read (hm_read_sum) of n bytes. */
uint64_t PROBE_CAT(probe_read_, PROBE_TAG)(const void *p, int64_t n, int nthreads) {
    return hm_read_sum((const uint64_t *)p, n / 8 * 8, nthreads);
}
