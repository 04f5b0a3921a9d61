/* Dispatch, the threaded GEMV, and the whole-layer MoE call.
 *
 * Parallelism is over tiles of (expert, block of output rows), spread by OpenMP over every thread
 * it is given, so that 8 active experts keep many cores busy. The weight-streaming loops hand
 * tiles out guided: a thread takes long runs of consecutive tiles first, so its reads stay long
 * linear streams and the rows a kernel prefetches past its tile are the ones it reads next
 * (dynamic, 1 interleaved the threads' tiles: 0.55 of the bandwidth for an INT4 layer at one
 * token against 0.74-0.94 guided, 0.87 against 0.96 for FP8). */
#ifndef HYBRIDMOE_MOE_H
#define HYBRIDMOE_MOE_H

#ifndef _GNU_SOURCE /* (Cython's generated C may define it first) */
#define _GNU_SOURCE
#endif
#include <sched.h>
#include <stdlib.h>
#include <omp.h>
#include "gemv_generic.h"
#include "gemv_avx512.h"
#include "gemv_f32simd_variants.h"

enum { HM_GENERIC = 0, HM_AVX512_BF16 = 1, HM_AVX512F = 2, HM_AVX2 = 3 };
#define HM_ROWS_PER_TILE 16

static void hm_init(void) {
    hm_init_generic();
#if defined(__x86_64__)
    hm_init_avx512();
#endif
}

/* Bytes per element of prepared activations: bf16 for the BF16 dot products, fp32 otherwise. */
static inline int hm_xp_elem(int variant) { return variant == HM_AVX512_BF16 ? 2 : 4; }

static void hm_prepare_x(int variant, int fmt, const float *x, int T, int64_t in, void *xp) {
#if defined(__x86_64__)
    if (variant == HM_AVX512_BF16) { hm_prepare_x_avx512(fmt, x, T, in, (uint16_t *)xp); return; }
    if (variant == HM_AVX512F) { hm_prepare_x_avx512f(fmt, x, T, in, (float *)xp); return; }
    if (variant == HM_AVX2) { hm_prepare_x_avx2(fmt, x, T, in, (float *)xp); return; }
#endif
    (void)fmt;
    hm_prepare_x_generic(x, T, in, (float *)xp);
}

/* n bytes aligned to 64 (free() releases them): the kernels load activations 64 bytes at a time,
 * and malloc's 16-byte alignment split every such load over two cache lines (INT4 at one token:
 * 10 cycles per 64 weight bytes with the data in L1, against 7 aligned). */
static void *hm_alloc64(size_t n) { return aligned_alloc(64, (n + 63) / 64 * 64); }

/* n bytes, 64-aligned, of the calling thread's scratch arena (NULL if memory ran out): kept from
 * call to call and grown as needed, never shrunk. A buffer of tens of MB fresh from the OS each
 * call cost more than its use: a 1024-token MoE call spent a sixth of its time in the kernel
 * zeroing new pages (clear_page_erms) and a few percent more in page faults. The caller bounds
 * what one call asks for (the MoE call: api.MOE_SCRATCH_BYTES; a GEMV: about its activations'
 * size). */
static __thread char *hm_arena;
static __thread size_t hm_arena_n;
static void *hm_scratch(size_t n) {
    if (n > hm_arena_n) {
        free(hm_arena);
        hm_arena = hm_alloc64(n);
        hm_arena_n = hm_arena ? n : 0;
    }
    return hm_arena;
}

static inline size_t hm_up64(size_t n) { return (n + 63) / 64 * 64; }

/* Bytes (64-byte multiples) of the activations' layout that the call's path for w and T reads
 * (the AMX paths, VNNI for INT4 at 1-2 tokens and FP8's one-token kernels), 0 where none applies. */
static size_t hm_kernel_xb_bytes(int variant, const hm_weight *w, int T) {
#if defined(__x86_64__)
    if (variant == HM_AVX512_BF16 && hm_xb_applies(w, T)) return hm_up64(sizeof(uint32_t) * hm_kernel_xb_words(w, T));
#else
    (void)variant, (void)w, (void)T;
#endif
    return 0;
}

/* That layout of the activations (xp prepared, x the same T rows in fp32) into xb, which has
 * hm_kernel_xb_bytes of room: share `part` of `parts` (see hm_build_kernel_xb_part). */
static void hm_build_kernel_xb_in_part(const hm_weight *w, const void *xp, const float *x, int T, uint32_t *xb,
                                       int part, int parts) {
#if defined(__x86_64__)
    hm_build_kernel_xb_part(w, (const uint16_t *)xp, x, T, xb, part, parts);
#else
    (void)w, (void)xp, (void)x, (void)T, (void)xb, (void)part, (void)parts;
#endif
}

static void hm_build_kernel_xb_in(const hm_weight *w, const void *xp, const float *x, int T, uint32_t *xb) {
    hm_build_kernel_xb_in_part(w, xp, x, T, xb, 0, 1);
}

/* The first HM_HEAD_PF bytes of w (its rows are contiguous) into L2, ahead of a kernel that will
 * start there: the kernels prefetch their own rows a few KB ahead, so where a thread moves from one
 * weight's rows to another's the other's first lines would come from DRAM on demand. */
#define HM_HEAD_PF 4096
static inline void hm_prefetch_head(const hm_weight *w) {
    const int64_t rb = hm_row_bytes(w);
    const char *p = (const char *)w->data;
    for (int64_t off = 0; off < HM_HEAD_PF && off < w->rows * rb; off += 64) __builtin_prefetch(p + off, 0, 2);
}

/* The end of a thread's share of a call's GEMV tiles: its AMX tiles are released (see
 * hm_amx_config). Every parallel region that runs hm_gemv_rows ends with this. */
static void hm_gemv_thread_done(void) {
#if defined(__x86_64__)
    hm_amx_release();
#endif
}

/* xb: NULL (the AVX-512 path then runs), or (avx512_bf16 with AMX or VNNI) the activations in that
 * path's layout, see hm_kernel_xb_bytes. */
static void hm_gemv_rows(int variant, const hm_weight *w, const void *xp, const uint32_t *xb, int T, float *y,
                         int64_t ldy, int64_t r0, int64_t r1) {
#if defined(__x86_64__)
    if (variant == HM_AVX512_BF16) { hm_gemv_rows_avx512(w, (const uint16_t *)xp, xb, T, y, ldy, r0, r1); return; }
    if (variant == HM_AVX512F) { hm_gemv_rows_avx512f(w, (const float *)xp, T, y, ldy, r0, r1); return; }
    if (variant == HM_AVX2) { hm_gemv_rows_avx2(w, (const float *)xp, T, y, ldy, r0, r1); return; }
#endif
    hm_gemv_rows_generic(w, (const float *)xp, T, y, ldy, r0, r1);
}

/* Several weights of one format and input size against the same x, in one parallel region:
 * y [T][sum of rows], weight i's outputs in columns [off_i, off_i + rows_i). One preparation of
 * the activations (and of a kernel layout, which depends only on format, columns and T), one
 * fork and join instead of one per weight (decode's q, k and v projections). Any number of
 * tokens: past HM_MAX_TOKENS they run in segments of that many, each row tile going through all
 * segments while its rows are in cache, so the weights are read from memory once a call (a
 * prefill chunk's FP8 linears, multiplied as stored). Returns 0, -1 if the weights differ in
 * format, group or columns, -2 if memory ran out. xp has room for T x cols prepared elements, or
 * is NULL: then they go in the calling thread's arena (hm_scratch), as the kernel layouts do, so
 * no caller may hold arena memory across this call (and a Python caller allocates nothing). */
static int hm_gemv_multi(int variant, const hm_weight *ws, int n, const float *x, int T, float *y, void *xp,
                         int nthreads) {
    int64_t ldy = 0, tiles = 0;
    for (int i = 0; i < n; i++) {
        if (ws[i].fmt != ws[0].fmt || ws[i].group != ws[0].group || ws[i].cols != ws[0].cols) return -1;
        ldy += ws[i].rows;
        tiles += (ws[i].rows + HM_ROWS_PER_TILE - 1) / HM_ROWS_PER_TILE;
    }
    const int64_t cols = ws[0].cols;
    /* S segments of HM_MAX_TOKENS tokens, the last one of Tl; their kernel layouts one after the
     * other in the calling thread's arena, segment s's at s * full bytes (none where none applies;
     * out of memory: the AVX-512 path), after xp where the caller passed none */
    const int S = (T + HM_MAX_TOKENS - 1) / HM_MAX_TOKENS, Tl = T - (S - 1) * HM_MAX_TOKENS;
    const size_t full = S > 1 ? hm_kernel_xb_bytes(variant, &ws[0], HM_MAX_TOKENS) : 0,
                 last = hm_kernel_xb_bytes(variant, &ws[0], Tl);
    const size_t nxp = xp ? 0 : hm_up64((size_t)T * (size_t)cols * (size_t)hm_xp_elem(variant));
    char *arena = nxp || full || last ? hm_scratch(nxp + (size_t)(S - 1) * full + last) : NULL;
    if (!xp && !arena) return -2;
    if (!xp) xp = arena;
    char *xb = arena && (full || last) ? arena + nxp : NULL;
    hm_prepare_x(variant, ws[0].fmt, x, T, cols, xp);
    const size_t xp_seg = (size_t)HM_MAX_TOKENS * (size_t)cols * (size_t)hm_xp_elem(variant);
#pragma omp parallel num_threads(nthreads)
    {
        /* the layouts first, each segment's in one share per thread */
        const int parts = omp_get_num_threads();
        if (xb) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < (int64_t)S * parts; j++) {
                const int s = (int)(j / parts);
                if (s < S - 1 ? full : last)
                    hm_build_kernel_xb_in_part(&ws[0], (const char *)xp + s * xp_seg,
                                               x + (size_t)s * HM_MAX_TOKENS * cols, s < S - 1 ? HM_MAX_TOKENS : Tl,
                                               (uint32_t *)(xb + s * full), (int)(j % parts), parts);
            }
        }
        /* guided: each thread takes long runs of consecutive tiles first (its reads stay one linear
         * stream, which the prefetchers keep ahead of), then shorter ones to even out the end */
#pragma omp for schedule(guided) nowait
        for (int64_t t = 0; t < tiles; t++) {
            int64_t i = 0, first = 0, off = 0; /* the weight tile t falls in */
            for (;; i++) {
                const int64_t nt = (ws[i].rows + HM_ROWS_PER_TILE - 1) / HM_ROWS_PER_TILE;
                if (t < first + nt) break;
                first += nt, off += ws[i].rows;
            }
            const int64_t r0 = (t - first) * HM_ROWS_PER_TILE;
            const int64_t r1 = r0 + HM_ROWS_PER_TILE < ws[i].rows ? r0 + HM_ROWS_PER_TILE : ws[i].rows;
            for (int s = 0; s < S; s++)
                hm_gemv_rows(variant, &ws[i], (const char *)xp + s * xp_seg,
                             xb && (s < S - 1 ? full : last) ? (const uint32_t *)(xb + s * full) : NULL,
                             s < S - 1 ? HM_MAX_TOKENS : Tl, y + (int64_t)s * HM_MAX_TOKENS * ldy + off, ldy, r0, r1);
        }
        hm_gemv_thread_done();
    }
    return 0;
}

/* A whole FP8 weight ([rows, cols], or E stacked experts as E * rows rows with per-expert
 * scale blocks) dequantized to bf16, rows spread over the threads. */
static void hm_dequant_fp8(const hm_weight *w, int64_t E, uint16_t *out, int nthreads) {
    const int64_t tiles = (w->rows + HM_ROWS_PER_TILE - 1) / HM_ROWS_PER_TILE;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < E * tiles; i++) {
        int64_t e = i / tiles, r0 = (i % tiles) * HM_ROWS_PER_TILE;
        int64_t r1 = r0 + HM_ROWS_PER_TILE < w->rows ? r0 + HM_ROWS_PER_TILE : w->rows;
        hm_weight we = *w;
        we.data = w->data + e * w->rows * w->cols;
        we.scale = (const float *)w->scale + e * ((w->rows + 127) / 128) * ((w->cols + 127) / 128);
        hm_dequant_fp8_rows(&we, out + e * w->rows * w->cols, r0, r1);
    }
}

/* Expert e of a stacked [E, out, in] weight. */
static hm_weight hm_expert(const hm_weight *s, int64_t e) {
    hm_weight w = *s;
    if (s->fmt == HM_DENSE_BF16) {
        w.data = s->data + e * s->rows * s->cols * 2;
    } else if (s->fmt == HM_FP8_B128) {
        w.data = s->data + e * s->rows * s->cols;
        w.scale = (const float *)s->scale + e * ((s->rows + 127) / 128) * ((s->cols + 127) / 128);
    } else {
        w.data = s->data + e * s->rows * (s->cols / 2);
        w.scale = (const uint16_t *)s->scale + e * s->rows * (s->cols / s->group);
    }
    return w;
}

static inline float hm_silu(float g) { return g / (1.f + expf(-g)); }

/* The most tokens of one expert that a kernel call takes at once: what AMX takes where the
 * experts' weights go through AMX (FP8 and BF16 64, decoded or loaded once for them; INT4 one
 * tile of 16: more tokens would leave AMX for the vector kernels, which do one dot product per
 * token, and 64 tokens in one call ran 5x slower than in four of 16), else all the kernels take. Either way the
 * segments of a tile of rows run back to back, the rows in cache. */
static int hm_segment_tokens(int variant, const hm_weight *gate, const hm_weight *down) {
#if defined(__x86_64__)
    if (variant == HM_AVX512_BF16 && hm_amx_applies(gate, HM_AMX_WIDE_T) && hm_amx_applies(down, HM_AMX_WIDE_T))
        return HM_AMX_WIDE_T;
    if (variant == HM_AVX512_BF16 && (hm_amx_applies(gate, HM_AMX_MAX_T) || hm_amx_applies(down, HM_AMX_MAX_T)))
        return HM_AMX_MAX_T;
#else
    (void)variant, (void)gate, (void)down;
#endif
    return HM_MAX_TOKENS;
}

/* A weight-streaming phase of the MoE call, inside its parallel region (the loop is shared out
 * among the region's threads): for each active expert a (act[0..na)), its nw stacked weights
 * ws[0..nw), one after the other, each a run of tiles of HM_ROWS_PER_TILE rows that go through
 * a's segments (seg[aseg[a]] .. seg[aseg[a + 1]]: pair p's input row at x + p * xrow bytes, the
 * segment's kernel layout xbs[s]); weight j's output for pair p at ys[j] + p * ldy. At the end of
 * a weight, a thread fetches the next one's first rows: guided hands out runs of consecutive
 * tiles, so it most likely goes on there. */
static void hm_moe_weight_tiles(int variant, const hm_weight *const *ws, int nw, float *const *ys, int64_t ldy,
                                const int *act, int64_t na, const int64_t *aseg, const int64_t *seg, const char *x,
                                size_t xrow, uint32_t *const *xbs) {
    const int64_t rows = ws[0]->rows, per = (rows + HM_ROWS_PER_TILE - 1) / HM_ROWS_PER_TILE, tiles = na * nw * per;
#pragma omp for schedule(guided)
    for (int64_t tile = 0; tile < tiles; tile++) {
        const int64_t a = tile / (nw * per), j = tile / per % nw;
        const int64_t r0 = tile % per * HM_ROWS_PER_TILE, r1 = r0 + HM_ROWS_PER_TILE < rows ? r0 + HM_ROWS_PER_TILE : rows;
        const hm_weight w = hm_expert(ws[j], act[a]);
        for (int64_t s = aseg[a]; s < aseg[a + 1]; s++) {
            const int64_t p0 = seg[s];
            hm_gemv_rows(variant, &w, x + (size_t)p0 * xrow, xbs[s], (int)(seg[s + 1] - p0), ys[j] + p0 * ldy, ldy,
                         r0, r1);
        }
        if ((tile + 1) % per == 0 && tile + 1 < tiles) {
            const hm_weight next = hm_expert(ws[(j + 1) % nw], act[j + 1 < nw ? a : a + 1]);
            hm_prefetch_head(&next);
        }
    }
}

/* out [T][D] = sum_j wts[t][j] * expert_{ids[t][j]}(x[t]) with expert(x) = down(silu(gate x) * up x).
 * gate/up are stacked [E, I, D], down [E, D, I]. An id of -1 is no expert (its pair is skipped: an
 * expert-parallel rank passes the pairs of other ranks' experts so). Any number of tokens: an
 * expert's (token, weight) pairs run in segments (hm_segment_tokens), and a tile of the expert's
 * rows goes through all its segments while those rows are in cache, so that a prefill chunk reads
 * each chosen expert's weights from memory once.
 *
 * Every weight (each active expert's gate, up and down) is its own run of tiles, one after the
 * other, so that guided scheduling hands each thread long stretches of one weight's rows: one
 * linear stream, as a plain GEMV reads. Down's outputs go per (token, expert) pair to scratch and
 * are summed per token at the end. (Tiles that held gate and up rows together, and down tiles
 * that owned a block of output rows across all experts, switched streams every 57-114 KB: a top-8
 * DeepSeek-V3 layer at one token ran 7 % slower, FP8 and INT4 g128 alike, measured alternating
 * in one process.)
 *
 * Scratch memory grows with T * k (the caller bounds it; see api.Experts.tokens_per_call).
 * Returns 0, -2 (before any work) if an id lies outside [-1, E), or -1 if memory ran out. */
static int hm_moe_forward(int variant, const hm_weight *gate, const hm_weight *up, const hm_weight *down,
                          int64_t E, const float *x, int T, int k, const int64_t *ids, const float *wts,
                          float *out, int nthreads) {
    const int64_t D = gate->cols, I = gate->rows;
    const size_t esz = (size_t)hm_xp_elem(variant);
    const int64_t pairs = (int64_t)T * k;
    for (int64_t i = 0; i < pairs; i++) /* checked here, not by two torch reductions in decode's path */
        if (ids[i] < -1 || ids[i] >= E) return -2;
    memset(out, 0, sizeof(float) * (size_t)T * (size_t)D);
    /* Group (token, weight) pairs by expert: the active experts, their pairs, and the pairs cut
     * into segments of at most sl (seg[s] .. seg[s + 1]; expert a owns segments aseg[a] ..
     * aseg[a + 1]). */
    const int64_t sl = hm_segment_tokens(variant, gate, down);
    int64_t *count = calloc((size_t)E + 1, sizeof(int64_t)), *pos = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t n = 0, na = 0, ns = 0;
    if (!count || !pos) { free(count); free(pos); return -1; }
    for (int64_t i = 0; i < pairs; i++)
        if (ids[i] >= 0) count[ids[i]]++;
    for (int64_t e = 0; e < E; e++)
        if (count[e]) { na++; ns += (count[e] + sl - 1) / sl; n += count[e]; }
    if (!n) { free(count); free(pos); return 0; }
    int *tok = malloc(sizeof(int) * (size_t)n), *act = malloc(sizeof(int) * (size_t)na);
    float *tw = malloc(sizeof(float) * (size_t)n);
    int64_t *seg = malloc(sizeof(int64_t) * (size_t)(ns + 1)), *aseg = malloc(sizeof(int64_t) * (size_t)(na + 1));
    /* each segment's activations in the AMX / VNNI / one-token layout of gate and up, and of down
     * (NULL where none applies), in the arena */
    uint32_t **xbg = calloc((size_t)ns + 1, sizeof(uint32_t *)), **xbd = calloc((size_t)ns + 1, sizeof(uint32_t *));
    size_t *xbo = malloc(sizeof(size_t) * (size_t)(2 * ns + 1));
    int rc = -1;
    if (!tok || !act || !tw || !seg || !aseg || !xbg || !xbd || !xbo) goto done;
    {
        int64_t off = 0, a = 0, s = 0;
        for (int64_t e = 0; e < E; e++) {
            if (!count[e]) continue;
            act[a] = (int)e;
            aseg[a++] = s;
            pos[e] = off;
            for (int64_t c = 0; c < count[e]; c += sl) seg[s++] = off + c;
            off += count[e];
        }
        aseg[na] = ns, seg[ns] = n;
    }
    /* The arena: xw [T][D] prepared; then a region that holds xg [n][D] prepared and g, u [n][I]
     * (gate x, up x; then SiLU(gate) * up in g) until the down projection's inputs are ready, and
     * yd [n][D] (down's output per pair) after; hp [n][I] prepared; then the segments' layouts
     * (xbo: their offsets, 0 for none). */
    const size_t nxw = hm_up64((size_t)T * (size_t)D * esz), nxg = hm_up64((size_t)n * (size_t)D * esz),
                 ng = hm_up64(sizeof(float) * (size_t)n * (size_t)I), nyd = hm_up64(sizeof(float) * (size_t)n * (size_t)D),
                 nhp = hm_up64((size_t)n * (size_t)I * esz);
    const size_t nreg = nxg + 2 * ng > nyd ? nxg + 2 * ng : nyd;
    size_t total = nxw + nreg + nhp;
    for (int64_t q = 0; q < 2 * ns; q++) {
        const size_t b = hm_kernel_xb_bytes(variant, q < ns ? gate : down, (int)(seg[q % ns + 1] - seg[q % ns]));
        xbo[q] = b ? total : 0;
        total += b;
    }
    char *arena = hm_scratch(total);
    if (!arena) goto done;
    void *xw = arena, *xg = arena + nxw, *hp = arena + nxw + nreg;
    float *g = (float *)(arena + nxw + nxg), *u = (float *)(arena + nxw + nxg + ng), *yd = (float *)(arena + nxw);
    for (int64_t s = 0; s < ns; s++) {
        xbg[s] = xbo[s] ? (uint32_t *)(arena + xbo[s]) : NULL;
        xbd[s] = xbo[ns + s] ? (uint32_t *)(arena + xbo[ns + s]) : NULL;
    }
    for (int64_t i = 0; i < pairs; i++)
        if (ids[i] >= 0) { int64_t p = pos[ids[i]]++; tok[p] = (int)(i / k); tw[p] = wts[i]; }

    /* Activations prepared once for all tokens, then gathered per pair (rows stay prepared). */
    hm_prepare_x(variant, gate->fmt, x, T, D, xw);
    for (int64_t p = 0; p < n; p++) memcpy((char *)xg + (size_t)p * D * esz, (char *)xw + (size_t)tok[p] * D * esz, (size_t)D * esz);

#pragma omp parallel num_threads(nthreads)
    {
        /* 0: for the AMX and VNNI paths, each segment's activations in their layout (NULL: not used;
         * the layout depends on the weights' format and shape, not on which expert). */
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < ns; s++) {
            const int64_t p0 = seg[s];
            const int te = (int)(seg[s + 1] - p0); /* (at one token, its fp32 row is x's) */
            if (xbg[s])
                hm_build_kernel_xb_in(gate, (const char *)xg + (size_t)p0 * D * esz,
                                      te == 1 ? x + (size_t)tok[p0] * D : NULL, te, xbg[s]);
        }
        /* 1: gate, then up, of each active expert, into g and u */
        const hm_weight *gu[2] = {gate, up};
        float *const gu_out[2] = {g, u};
        hm_moe_weight_tiles(variant, gu, 2, gu_out, I, act, na, aseg, seg, (const char *)xg, (size_t)D * esz, xbg);
        /* 2: SiLU(gate) * up, and the down projection's inputs prepared, per pair */
#pragma omp for schedule(static)
        for (int64_t p = 0; p < n; p++) {
            float *gp = g + (size_t)p * I;
            const float *up_ = u + (size_t)p * I;
            for (int64_t r = 0; r < I; r++) gp[r] = hm_silu(gp[r]) * up_[r];
            hm_prepare_x(variant, down->fmt, gp, 1, I, (char *)hp + (size_t)p * I * esz);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < ns; s++) {
            if (xbd[s])
                hm_build_kernel_xb_in(down, (const char *)hp + (size_t)seg[s] * I * esz, g + (size_t)seg[s] * I,
                                      (int)(seg[s + 1] - seg[s]), xbd[s]);
        }
        /* (xg, g and u are spent: yd takes their room) */
        /* 3: down of each active expert, into yd */
        float *const d_out[1] = {yd};
        hm_moe_weight_tiles(variant, &down, 1, d_out, D, act, na, aseg, seg, (const char *)hp, (size_t)I * esz, xbd);
        /* 4: out[t] = sum over t's pairs of their weight times yd, a block of columns per thread */
#pragma omp for schedule(static) nowait
        for (int64_t c0 = 0; c0 < D; c0 += 256) {
            const int64_t c1 = c0 + 256 < D ? c0 + 256 : D;
            for (int64_t p = 0; p < n; p++) {
                float *o = out + (int64_t)tok[p] * D;
                const float *yp = yd + p * D, wp = tw[p];
                for (int64_t c = c0; c < c1; c++) o[c] += wp * yp[c];
            }
        }
        hm_gemv_thread_done();
    }
    rc = 0;
done:
    free(xbg); free(xbd); free(xbo);
    free(count); free(pos); free(tok); free(act); free(tw); free(seg); free(aseg);
    return rc;
}

/* Sum of n bytes' 64-bit words (n a multiple of 8), read by nthreads threads in contiguous halves,
 * prefetched into L2 ahead of each stream: the machine's memory-read bandwidth as the kernels can
 * use it (the benchmarks' roofline; torch's sum reads about 15 % slower on the machine measured). */
static uint64_t hm_read_sum(const uint64_t *p, int64_t n, int nthreads) {
    uint64_t total = 0;
    const int64_t words = n / 8;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(nthreads)
    for (int64_t c = 0; c < words; c += 8192) { /* 64 KB at a time */
        const int64_t end = c + 8192 < words ? c + 8192 : words;
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        int64_t i = c;
        for (; i + 8 <= end; i += 8) {
            __builtin_prefetch(p + i + 512, 0, 2); /* 4 KB ahead, into L2 */
            s0 += p[i] + p[i + 4];
            s1 += p[i + 1] + p[i + 5];
            s2 += p[i + 2] + p[i + 6];
            s3 += p[i + 3] + p[i + 7];
        }
        for (; i < end; i++) s0 += p[i];
        total += s0 + s1 + s2 + s3;
    }
    return total;
}

/* Pin the calling pool's threads: thread i to cpus[i % n]. */
static void hm_pin_threads(const int *cpus, int n, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpus[omp_get_thread_num() % n], &set);
        sched_setaffinity(0, sizeof(set), &set);
    }
}

#endif
