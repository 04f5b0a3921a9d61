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

/* Seconds per round of one(ctx, i) for i = 0 .. n - 1, whole rounds until min_seconds have passed,
 * after one untimed round; -1 if a call returned nonzero. */
static double hm_time_rounds(int (*one)(void *ctx, int i), void *ctx, int n, double min_seconds) {
    for (int i = 0; i < n; i++)
        if (one(ctx, i)) return -1.0;
    const double t0 = hm_now();
    long rounds = 0;
    double elapsed;
    do {
        for (int i = 0; i < n; i++)
            if (one(ctx, i)) return -1.0;
        rounds++;
        elapsed = hm_now() - t0;
    } while (elapsed < min_seconds);
    return elapsed / (double)rounds;
}

typedef struct {
    int variant, T, nthreads;
    const hm_weight *ws;
    const float *x;
    float *y;
} hm_gemv_call;

static int hm_gemv_call_one(void *ctx, int i) {
    const hm_gemv_call *c = ctx;
    return hm_gemv_multi(c->variant, &c->ws[i], 1, c->x, c->T, c->y, NULL, c->nthreads);
}

/* Seconds per call of hm_gemv_multi on one weight at a time, ws[0], ws[1], ... in turn (copies of
 * one problem at other addresses, so that each call reads from DRAM), for at least min_seconds;
 * -1 if there are none or memory ran out. */
static double hm_time_gemv(int variant, const hm_weight *ws, int n, const float *x, int T, float *y, int nthreads,
                           double min_seconds) {
    hm_gemv_call c = {variant, T, nthreads, ws, x, y};
    const double round = n < 1 ? -1.0 : hm_time_rounds(hm_gemv_call_one, &c, n, min_seconds);
    return round < 0 ? round : round / n;
}

typedef struct {
    const uint64_t *const *p;
    const int64_t *bytes;
    int nthreads;
    volatile uint64_t sink;
} hm_read_call;

static int hm_read_call_one(void *ctx, int i) {
    hm_read_call *c = ctx;
    c->sink += hm_read_sum(c->p[i], c->bytes[i], c->nthreads);
    return 0;
}

/* Seconds per round of hm_read_sum over the n spans (p[i], bytes[i]: multiples of 8) in turn, for
 * at least min_seconds. */
static double hm_time_read(const uint64_t *const *p, const int64_t *bytes, int n, int nthreads, double min_seconds) {
    hm_read_call c = {p, bytes, nthreads, 0};
    return hm_time_rounds(hm_read_call_one, &c, n, min_seconds);
}

#endif
