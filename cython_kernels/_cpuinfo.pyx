# cython: language_level=3
"""CPUID feature flags, as the kernel dispatcher needs them."""

cdef extern from "cpu_features.h":
    int hm_cpu_avx2()
    int hm_cpu_avx512f()
    int hm_cpu_avx512bw()
    int hm_cpu_avx512bf16()
    int hm_cpu_avx512vnni()
    int hm_cpu_avx512vbmi()


def cpu_features():
    """A dict of the features that matter to the kernels: avx2 (with FMA), avx512f,
    avx512bw (with VL), avx512_bf16, avx512_vnni, avx512_vbmi."""
    return {
        "avx2": bool(hm_cpu_avx2()),
        "avx512f": bool(hm_cpu_avx512f()),
        "avx512bw": bool(hm_cpu_avx512bw()),
        "avx512_bf16": bool(hm_cpu_avx512bf16()),
        "avx512_vnni": bool(hm_cpu_avx512vnni()),
        "avx512_vbmi": bool(hm_cpu_avx512vbmi()),
    }
