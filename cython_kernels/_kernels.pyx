# cython: language_level=3, boundscheck=False, wraparound=False
"""Raw entry points into the C kernels. Pointers come in as integers from the checked Python API
in cython_kernels.api; nothing here validates its input."""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc


cdef extern from "moe.h" nogil:
    ctypedef struct hm_weight:
        int fmt
        int group
        int64_t rows
        int64_t cols
        const uint8_t *data
        const void *scale

    void hm_init()
    int hm_xp_elem(int variant)
    int hm_gemv_multi(int variant, const hm_weight *ws, int n, const float *x, int T, float *y, void *xp,
                      int nthreads)
    int hm_moe_forward(int variant, const hm_weight *gate, const hm_weight *up, const hm_weight *down,
                       int64_t E, const float *x, int T, int k, const int64_t *ids, const float *wts,
                       float *out, int nthreads)
    void hm_pin_threads(const int *cpus, int n, int nthreads)
    uint64_t hm_read_sum(const uint64_t *p, int64_t n, int nthreads)
    void hm_dequant_fp8(const hm_weight *w, int64_t E, uint16_t *out, int nthreads)
    int hm_amx_available
    int hm_amx_enabled
    int hm_amx_int8
    int hm_amx_int8_enabled
    int hm_vnni_available
    int hm_vnni_enabled
    int hm_fp16_available
    int hm_fp16_enabled

cdef extern from "timing.h" nogil:
    double hm_time_gemv(int variant, const hm_weight *ws, int n, const float *x, int T, float *y, int nthreads,
                        double min_seconds)
    double hm_time_read(const uint64_t *const *p, const int64_t *bytes, int n, int nthreads, double min_seconds)

cdef extern from "attention.h" nogil:
    ctypedef struct hm_attn:
        const void *cache
        int bf16
        int64_t rows
        int64_t width
        const int64_t *blocks
        int64_t block_size
        int64_t length
        int heads
        int kv_heads
        int dk
        int dv
        int64_t k_off
        int64_t k_head
        int64_t v_off
        int64_t v_head
        float scale

    int hm_decode_attention(const hm_attn *a, int n, int avx512, const float *q, float *out, int nthreads)

cdef extern from "decode_ops.h" nogil:
    void hm_add_rms_norm(const void *x, const void *d, int dbf16, void *xo, void *y, const void *w, int64_t N,
                         int64_t D, float eps, int bf16, float *scratch)
    int hm_qk_norm_rope(const float *y, int64_t N, int H, int K, int dh, const void *qw, const void *kw, float eps,
                        const void *cs, const void *sn, int interleaved, int bf16, void *q, void *kv,
                        const int64_t *rows, int64_t nrows, int64_t ld)
    void hm_softmax_topk(const float *logits, int64_t N, int E, int k, int norm, int bf16, float *p, int64_t *ids,
                         float *w)

hm_init()


def amx_available():
    """Whether the CPU has AMX-BF16 and the OS granted this process its tile state."""
    return bool(hm_amx_available)


def amx_enabled():
    return bool(hm_amx_enabled)


def set_amx(bint on):
    """Use AMX for 1-16 tokens where it applies (when available); tests switch it to cover both paths."""
    global hm_amx_enabled
    hm_amx_enabled = 1 if (on and hm_amx_available) else 0

def amx_int8_available():
    """Whether the CPU also has AMX-INT8 (the INT4 weights' exact integer path)."""
    return bool(hm_amx_available and hm_amx_int8)


def amx_int8_enabled():
    return bool(hm_amx_int8_enabled)


def set_amx_int8(bint on):
    """Let INT4 use AMX-INT8 where it applies (when available); off, INT4 AMX stays on bf16."""
    global hm_amx_int8_enabled
    hm_amx_int8_enabled = 1 if (on and hm_amx_int8) else 0

def vnni_available():
    """Whether the CPU has AVX512-VNNI (INT4's path at one and two tokens)."""
    return bool(hm_vnni_available)


def vnni_enabled():
    return bool(hm_vnni_enabled)


def set_vnni(bint on):
    """Let INT4 at one or two tokens use VNNI (when available); off, it takes the AMX or AVX-512 path."""
    global hm_vnni_enabled
    hm_vnni_enabled = 1 if (on and hm_vnni_available) else 0

def fp16_available():
    """Whether the CPU has AVX512-FP16 (FP8's path at one token) and the build knew it."""
    return bool(hm_fp16_available)


def fp16_enabled():
    return bool(hm_fp16_enabled)


def set_fp16(bint on):
    """Let FP8 at one token use AVX512-FP16 (when available); off, it takes the bf16 path."""
    global hm_fp16_enabled
    hm_fp16_enabled = 1 if (on and hm_fp16_available) else 0

VARIANT_CODES = {"generic": 0, "avx512_bf16": 1, "avx512f": 2, "avx2": 3}


cdef hm_weight _weight(tuple w):
    cdef hm_weight hw
    hw.fmt, hw.group, hw.rows, hw.cols = w[0], w[1], w[2], w[3]
    hw.data = <const uint8_t *> <uintptr_t> w[4]
    hw.scale = <const void *> <uintptr_t> w[5]
    return hw


def xp_bytes_per_element(int variant):
    return hm_xp_elem(variant)


def gemv_multi(int variant, list ws, uintptr_t x, int T, uintptr_t y, uintptr_t xp, int nthreads):
    """ws: weight tuples of one format, group and input size; y [T][sum of rows]; xp 0: the
    prepared activations go in the calling thread's scratch arena."""
    cdef hm_weight hw[16]
    cdef int n = len(ws), rc
    if n < 1 or n > 16:
        raise ValueError("gemv_multi takes 1 to 16 weights")
    for i in range(n):
        hw[i] = _weight(ws[i])
    with nogil:
        rc = hm_gemv_multi(variant, hw, n, <const float *> x, T, <float *> y, <void *> xp, nthreads)
    if rc == -2:
        raise MemoryError("gemv_multi: out of memory for the prepared activations")
    if rc != 0:
        raise ValueError("gemv_multi: the weights differ in format, group or input size")


def moe_forward(int variant, tuple gate, tuple up, tuple down, int64_t E, uintptr_t x, int T, int k,
                uintptr_t ids, uintptr_t wts, uintptr_t out, int nthreads):
    cdef hm_weight g = _weight(gate), u = _weight(up), d = _weight(down)
    cdef int rc
    with nogil:
        rc = hm_moe_forward(variant, &g, &u, &d, E, <const float *> x, T, k, <const int64_t *> ids,
                            <const float *> wts, <float *> out, nthreads)
    if rc == -2:
        raise ValueError(f"moe_forward: expert ids must lie in [0, {E}) (or be -1: no expert)")
    if rc != 0:
        raise MemoryError("moe_forward: out of memory for its scratch buffers")


def pin_threads(list cpus, int nthreads):
    cdef int n = len(cpus)
    cdef int buf[1024]
    if n == 0 or n > 1024:
        raise ValueError("pin_threads needs 1 to 1024 cpus")
    for i in range(n):
        buf[i] = cpus[i]
    with nogil:
        hm_pin_threads(buf, n, nthreads)


def dequant_fp8(tuple w, int64_t E, uintptr_t out, int nthreads):
    """w = (fmt, group, rows, cols, data_ptr, scale_ptr) of one expert's shape; E stacked."""
    cdef hm_weight hw = _weight(w)
    with nogil:
        hm_dequant_fp8(&hw, E, <uint16_t *> out, nthreads)


def read_sum(uintptr_t p, int64_t n, int nthreads):
    """The sum of the n bytes' 64-bit words at p (n a multiple of 8), read by nthreads threads."""
    cdef uint64_t r
    with nogil:
        r = hm_read_sum(<const uint64_t *> p, n, nthreads)
    return r


def time_gemv(int variant, list ws, uintptr_t x, int T, uintptr_t y, int nthreads, double min_seconds):
    """Seconds per call of the GEMV on one weight of ws at a time, in turn, timed in C (timing.h)
    for at least min_seconds; ws: weight tuples of one problem (its copies)."""
    cdef int n = len(ws)
    cdef double t
    cdef hm_weight *hw = <hm_weight *> malloc(max(n, 1) * sizeof(hm_weight))
    if hw == NULL:
        raise MemoryError("time_gemv: out of memory")
    try:
        for i in range(n):
            hw[i] = _weight(ws[i])
        with nogil:
            t = hm_time_gemv(variant, hw, n, <const float *> x, T, <float *> y, nthreads, min_seconds)
    finally:
        free(hw)
    if t < 0:
        raise ValueError("time_gemv: no weights, or out of memory")
    return t


def time_read(list spans, int nthreads, double min_seconds):
    """Seconds per round of read_sum over spans [(pointer, bytes), ...] in turn, timed in C for at
    least min_seconds."""
    cdef int n = len(spans)
    cdef double t
    cdef const uint64_t **p = <const uint64_t **> malloc(max(n, 1) * sizeof(uint64_t *))
    cdef int64_t *nb = <int64_t *> malloc(max(n, 1) * sizeof(int64_t))
    if p == NULL or nb == NULL:
        free(p)
        free(nb)
        raise MemoryError("time_read: out of memory")
    try:
        for i in range(n):
            p[i] = <const uint64_t *> <uintptr_t> spans[i][0]
            nb[i] = spans[i][1]
        with nogil:
            t = hm_time_read(p, nb, n, nthreads, min_seconds)
    finally:
        free(p)
        free(nb)
    return t


cdef hm_attn *_attn_array(uintptr_t cache, bint bf16, int64_t rows, int64_t width, list blocks, int64_t block_size,
                          list lengths, int heads, int kv_heads, int dk, int dv, int64_t k_off, int64_t k_head,
                          int64_t v_off, int64_t v_head, float scale) except NULL:
    """One hm_attn per sequence (the caller frees it): blocks and lengths hold each one's block-id
    pointer and length."""
    cdef int n = len(lengths), i
    cdef hm_attn *a = <hm_attn *> malloc(sizeof(hm_attn) * n)
    if a == NULL:
        raise MemoryError("decode attention: out of memory")
    for i in range(n):
        a[i].cache = <const void *> cache
        a[i].bf16, a[i].rows, a[i].width = bf16, rows, width
        a[i].blocks = <const int64_t *> <uintptr_t> blocks[i]
        a[i].block_size, a[i].length, a[i].heads, a[i].kv_heads = block_size, lengths[i], heads, kv_heads
        a[i].dk, a[i].dv, a[i].k_off, a[i].k_head = dk, dv, k_off, k_head
        a[i].v_off, a[i].v_head, a[i].scale = v_off, v_head, scale
    return a


def decode_attention(uintptr_t cache, bint bf16, int64_t rows, int64_t width, list blocks, int64_t block_size,
                     list lengths, int heads, int kv_heads, int dk, int dv, int64_t k_off, int64_t k_head,
                     int64_t v_off, int64_t v_head, float scale, uintptr_t q, uintptr_t out, bint avx512,
                     int nthreads):
    """One query token per sequence against its blocks of a paged cache, all sequences in one call
    (see attention.h): blocks and lengths hold each sequence's block-id pointer and length."""
    cdef int n = len(lengths), rc
    if n < 1 or n != len(blocks):
        raise ValueError("decode_attention: one block table and one length per sequence")
    cdef hm_attn *a = _attn_array(cache, bf16, rows, width, blocks, block_size, lengths, heads, kv_heads, dk, dv,
                                  k_off, k_head, v_off, v_head, scale)
    with nogil:
        rc = hm_decode_attention(a, n, avx512, <const float *> q, <float *> out, nthreads)
    free(a)
    if rc == -2:
        raise ValueError(f"decode_attention: block ids must lie in [0, {rows // block_size}) "
                         f"for a cache of {rows} rows")
    if rc != 0:
        raise MemoryError("decode_attention: out of memory for its scratch buffers")


def add_rms_norm(uintptr_t x, uintptr_t d, bint dbf16, uintptr_t xo, uintptr_t y, uintptr_t w, int64_t N, int64_t D,
                 float eps, bint bf16):
    """Rows of x (+ d into xo, when d) through RMSNorm with w into y (see decode_ops.h); d and xo
    may be 0."""
    cdef float *scratch = <float *> malloc(sizeof(float) * D)
    if scratch == NULL:
        raise MemoryError("add_rms_norm: out of memory")
    with nogil:
        hm_add_rms_norm(<const void *> x, <const void *> d, dbf16, <void *> xo, <void *> y, <const void *> w, N, D,
                        eps, bf16, scratch)
    free(scratch)


def qk_norm_rope(uintptr_t y, int64_t N, int H, int K, int dh, uintptr_t qw, uintptr_t kw, float eps, uintptr_t cs,
                 uintptr_t sn, bint interleaved, bint bf16, uintptr_t q, uintptr_t kv, uintptr_t rows, int64_t nrows,
                 int64_t ld):
    """GQA's fp32 projections y -> rotated (and normed, when qw and kw) queries q and entries kv,
    token t's at row rows[t] of a cache of nrows rows of ld elements when rows (see decode_ops.h)."""
    cdef int rc
    with nogil:
        rc = hm_qk_norm_rope(<const float *> y, N, H, K, dh, <const void *> qw, <const void *> kw, eps,
                             <const void *> cs, <const void *> sn, interleaved, bf16, <void *> q, <void *> kv,
                             <const int64_t *> rows, nrows, ld)
    if rc == -2:
        raise ValueError(f"qk_norm_rope: cache rows must lie in [0, {nrows})")


def softmax_topk(uintptr_t logits, int64_t N, int E, int k, bint norm, bint bf16, uintptr_t ids, uintptr_t w):
    """A softmax router's top-k of N rows of E fp32 logits (see decode_ops.h)."""
    cdef float *p = <float *> malloc(sizeof(float) * E)
    if p == NULL:
        raise MemoryError("softmax_topk: out of memory")
    with nogil:
        hm_softmax_topk(<const float *> logits, N, E, k, norm, bf16, p, <int64_t *> ids, <float *> w)
    free(p)


cdef extern from "decode_layer.h" nogil:
    ctypedef struct hm_gqa_layer:
        hm_weight qkv[3]
        hm_weight o
        hm_weight router
        const void *norm1
        const void *norm2
        float eps1
        float eps2
        const void *qn
        const void *kn
        float qk_eps
        int H, K, dh, interleaved, bf16, E, topk, norm_topk, avx512
        int64_t D

    int hm_decode_gqa_layer(const hm_gqa_layer *L, int variant, int64_t N, const void *x, const void *delta,
                            int dbf16, void *x_out, void *h, const void *cos, const void *sin, void *cache,
                            int64_t cache_rows, int64_t cache_ld, const int64_t *rows, hm_attn *attn, int64_t *ids,
                            float *w, int nthreads)


cdef class GQALayer:
    """A GQA decoder layer's attention block and softmax routing for decode, one call a step (see
    decode_layer.h). Made from checked weight tuples and pointers (cython_kernels.api.DecodeLayer);
    it validates nothing."""
    cdef hm_gqa_layer L
    cdef float scale

    def __init__(self, tuple qkv, tuple o, tuple router, uintptr_t norm1, uintptr_t norm2, float eps1, float eps2,
                 uintptr_t qn, uintptr_t kn, float qk_eps, int H, int K, int dh, bint interleaved, bint bf16,
                 int topk, bint norm_topk, bint avx512, float scale):
        self.scale = scale
        for i in range(3):
            self.L.qkv[i] = _weight(qkv[i])
        self.L.o, self.L.router = _weight(o), _weight(router)
        self.L.norm1, self.L.norm2 = <const void *> norm1, <const void *> norm2
        self.L.eps1, self.L.eps2 = eps1, eps2
        self.L.qn, self.L.kn, self.L.qk_eps = <const void *> qn, <const void *> kn, qk_eps
        self.L.H, self.L.K, self.L.dh, self.L.interleaved, self.L.bf16 = H, K, dh, interleaved, bf16
        self.L.E, self.L.topk, self.L.norm_topk, self.L.avx512 = router[2], topk, norm_topk, avx512
        self.L.D = router[3]

    def run(self, int variant, int64_t N, uintptr_t x, uintptr_t delta, bint dbf16, uintptr_t x_out, uintptr_t h,
            uintptr_t cos, uintptr_t sin, uintptr_t cache, int64_t cache_rows, int64_t cache_ld, uintptr_t rows,
            list blocks, list lengths, int64_t block_size, uintptr_t ids, uintptr_t w, int nthreads):
        """blocks / lengths: each token's sequence's block-id pointer and its length after the step."""
        cdef int rc, dh = self.L.dh
        cdef hm_attn *a = _attn_array(cache, self.L.bf16, cache_rows, cache_ld, blocks, block_size, lengths, self.L.H,
                                      self.L.K, dh, dh, 0, dh, self.L.K * dh, dh, self.scale)
        with nogil:
            rc = hm_decode_gqa_layer(&self.L, variant, N, <const void *> x, <const void *> delta, dbf16,
                                     <void *> x_out, <void *> h, <const void *> cos, <const void *> sin,
                                     <void *> cache, cache_rows, cache_ld, <const int64_t *> rows, a,
                                     <int64_t *> ids, <float *> w, nthreads)
        free(a)
        if rc == -2:
            raise ValueError(f"decode layer: cache rows and block ids must lie in the cache's {cache_rows} rows")
        if rc != 0:
            raise MemoryError("decode layer: out of memory for its scratch buffers")
