"""CPU kernels for the routed experts: variant detection, dispatch and a checked Python API.

The variant is chosen once, at import, from CPUID (``CPU_FEATURES``) and can be forced with the
environment variable HYBRIDMOE_KERNEL. ``VARIANT`` names the one in use:

- ``avx512_bf16``: AVX-512 BW + VBMI + BF16 (Zen 4 and later, Sapphire Rapids and later).
- ``avx512f``: AVX-512 Foundation only (Skylake-SP, Ice Lake, Knights Landing): fp32 FMA.
- ``avx2``: AVX2 + FMA (Haswell and later, Zen 1-3): fp32 FMA, 8 lanes.
- ``generic``: portable C, for every other CPU (and as the reference the others are tested against).

The API (``gemv``, ``moe_forward``, ``submit_moe``) lives in ``cython_kernels.api``.
"""

from __future__ import annotations

from cython_kernels._cpuinfo import cpu_features
from shared import envs

VARIANTS = ("avx512_bf16", "avx512f", "avx2", "generic")  # best first
CPU_FEATURES: dict[str, bool] = cpu_features()


def supported_variants(features: dict[str, bool] | None = None) -> list[str]:
    f = CPU_FEATURES if features is None else features
    ok = {"avx512_bf16": f["avx512bw"] and f["avx512_bf16"] and f["avx512_vbmi"], "avx512f": f["avx512f"],
          "avx2": f["avx2"], "generic": True}
    return [v for v in VARIANTS if ok[v]]


def choose_variant(forced: str | None = None) -> str:
    """The best variant this CPU runs, or ``forced`` (HYBRIDMOE_KERNEL) if the CPU can run it."""
    supported = supported_variants()
    if forced is None:
        return supported[0]
    if forced not in VARIANTS:
        raise ValueError(f"HYBRIDMOE_KERNEL={forced!r} is not a kernel variant; choose from {VARIANTS}")
    if forced not in supported:
        raise ValueError(f"HYBRIDMOE_KERNEL={forced!r} needs CPU features this machine lacks "
                         f"(it supports {supported})")
    return forced


VARIANT: str = choose_variant(envs.kernel_variant())
