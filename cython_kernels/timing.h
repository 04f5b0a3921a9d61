/* The kernel benchmark's timing loops (cython_kernels/bench.py), in C so that no Python runs
 * between calls. Timed through the bound Python API, a one-token 2048 x 7168 FP8 GEMV took 4-7 %
 * longer than the same calls in a loop here (518 against 486-497 us, one process, the same
 * weights): the interpreter's and torch's per-call work, slow right after a call has streamed
 * megabytes through the caches. The benchmark reports that call's time too (api_us). */
#ifndef HYBRIDMOE_TIMING_H
#define HYBRIDMOE_TIMING_H

#include <time.h>

#include "moe.h"

static double hm_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Seconds per call of hm_gemv_multi on one weight at a time, ws[0], ws[1], ... in turn (copies of
 * one problem at other addresses, so that each call reads from DRAM), whole rounds until
 * min_seconds have passed, after one untimed call; -1 if there are none or memory ran out. */
static double hm_time_gemv(int variant, const hm_weight *ws, int n, const float *x, int T, float *y, int nthreads,
                           double min_seconds) {
    if (n < 1 || hm_gemv_multi(variant, &ws[0], 1, x, T, y, NULL, nthreads)) return -1.0;
    const double t0 = hm_now();
    long calls = 0;
    double elapsed;
    do {
        for (int i = 0; i < n; i++)
            if (hm_gemv_multi(variant, &ws[i], 1, x, T, y, NULL, nthreads)) return -1.0;
        calls += n;
        elapsed = hm_now() - t0;
    } while (elapsed < min_seconds);
    return elapsed / (double)calls;
}

/* Seconds per round of hm_read_sum over the n spans (p[i], bytes[i]: multiples of 8) in turn,
 * whole rounds until min_seconds have passed, after one untimed round. */
static double hm_time_read(const uint64_t *const *p, const int64_t *bytes, int n, int nthreads, double min_seconds) {
    volatile uint64_t sink = 0;
    for (int i = 0; i < n; i++) sink += hm_read_sum(p[i], bytes[i], nthreads);
    const double t0 = hm_now();
    long rounds = 0;
    double elapsed;
    do {
        for (int i = 0; i < n; i++) sink += hm_read_sum(p[i], bytes[i], nthreads);
        rounds++;
        elapsed = hm_now() - t0;
    } while (elapsed < min_seconds);
    (void)sink;
    return elapsed / (double)rounds;
}

#endif
