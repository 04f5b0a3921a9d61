"""CPU feature detection and kernel-variant choice."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cython_kernels as ck


def test_features_and_variant():
    assert set(ck.CPU_FEATURES) == {"avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx512_vbmi"}
    assert ck.VARIANT in ck.supported_variants()
    assert ck.supported_variants()[-1] == "generic"
    none = dict.fromkeys(ck.CPU_FEATURES, False)
    assert ck.supported_variants(none) == ["generic"]
    assert ck.supported_variants({**none, "avx2": True}) == ["avx2", "generic"]
    # BF16 without VBMI (the FP8 lookup needs VPERMI2B) falls back to the fp32 AVX-512F kernels
    assert ck.supported_variants({**none, "avx512f": True, "avx512bw": True, "avx512_bf16": True}) == [
        "avx512f", "generic"]
    assert ck.supported_variants({**none, "avx2": True, "avx512f": True, "avx512bw": True, "avx512_bf16": True,
                                  "avx512_vbmi": True}) == ["avx512_bf16", "avx512f", "avx2", "generic"]


def test_forced_variant():
    assert ck.choose_variant("generic") == "generic"
    assert ck.choose_variant(None) == ck.supported_variants()[0]
    with pytest.raises(ValueError, match="not a kernel variant"):
        ck.choose_variant("sse9")
    out = subprocess.run([sys.executable, "-c", "import cython_kernels as k; print(k.VARIANT)"],
                         env={"HYBRIDMOE_KERNEL": "generic", "PATH": ""}, capture_output=True, text=True)
    assert out.stdout.strip() == "generic", out.stderr
