/* Kernel probes for development: what one change to the kernel headers does, measured in C so
 * that no Python call or allocation sits inside the timings. Built by probe.sh from two header
 * directories, a (the base) and b (the change); with one directory both are the same build.
 *
 *   probe incache FMT ROWS COLS T   one thread, one weight small enough to stay in L1/L2: the
 *                                   kernel's compute cost, in ns (and cycles at HM_PROBE_GHZ,
 *                                   default 3.6) per 64 weight bytes, builds a and b
 *   probe dram FMT ROWS COLS T      all threads over enough weight copies (HM_PROBE_BYTES, default
 *                                   1 GiB) that every call reads from DRAM; builds a and b and a
 *                                   plain read of the same bytes alternated, best of HM_PROBE_REPS
 *                                   (default 5) passes of at least 0.25 s each; HM_PROBE_HUGE=1
 *                                   asks for 2 MB pages for the weights (madvise) and prints
 *                                   how many MB of this process's memory got them
 *
 * FMT: bf16, fp8, int4_g32 or int4_g128. Threads: HM_PROBE_THREADS, default all this process may
 * use. The kernel variant is the best this CPU runs (HYBRIDMOE_KERNEL is not read); the paths'
 * switches (HYBRIDMOE_AMX=0, HYBRIDMOE_AMX_INT8=0, HYBRIDMOE_VNNI=0, ...) apply as in the extension.
 * The values are fixed pseudo-random bytes: only speed is measured here (tests/test_kernels.py
 * checks results). */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>

#include "gemv_generic.h" /* hm_weight, its formats and hm_row_bytes */

int probe_gemv_a(const hm_weight *, const float *, int, float *, void *, int);
int probe_gemv_b(const hm_weight *, const float *, int, float *, void *, int);
int probe_rows_a(const hm_weight *, const float *, int, float *, int);
int probe_rows_b(const hm_weight *, const float *, int, float *, int);
uint64_t probe_read_a(const void *, int64_t, int);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double env_num(const char *name, double dflt) {
    const char *v = getenv(name);
    return v && *v ? atof(v) : dflt;
}

static int64_t data_bytes(const hm_weight *w) { return w->rows * hm_row_bytes(w); }

/* This process's anonymous memory in 2 MB pages, in MB (/proc/self/smaps_rollup; 0 if unknown). */
static double anon_huge_mb(void) {
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    long kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb / 1024.0;
}

/* A weight of the format with fixed pseudo-random values (FP8: no NaN code; BF16: magnitudes
 * near 1), its bytes in one 64-aligned allocation. */
static hm_weight make_weight(int fmt, int group, int64_t rows, int64_t cols) {
    hm_weight w = {fmt, group, rows, cols, NULL, NULL};
    const int64_t n = data_bytes(&w);
    const int64_t ns = fmt == HM_FP8_B128 ? 4 * ((rows + 127) / 128) * ((cols + 127) / 128)
                       : fmt == HM_INT4  ? 2 * rows * (cols / group)
                                         : 0;
    const size_t huge = env_num("HM_PROBE_HUGE", 0) ? (size_t)1 << 21 : 0, align = huge ? huge : 64;
    const size_t size = (size_t)(n + ns + 127 + align - 1) / align * align;
    uint8_t *d = aligned_alloc(align, size);
    if (d && huge) madvise(d, size, MADV_HUGEPAGE); /* (advice: without THP the pages stay 4 KB) */
    if (!d) {
        fprintf(stderr, "probe: out of memory\n");
        exit(1);
    }
    for (int64_t j = 0; j < n; j++) d[j] = (uint8_t)((uint32_t)(j * 2654435761u) >> 13) & (fmt == HM_FP8_B128 ? 0x77 : 0xff);
    if (fmt == HM_DENSE_BF16)
        for (int64_t j = 1; j < n; j += 2) d[j] = 0x3f;
    uint8_t *s = d + (n + 63) / 64 * 64;
    for (int64_t j = 0; j < ns / (fmt == HM_FP8_B128 ? 4 : 2); j++) {
        if (fmt == HM_FP8_B128) ((float *)s)[j] = 0.01f * (float)(1 + j % 3);
        else ((uint16_t *)s)[j] = 0x3c00; /* bf16 0.0078125 */
    }
    w.data = d, w.scale = ns ? s : NULL;
    return w;
}

int main(int argc, char **argv) {
    static const struct { const char *name; int fmt, group; } fmts[] = {
        {"bf16", HM_DENSE_BF16, 0}, {"fp8", HM_FP8_B128, 0}, {"int4_g32", HM_INT4, 32}, {"int4_g128", HM_INT4, 128}};
    int f = -1;
    if (argc == 6)
        for (int i = 0; i < 4; i++)
            if (!strcmp(argv[2], fmts[i].name)) f = i;
    const int64_t rows = argc == 6 ? atoll(argv[3]) : 0, cols = argc == 6 ? atoll(argv[4]) : 0;
    const int T = argc == 6 ? atoi(argv[5]) : 0;
    const int incache = argc == 6 && !strcmp(argv[1], "incache"), dram = argc == 6 && !strcmp(argv[1], "dram");
    if ((!incache && !dram) || f < 0 || rows < 1 || cols < 1 || T < 1 || T > 64
        || (fmts[f].fmt == HM_INT4 && cols % 128)) {
        fprintf(stderr, "usage: probe incache|dram bf16|fp8|int4_g32|int4_g128 ROWS COLS TOKENS\n"
                        "  (TOKENS 1-64; INT4 COLS a multiple of 128)\n");
        return 2;
    }
    cpu_set_t set;
    const int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    const int nt = (int)env_num("HM_PROBE_THREADS", cpus);
    float *x = aligned_alloc(64, (size_t)(4 * cols * T + 63) / 64 * 64), *y = aligned_alloc(64, (size_t)(4 * rows * T + 63) / 64 * 64);
    void *xp = aligned_alloc(64, (size_t)(4 * cols * T + 63) / 64 * 64);
    for (int64_t j = 0; j < cols * T; j++) x[j] = (float)(j % 7) * 0.1f - 0.3f;
    const char *name = fmts[f].name;

    if (incache) {
        const hm_weight w = make_weight(fmts[f].fmt, fmts[f].group, rows, cols);
        const double ghz = env_num("HM_PROBE_GHZ", 3.6), lines = (double)data_bytes(&w) / 64;
        double best[2] = {1e9, 1e9};
        for (int pass = 0; pass < 3; pass++)
            for (int v = 0; v < 2; v++) {
                int reps = 1;
                double t;
                for (;; reps *= 2) { /* at least 0.2 s a pass */
                    t = now();
                    if ((v ? probe_rows_b : probe_rows_a)(&w, x, T, y, reps)) return 1;
                    t = now() - t;
                    if (t >= 0.2) break;
                }
                if (t / reps < best[v]) best[v] = t / reps;
            }
        printf("incache %s %ldx%ld T=%d, one thread: a %.3f ns (%.2f cycles at %.1f GHz), b %.3f ns (%.2f cycles) "
               "per 64 weight bytes; b/a %.3f\n", name, (long)rows, (long)cols, T, best[0] * 1e9 / lines,
               best[0] * ghz * 1e9 / lines, ghz, best[1] * 1e9 / lines, best[1] * ghz * 1e9 / lines, best[1] / best[0]);
        return 0;
    }
    const hm_weight one = make_weight(fmts[f].fmt, fmts[f].group, rows, cols);
    const int64_t bytes = data_bytes(&one);
    int copies = (int)(env_num("HM_PROBE_BYTES", 1 << 30) / (double)bytes);
    copies = copies < 2 ? 2 : copies;
    hm_weight *ws = malloc(sizeof(hm_weight) * (size_t)copies);
    ws[0] = one;
    for (int i = 1; i < copies; i++) ws[i] = make_weight(fmts[f].fmt, fmts[f].group, rows, cols);
    const int reps = (int)env_num("HM_PROBE_REPS", 5);
    double best[3] = {1e9, 1e9, 1e9};
    for (int pass = 0; pass < reps; pass++)
        for (int v = 0; v < 3; v++) {
            long calls = 0;
            const double t0 = now();
            volatile uint64_t sink = 0;
            while (now() - t0 < 0.25) {
                for (int i = 0; i < copies; i++) {
                    if (v == 2) sink += probe_read_a(ws[i].data, bytes, nt);
                    else if ((v ? probe_gemv_b : probe_gemv_a)(&ws[i], x, T, y, xp, nt)) return 1;
                }
                calls += copies;
            }
            const double t = (now() - t0) / (double)calls;
            if (t < best[v]) best[v] = t;
        }
    printf("dram %s %ldx%ld T=%d, %d threads, %d copies: a %.1f us (%.3f of the read), b %.1f us (%.3f), "
           "read %.1f us (%.1f GB/s); b/a %.3f\n", name, (long)rows, (long)cols, T, nt, copies, best[0] * 1e6,
           best[2] / best[0], best[1] * 1e6, best[2] / best[1], best[2] * 1e6, (double)bytes / best[2] / 1e9,
           best[1] / best[0]);
    if (env_num("HM_PROBE_HUGE", 0))
        printf("2 MB pages: %.0f MB in this process, for %.0f MB of weights\n", anon_huge_mb(),
               (double)bytes * copies / (1 << 20));
    return 0;
}
