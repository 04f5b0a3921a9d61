"""CPU kernels against the pure-torch reference (shared.quant's dequantize, RoutedExperts.forward),
for every variant this machine runs, over decode and prefill token counts and odd shapes."""

from __future__ import annotations

import pytest
import torch

import cython_kernels
from cython_kernels import _kernels, api
from shared.layers import RoutedExperts
from shared.quant import QuantWeight, dequantize, quantize

VARIANTS = cython_kernels.supported_variants()
FORMATS = ["dense", "fp8_b128", "int4_g32", "int4_g128"]


def _q(w: torch.Tensor, fmt: str) -> QuantWeight:
    return quantize(w.bfloat16() if fmt == "dense" else w, fmt)


def _shapes(fmt):
    # multiples of the 128 block, a shape with partial blocks, and one with a ragged row count
    if fmt.startswith("int4"):
        g = int(fmt.split("_g")[1])
        return [(256, 512), (77, 3 * g), (130, 2 * g + 128)]
    return [(256, 512), (200, 300), (33, 70)]


def _fp16_path(variant, fmt, tokens):
    """Whether the call takes FP8's one-token FP16 kernel, which rounds the activations to fp16 (11
    bits of mantissa) instead of bf16 (8) and sums products in fp16 sixteen to a lane."""
    return variant == "avx512_bf16" and fmt == "fp8_b128" and tokens == 1 and _kernels.fp16_enabled()


def _f32_path(variant, fmt, tokens):
    """Whether the call takes BF16's one-token kernel, which multiplies the fp32 activations as
    given (the other kernels round them to bf16 first)."""
    return variant == "avx512_bf16" and fmt == "dense" and tokens == 1


def _assert_fp16_bound(y, x, w, what=""):
    """The FP16 kernel against the fp32 activations: each output within 2^-8 of the sum of its
    products' magnitudes, plus fp32's rounding (the activation's rounding to fp16 and a lane's
    three roundings of sums each add at most 2^-11 of it; a column tail, in bf16, 2^-8)."""
    xd, wd = x.double(), dequantize(w).double()
    err = (y.double() - xd @ wd.T).abs()
    bound = (2.0**-8 + 2.0**-20) * (xd.abs() @ wd.abs().T)
    assert (err <= bound).all(), f"{what}: {(err / bound).max().item():.2f} of the bound"


def test_generic_variant_is_always_available():
    assert "generic" in VARIANTS


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 2, 9, 64, 150])
def test_gemv_matches_reference(variant, fmt, tokens):
    g = torch.Generator().manual_seed(tokens)
    for shape in _shapes(fmt):
        w = _q(torch.randn(shape, generator=g) * 0.05, fmt)
        x = torch.randn(tokens, shape[1], generator=g)
        # the kernels multiply bf16 activations (BF16 at one token: fp32)
        ref = (x if _f32_path(variant, fmt, tokens) else x.bfloat16().float()) @ dequantize(w).T
        y = api.gemv(x, w, variant=variant, threads=2)
        assert y.shape == (tokens, shape[0]) and y.dtype == torch.float32
        if _fp16_path(variant, fmt, tokens):
            _assert_fp16_bound(y, x, w, f"{shape}")
            continue
        err = (y - ref).abs().max() / ref.abs().max()
        assert err < 1e-4, f"{fmt} {shape} relative error {err}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_decodes_every_code(variant):
    """All 254 finite e4m3 codes (subnormals, both zeros, the largest) in every row, permuted."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    data = torch.stack([codes[torch.randperm(len(codes), generator=g)] for _ in range(16)])
    w = QuantWeight("fp8_b128", data.view(torch.float8_e4m3fn), torch.full((1, 2), 0.5), (16, 254))
    x = torch.randn(3, 254, generator=g)
    ref = x.bfloat16().float() @ dequantize(w).T
    y = api.gemv(x, w, variant=variant)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("shape", [(256, 512), (200, 300), (3, 130, 257)])
def test_dequantize_fp8_is_bit_equal_to_torch(shape):
    w = quantize(torch.randn(shape, generator=torch.Generator().manual_seed(0)), "fp8_b128")
    assert torch.equal(api.dequantize_fp8(w), dequantize(w, torch.bfloat16))
    with pytest.raises(ValueError, match="fp8_b128"):
        api.dequantize_fp8(_q(torch.randn(64, 64), "int4_g32"))


def test_gemv_bf16_activations_and_out_buffer():
    w = _q(torch.randn(64, 256) * 0.05, "fp8_b128")
    x = torch.randn(3, 256).bfloat16()
    out = torch.full((3, 64), float("nan"))
    y = api.gemv(x, w, out=out)
    assert y is out and torch.allclose(y, x.float() @ dequantize(w).T, rtol=1e-4, atol=1e-4)


def _experts(fmt, E=8, I=96, D=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(E, I, D, generator=g) * D**-0.5, torch.randn(E, I, D, generator=g) * D**-0.5,
          torch.randn(E, D, I, generator=g) * I**-0.5]
    return [_q(w, fmt) for w in ws]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", ["dense", "fp8_b128", "int4_g32"])
@pytest.mark.parametrize("tokens", [1, 4, 17, 150])
def test_moe_forward_matches_reference(variant, fmt, tokens):
    """Decode's token counts and a prefill chunk's (150 tokens: each chosen expert has about 75,
    run in two segments, 64 and the rest)."""
    I = 96 if fmt != "int4_g32" else 128  # INT4 needs I (the down projection's input) in groups
    gate, up, down = _experts(fmt, I=I, seed=tokens)
    g = torch.Generator().manual_seed(100 + tokens)
    x = torch.randn(tokens, 256, generator=g)
    # random routings; experts 6 and 7 are never chosen, and one token picks the same expert twice
    ids = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(tokens)])
    ids[0, 1] = ids[0, 0]
    weights = torch.rand(tokens, 3, generator=g)
    ref = RoutedExperts(gate, up, down)(x.bfloat16().float(), ids, weights)
    out = api.moe_forward(x, ids, weights, gate, up, down, variant=variant, threads=2)
    # the SiLU(gate) * up activations are rounded to bf16 before the down projection
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 1e-2, f"relative error {err}"


AMX = pytest.mark.skipif(not _kernels.amx_available(), reason="this CPU (or OS) offers no AMX-BF16")


VNNI = pytest.mark.skipif(not _kernels.vnni_available(), reason="this CPU has no AVX512-VNNI")


@pytest.fixture
def amx_switch():
    """Run with AMX on, then off; leaves it (and AMX-INT8 and VNNI for INT4, FP16 for FP8) as it
    was. INT4 at one token takes VNNI before AMX, so VNNI is off unless a test switches it on."""
    was, was8, was_vnni = _kernels.amx_enabled(), _kernels.amx_int8_enabled(), _kernels.vnni_enabled()
    was16 = _kernels.fp16_enabled()
    _kernels.set_vnni(False)
    yield _kernels.set_amx
    _kernels.set_amx(was)
    _kernels.set_amx_int8(was8)
    _kernels.set_vnni(was_vnni)
    _kernels.set_fp16(was16)


@AMX
@pytest.mark.parametrize("fmt", ["fp8_b128", "dense", "int4_g128", "int4_g32"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8, 16])
def test_amx_path_matches_reference(amx_switch, fmt, tokens):
    g = torch.Generator().manual_seed(tokens)
    shapes = [(256, 512), (200, 300), (48, 7 * 64 + 2), (16, 64)]  # ragged rows, a column tail
    if fmt == "fp8_b128":  # FP8 takes AMX at two tokens only on rows of 1024 columns and more
        shapes += [(64, 1024), (40, 1090)]
    if fmt.startswith("int4"):
        shapes = [(256, 512), (200, 384), (16, 128)]
    for shape in shapes:
        w = _q(torch.randn(shape, generator=g) * 0.05, fmt)
        x = torch.randn(tokens, shape[1], generator=g)
        ref = (x if _f32_path("avx512_bf16", fmt, tokens) else x.bfloat16().float()) @ dequantize(w).T
        amx_switch(True)
        y_amx = api.gemv(x, w, variant="avx512_bf16", threads=2)
        _kernels.set_amx_int8(False)  # INT4's bf16 AMX path too, where AMX-INT8 would take it
        y_amx16 = api.gemv(x, w, variant="avx512_bf16", threads=2)
        _kernels.set_amx_int8(True)
        amx_switch(False)
        y_avx = api.gemv(x, w, variant="avx512_bf16", threads=2)
        for y in (y_amx, y_amx16, y_avx):
            if _fp16_path("avx512_bf16", fmt, tokens):
                _assert_fp16_bound(y, x, w, f"{shape}")
            else:
                assert (y - ref).abs().max() / ref.abs().max() < 1e-4, shape
        fp8_from = 2 if shape[1] >= 1024 else 3  # (one token: the vector kernel, AMX or not)
        takes_amx = tokens >= {"fp8_b128": fp8_from, "int4_g128": 1, "int4_g32": 1}.get(fmt, 3)  # (as hm_amx_applies)
        if takes_amx:
            assert not torch.equal(y_amx, y_avx) or shape[0] == 16  # (a different summation order)


BF16 = pytest.mark.skipif("avx512_bf16" not in VARIANTS, reason="needs AVX-512 BF16")


def _fp8_scaled_path(tokens):
    """FP8 in the scaled domain: at one token the vector kernel, at two the AMX kernel."""
    if tokens > 1 and not _kernels.amx_available():
        pytest.skip("this CPU (or OS) offers no AMX-BF16")


@BF16
@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("scale", [1e-20, 1e-6, 1e6, 1e9])
def test_fp8_scaled_domain_keeps_tiny_and_huge_activations(amx_switch, scale, tokens):
    """The FP8 one-token and AMX paths work in a scaled domain (weights times 2^-104, activations
    times 2^64; the FP16 kernel: weights times 2^-8, activations times a row block's scales scaled
    below 2^11):
    products must neither flush to zero nor overflow across the range activations take."""
    _fp8_scaled_path(tokens)
    g = torch.Generator().manual_seed(3)
    w = _q(torch.randn(64, 1024, generator=g), "fp8_b128")
    x = torch.randn(tokens, 1024, generator=g) * scale
    ref = x.bfloat16().float() @ dequantize(w).T
    amx_switch(True)
    _kernels.set_fp16(False)
    y = api.gemv(x, w, variant="avx512_bf16", threads=2)
    assert torch.isfinite(y).all() and ((y - ref).abs().max() / ref.abs().max()).item() < 1e-4
    if tokens == 1 and _kernels.fp16_available():
        _kernels.set_fp16(True)
        y = api.gemv(x, w, variant="avx512_bf16", threads=2)
        assert torch.isfinite(y).all()
        _assert_fp16_bound(y, x, w, f"scale {scale}")


@BF16
def test_bf16_one_token_multiplies_fp32_activations():
    """BF16 at one token multiplies the activations as given and sums in fp32 (the other BF16
    kernels round the activations to bf16, which errs by about 2^-9 of them): within 1e-5 of the
    exact result, at rows of every tail length past the last 64 and 32 columns; two tokens are the
    bf16 kernel's, within 1e-2 but not 1e-5 of it."""
    g = torch.Generator().manual_seed(7)
    for shape in [(128, 7168), (40, 300), (33, 70), (16, 32), (24, 96)]:
        w = _q(torch.randn(shape, generator=g), "dense")
        x = torch.randn(2, shape[1], generator=g)
        exact = x.double() @ dequantize(w).double().T
        errs = [((y.double() - exact[t]).abs().max() / exact[t].abs().max()).item()
                for t, y in ((0, api.gemv(x[:1], w, variant="avx512_bf16", threads=2)[0]),
                             (1, api.gemv(x, w, variant="avx512_bf16", threads=2)[1]))]
        assert errs[0] < 1e-5 and 1e-5 < errs[1] < 1e-2, (shape, errs)


@AMX
@pytest.mark.parametrize("fmt", ["int4_g128", "int4_g32"])
@pytest.mark.parametrize("tokens", [1, 2, 4, 9])
@pytest.mark.parametrize("int8", [False, True])
def test_amx_int4_offsets_with_biased_activations(amx_switch, fmt, tokens, int8):
    """Both INT4 AMX paths take an offset off per group: the bf16 path multiplies q + 136, the
    AMX-INT8 path n = q + 8 with activations split into two bytes. Activations far from zero mean
    (all positive, a large common offset, a spread of magnitudes within a block) make those
    cancellations and the 16-bit rounding as hard as they get."""
    if int8 and not _kernels.amx_int8_available():
        pytest.skip("this CPU has no AMX-INT8")
    g = torch.Generator().manual_seed(tokens)
    w = _q(torch.randn(64, 1024, generator=g), fmt)
    spread = torch.randn(tokens, 1024, generator=g) * torch.logspace(-6, 2, 1024)[torch.randperm(1024, generator=g)]
    for x in (torch.rand(tokens, 1024, generator=g), 100 + torch.randn(tokens, 1024, generator=g), spread):
        ref = x.bfloat16().double() @ dequantize(w).double().T
        amx_switch(True)
        _kernels.set_amx_int8(int8)
        y = api.gemv(x, w, variant="avx512_bf16", threads=2).double()
        assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-4


@VNNI
@AMX
@pytest.mark.parametrize("fmt", ["int4_g128", "int4_g32"])
def test_int4_two_tokens_take_amx_int8_on_long_rows(amx_switch, fmt):
    """At two tokens INT4 in groups of 128 takes VNNI on rows shorter than 4096 columns and
    AMX-INT8 from there on (which is faster there since it keeps its tile configuration); groups of
    32 take VNNI on every row: all match the reference."""
    if not _kernels.amx_int8_available():
        pytest.skip("this CPU has no AMX-INT8")
    g = torch.Generator().manual_seed(11)
    amx_switch(True)
    for cols in (2048, 4096):
        amx8 = fmt == "int4_g128" and cols >= 4096
        w = _q(torch.randn(32, cols, generator=g) * 0.05, fmt)
        x = torch.randn(2, cols, generator=g)
        ref = x.bfloat16().double() @ dequantize(w).double().T
        _kernels.set_vnni(True)
        y = api.gemv(x, w, variant="avx512_bf16", threads=2)
        _kernels.set_vnni(False)
        y_amx8 = api.gemv(x, w, variant="avx512_bf16", threads=2)
        assert torch.equal(y, y_amx8) == amx8, cols
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-3, cols


@VNNI
@pytest.mark.parametrize("fmt", ["int4_g128", "int4_g32"])
@pytest.mark.parametrize("tokens", [1, 2])
def test_int4_vnni_matches_reference(amx_switch, fmt, tokens):
    """INT4 at one and two tokens through VNNI: against the reference and the AVX-512 path, over
    shapes with ragged row counts, and activations far from zero mean or spread over eight decades
    within a block (the per-group offset and the 16-bit split are then as hard as they get)."""
    g = torch.Generator().manual_seed(5 + tokens)
    amx_switch(False)
    for shape in [(256, 512), (200, 384), (16, 128), (7, 1024)]:
        w = _q(torch.randn(shape, generator=g) * 0.05, fmt)
        cols = shape[1]
        spread = torch.randn(tokens, cols, generator=g) * torch.logspace(-6, 2, cols)[torch.randperm(cols, generator=g)]
        for x in (torch.randn(tokens, cols, generator=g), 100 + torch.randn(tokens, cols, generator=g), spread):
            xb, wd = x.bfloat16().double(), dequantize(w).double()
            ref = xb @ wd.T
            _kernels.set_vnni(True)
            y_vnni = api.gemv(x, w, variant="avx512_bf16", threads=2).double()
            _kernels.set_vnni(False)
            y_avx = api.gemv(x, w, variant="avx512_bf16", threads=2).double()
            assert ((y_avx - ref).abs().max() / ref.abs().max()).item() < 1e-4, shape
            # VNNI rounds each activation to a 16-bit integer of its 128-column block: off by at
            # most 2^-16 of the block's largest (half a step of max / 32639), plus fp32 sums
            step = xb.abs().view(tokens, -1, 128).amax(-1).repeat_interleave(128, dim=1) * 2.0**-16
            bound = step @ wd.abs().T + 1e-6 * (xb.abs() @ wd.abs().T)
            assert ((y_vnni - ref).abs() <= bound).all(), shape
            assert ((y_vnni - ref).abs().max() / ref.abs().max()).item() < 1e-3, shape
            assert not torch.equal(y_vnni, y_avx)  # it did take another path


@VNNI
@pytest.mark.parametrize("tokens", [1, 2])
def test_int4_vnni_moe_matches_reference(amx_switch, tokens):
    """The whole-layer call at one and two tokens (every active expert then has one or two tokens:
    the VNNI path)."""
    for fmt in ("int4_g128", "int4_g32"):
        gate, up, down = _experts(fmt, I=128, seed=6)
        g = torch.Generator().manual_seed(6)
        x = torch.randn(tokens, 256, generator=g)
        ids = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(tokens)])
        weights = torch.rand(tokens, 3, generator=g)
        ref = RoutedExperts(gate, up, down)(x.bfloat16().float(), ids, weights)
        amx_switch(False)
        _kernels.set_vnni(True)
        out = api.moe_forward(x, ids, weights, gate, up, down, variant="avx512_bf16", threads=2)
        assert (out - ref).abs().max() / ref.abs().max() < 1e-2


@AMX
@pytest.mark.parametrize("fmt", ["fp8_b128", "dense"])
@pytest.mark.parametrize("tokens", [17, 40, 64])
def test_amx_wide_matches_reference_and_the_narrow_kernel(amx_switch, fmt, tokens):
    """FP8 and BF16 over 16 tokens: each decoded (or loaded) block of weights multiplied by up to
    four groups of 16 tokens. Against the reference, and bit for bit against the 16-token kernel
    run on each group alone (the same decode, tile products and scaling, in the same order); the
    vector path (AMX off) is another summation."""
    g = torch.Generator().manual_seed(tokens)
    amx_switch(True)
    for shape in [(256, 512), (200, 300), (48, 7 * 64 + 2), (64, 1024), (40, 1090)]:
        w = _q(torch.randn(shape, generator=g) * 0.05, fmt)
        x = torch.randn(tokens, shape[1], generator=g)
        ref = x.bfloat16().float() @ dequantize(w).T
        y = api.gemv(x, w, variant="avx512_bf16", threads=2)
        assert (y - ref).abs().max() / ref.abs().max() < 1e-4, shape
        for t0 in range(0, tokens, 16):
            n = min(16, tokens - t0)
            if n >= 3:  # (fewer take the one- or two-token kernels)
                assert torch.equal(y[t0 : t0 + n], api.gemv(x[t0 : t0 + n], w, variant="avx512_bf16", threads=2))
        amx_switch(False)
        assert not torch.equal(y, api.gemv(x, w, variant="avx512_bf16", threads=2))
        amx_switch(True)


@BF16
@pytest.mark.parametrize("tokens", [1, 2])
def test_fp8_shift_and_table_decodes(amx_switch, tokens):
    """64-byte row chunks without a zero-exponent byte take the shift decode, the others (zeros,
    subnormals) the table decode: a weight of each kind, and one that mixes them, against the
    reference, at one token (the vector kernel) and two (AMX)."""
    _fp8_scaled_path(tokens)
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 256, (32, 1024), generator=g, dtype=torch.uint8)
    codes[(codes & 0x78) == 0] |= 0x08  # no zero exponent anywhere: the shift decode only
    codes[(codes & 0x7F) == 0x7F] ^= 1  # no NaN
    mixed = codes.clone()
    mixed[:, 512:] &= 0x87  # the second half: every byte a zero or a subnormal
    amx_switch(True)
    for data in (codes, mixed, codes & 0x87):
        w = QuantWeight("fp8_b128", data.view(torch.float8_e4m3fn), torch.rand(1, 8, generator=g) + 0.5,
                        (32, 1024))
        x = torch.randn(tokens, 1024, generator=g)
        ref = x.bfloat16().float() @ dequantize(w).T
        _kernels.set_fp16(False)
        y = api.gemv(x, w, variant="avx512_bf16", threads=2)
        assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5
        if tokens == 1 and _kernels.fp16_available():  # (its decode has one case: subnormals are fp16's)
            _kernels.set_fp16(True)
            _assert_fp16_bound(api.gemv(x, w, variant="avx512_bf16", threads=2), x, w)


@AMX
@pytest.mark.parametrize("tokens", [1, 17, 40])
@pytest.mark.parametrize("fmt", ["fp8_b128", "int4_g128", "int4_g32"])
def test_moe_forward_amx_matches_reference(amx_switch, tokens, fmt):
    gate, up, down = _experts(fmt, I=96 if fmt == "fp8_b128" else 128, seed=tokens)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 256, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3, generator=g)
    ref = RoutedExperts(gate, up, down)(x.bfloat16().float(), ids, weights)
    amx_switch(True)
    out = api.moe_forward(x, ids, weights, gate, up, down, variant="avx512_bf16", threads=2)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("I", [16, 96])
def test_moe_down_outputs_reuse_the_spent_scratch(variant, I):
    """Down's per-pair outputs [n, D] take over the room of the gathered inputs and of gate's and
    up's outputs once those are spent; with I small beside D (16 against 256) they need more room
    than those held. Both layouts match the reference, at a decode step and over two segments."""
    gate, up, down = _experts("fp8_b128", I=I, seed=I)
    g = torch.Generator().manual_seed(I)
    for tokens in (1, 150):
        x = torch.randn(tokens, 256, generator=g)
        ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)])
        weights = torch.rand(tokens, 2, generator=g)
        ref = RoutedExperts(gate, up, down)(x.bfloat16().float(), ids, weights)
        out = api.moe_forward(x, ids, weights, gate, up, down, variant=variant, threads=2)
        assert (out - ref).abs().max() / ref.abs().max() < 1e-2


def test_moe_no_expert_ids_and_split_calls(monkeypatch):
    """An id of -1 adds nothing (the reference without that pair), a call whose ids are all -1
    returns zeros, and a call beyond the scratch budget runs as several C calls with the same
    result as the reference (bf16 activations: 1e-2 of the largest output)."""
    gate, up, down = _experts("fp8_b128", seed=9)
    g = torch.Generator().manual_seed(9)
    T = 90
    x = torch.randn(T, 256, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(T)])
    weights = torch.rand(T, 3, generator=g)
    drop = torch.rand(T, 3, generator=g) < 0.4
    ref = RoutedExperts(gate, up, down)(x.bfloat16().float(), ids, weights * ~drop)
    for scratch in (api.MOE_SCRATCH_BYTES, 200_000):  # the second: about 20 tokens a C call
        monkeypatch.setattr(api, "MOE_SCRATCH_BYTES", scratch)
        bound = api.Experts(gate, up, down, threads=2)
        assert (bound.tokens_per_call(3, _kernels.VARIANT_CODES[cython_kernels.VARIANT]) < T) == (scratch < 10**6)
        out = bound(x, ids.masked_fill(drop, -1), weights)
        assert (out - ref).abs().max() / ref.abs().max() < 1e-2
    none = api.moe_forward(x[:3], torch.full((3, 3), -1), weights[:3], gate, up, down, threads=2)
    assert torch.equal(none, torch.zeros(3, 256))


def test_moe_submit_sync_overlaps_caller_work():
    gate, up, down = _experts("fp8_b128")
    x, ids, w = torch.randn(4, 256), torch.randint(0, 8, (4, 2)), torch.rand(4, 2)
    pool = api.MoEPool(threads=2)
    try:
        fut = pool.submit(x, ids, w, gate, up, down)
        other = torch.randn(64, 64) @ torch.randn(64, 64)  # the caller keeps working meanwhile
        out = pool.sync(fut)
    finally:
        pool.close()
    assert other.shape == (64, 64)
    assert torch.equal(out, api.moe_forward(x, ids, w, gate, up, down, threads=2))


def test_moe_bad_expert_ids_raise_before_any_work():
    """The ids' range is checked by the C call (no torch reduction in decode's path): a direct call
    raises, a submitted one raises at sync, and the pool goes on working."""
    gate, up, down = _experts("fp8_b128")
    x, w = torch.randn(2, 256), torch.rand(2, 2)
    for bad in ([[0, 1], [-2, 2]], [[0, 1], [8, 2]]):
        with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 8\)"):
            api.moe_forward(x, torch.tensor(bad), w, gate, up, down, threads=2)
    pool = api.MoEPool(threads=2)
    try:
        with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 8\)"):
            pool.sync(pool.submit(x, torch.tensor([[0, 9], [1, 2]]), w, gate, up, down))
        ok = torch.tensor([[0, 7], [1, 2]])
        assert torch.equal(pool.sync(pool.submit(x, ok, w, gate, up, down)),
                           api.moe_forward(x, ok, w, gate, up, down, threads=2))
    finally:
        pool.close()


def test_bad_input_raises_clear_errors():
    w = _q(torch.randn(64, 256) * 0.05, "fp8_b128")
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match=r"activations must be \[tokens, 256\]"):
        api.gemv(torch.randn(2, 128), w)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        api.gemv(x.double(), w)
    with pytest.raises(ValueError, match="1 to any number of tokens"):
        api.gemv(torch.randn(0, 256), w)
    with pytest.raises(ValueError, match="must be contiguous"):
        api.gemv(x, QuantWeight("fp8_b128", w.data.t().contiguous().t(), w.scale, w.shape))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        api.gemv(x, QuantWeight("fp8_b128", w.data.view(torch.uint8), w.scale, w.shape))
    with pytest.raises(ValueError, match="scales must be"):
        api.gemv(x, QuantWeight("fp8_b128", w.data, w.scale[:, :1].contiguous(), w.shape))
    buf = torch.empty(64 * 256 + 1, dtype=torch.uint8)[1:].view(torch.float8_e4m3fn).view(64, 256)
    buf.copy_(w.data)
    with pytest.raises(ValueError, match="64-byte aligned"):
        api.gemv(x, QuantWeight("fp8_b128", buf, w.scale, w.shape))
    with pytest.raises(ValueError, match="bfloat16"):
        api.gemv(x, QuantWeight("dense", torch.randn(64, 256), None, (64, 256)))
    with pytest.raises(ValueError, match="out must be"):
        api.gemv(x, w, out=torch.empty(2, 63))
    gate, up, down = _experts("fp8_b128")
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 8\)"):
        api.moe_forward(x, torch.tensor([[0, 8], [1, 2]]), torch.rand(2, 2), gate, up, down)
    with pytest.raises(ValueError, match="int64"):
        api.moe_forward(x, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), torch.rand(2, 2), gate, up, down)
    with pytest.raises(ValueError, match=r"\[E, I, D\], \[E, I, D\], \[E, D, I\]"):
        api.moe_forward(x, torch.tensor([[0, 1], [1, 2]]), torch.rand(2, 2), gate, up, up)
    with pytest.raises(ValueError, match="not a kernel variant|not supported"):
        api.gemv(x, w, variant="sse9")


@pytest.mark.parametrize("fmt", ["int4_g128", "int4_g32", "fp8_b128"])
def test_gemv_layout_built_in_shares_over_threads(fmt):
    """A call's threads build the activations' kernel layout a share of its 128-column blocks each:
    more threads than blocks, as many, and fewer give the same outputs, and the reference's."""
    g = torch.Generator().manual_seed(3)
    for cols in (128, 384, 1024):
        w = _q(torch.randn(48, cols, generator=g) * 0.05, fmt)
        for tokens in (1, 2, 4, 8):
            x = torch.randn(tokens, cols, generator=g)
            ref = x.bfloat16().double() @ dequantize(w).double().T
            ys = [api.gemv(x, w, threads=n).double() for n in (1, 2, 3, 8)]
            for y in ys:
                if _fp16_path(cython_kernels.VARIANT, fmt, tokens):
                    _assert_fp16_bound(y.float(), x, w, f"{cols}")
                else:
                    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-4, (cols, tokens)
            assert all(torch.equal(y, ys[0]) for y in ys), (cols, tokens)  # rows are a tile's own


def test_read_sum_is_exact_over_sizes_and_threads():
    """The benchmarks' bandwidth reader: every word counted once, tails and all, whatever the split."""
    b = torch.arange(100_000, dtype=torch.int64)
    for n in (0, 1, 7, 8, 999, 8191, 8192, 8193, 99_999):
        for threads in (1, 2, 3):
            assert _kernels.read_sum(b.data_ptr(), 8 * n, threads) == b[:n].sum().item()


def test_kernel_bench_huge_page_read_only_where_huge_pages_were_granted(monkeypatch, tmp_path):
    """The 2 MB-page read is reported only where the kernel allows transparent huge pages and the
    buffer got them; elsewhere None, not a 4 KB-page read under that name."""
    from cython_kernels import bench

    thp = tmp_path / "enabled"
    thp.write_text("always madvise [never]\n")
    assert bench.huge_page_read_bandwidth(2, thp, 32 << 20) is None
    assert bench.huge_page_read_bandwidth(2, tmp_path / "missing", 32 << 20) is None
    thp.write_text("always [madvise] never\n")
    monkeypatch.setattr(bench, "_time", lambda fn, copies, min_seconds=0.3: (fn(0), 0.01)[1])
    monkeypatch.setattr(bench, "_anon_huge_bytes", lambda: 0)
    assert bench.huge_page_read_bandwidth(2, thp, 32 << 20) is None
    monkeypatch.setattr(bench, "_anon_huge_bytes", lambda: 32 << 20)
    assert bench.huge_page_read_bandwidth(2, thp, 32 << 20) == pytest.approx((32 << 20) / 0.01 / 1e9)


def test_kernel_bench_holds_each_problem_to_a_read_of_its_own_bytes(monkeypatch):
    """``hybridmoe bench kernels``' bookkeeping: each record's fraction is of the fastest plain read
    beside it, of the same weight copies (a MoE layer: of the experts each routing chose) or of the
    machine-bandwidth buffer, both of which the record reports."""
    from cython_kernels import bench

    quick = bench._time
    reads = []
    real_read = bench.read_bandwidth

    def read(tensors, threads, passes=2):
        reads.append(sum(t.numel() * t.element_size() for t in tensors))
        return real_read(tensors, threads, passes)

    monkeypatch.setattr(bench, "COPY_BYTES", 1 << 20)
    monkeypatch.setattr(bench, "_time", lambda fn, copies, min_seconds=0.3: quick(fn, copies, 0.005))
    monkeypatch.setattr(bench, "PASS_SECONDS", 0.005)
    monkeypatch.setattr(bench, "READ_SECONDS", 0.005)
    monkeypatch.setattr(bench, "read_bandwidth", read)
    rows = bench.bench_gemv("int4_g128", (64, 256), 2, cython_kernels.VARIANT)
    assert [r["tokens"] for r in rows] == list(bench.TOKENS)
    # the kernel's time (a C loop) and the API call's, which torch's is compared with
    assert all(0 < r["us"] and 0 < r["api_us"] for r in rows)
    one = 64 * 256 // 2 + 64 * 2 * 2  # an INT4 g128 copy: nibbles and bf16 scales
    assert reads == [(1 << 20) // one * one] * (2 * len(bench.TOKENS))  # before and after each, every copy
    for r in rows:  # no machine read given: held to its own bytes'
        assert r["bandwidth_gbps"] == r["own_bytes_gbps"] > 0
        assert r["fraction_of_bandwidth"] == pytest.approx(r["gbps"] / r["bandwidth_gbps"])
    machine = []

    def fast_machine():  # a roofline buffer that reads faster than any weight copy
        machine.append(1)
        return 1e6

    rows = bench.bench_gemv("int4_g128", (64, 256), 2, cython_kernels.VARIANT, fast_machine)
    assert len(machine) == 2 * len(bench.TOKENS)  # before and after each problem
    for r in rows:
        assert r["bandwidth_gbps"] == 1e6 and 0 < r["own_bytes_gbps"] < 1e6
        assert r["fraction_of_bandwidth"] == pytest.approx(r["gbps"] / 1e6)
    rows = bench.bench_gemv("int4_g128", (64, 256), 2, cython_kernels.VARIANT, lambda: 1e-6)  # a slow one
    assert all(r["bandwidth_gbps"] == r["own_bytes_gbps"] > 1e-6 for r in rows)
    reads.clear()
    rows = bench.bench_moe("int4_g128", 8, 128, 256, 2, 2, cython_kernels.VARIANT)
    assert len(reads) == 2 * len(bench.TOKENS) and all(r["bandwidth_gbps"] > 0 for r in rows)
    # a MoE layer's roofline reads the chosen experts' weights, routing by routing (16 routings)
    expert = 3 * 128 * 256 // 2
    for i, r in enumerate(rows):
        chosen = reads[2 * i] // expert
        assert reads[2 * i] == reads[2 * i + 1] == chosen * expert
        assert 16 * 2 <= chosen <= 16 * min(8, 2 * r["tokens"])
    assert all(r["fraction_of_bandwidth"] == pytest.approx(r["gbps"] / r["bandwidth_gbps"]) for r in rows)
    rows = bench.bench_moe("int4_g128", 8, 128, 256, 2, 2, cython_kernels.VARIANT, fast_machine)
    assert all(r["bandwidth_gbps"] == 1e6 and r["own_bytes_gbps"] < 1e6 for r in rows)


@BF16
@pytest.mark.parametrize("rows", [1, 5, 13, 37, 132])
def test_fp8_one_token_rows(amx_switch, rows):
    """At one token FP8 rows take a vector kernel (FP16 or bf16) one after the other, AMX or not:
    row counts across a scale-block edge, column counts with a tail and a half scale block."""
    g = torch.Generator().manual_seed(rows)
    for cols in (64, 300, 768, 1090):
        w = _q(torch.randn(rows, cols, generator=g), "fp8_b128")
        x = torch.randn(1, cols, generator=g)
        ref = x.bfloat16().double() @ dequantize(w).double().T
        for amx in (True, False):
            amx_switch(amx)
            _kernels.set_fp16(False)
            y = api.gemv(x, w, variant="avx512_bf16", threads=2).double()
            assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5, cols
            if _kernels.fp16_available():
                _kernels.set_fp16(True)
                _assert_fp16_bound(api.gemv(x, w, variant="avx512_bf16", threads=2), x, w, f"{rows}x{cols}")


FP16 = pytest.mark.skipif(not _kernels.fp16_available(), reason="this CPU (or the compiler) has no AVX512-FP16")


@FP16
def test_fp8_fp16_decodes_every_code(amx_switch):
    """The FP16 kernel's shift decode: all 254 finite e4m3 codes (subnormals, both zeros, the
    largest) in every row, permuted, rows whose first byte is each code in turn (the even bytes
    come from a load one byte early, masked at a row's start)."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    data = torch.stack([codes[torch.randperm(len(codes), generator=g)] for _ in range(254)])
    data[:, 0] = codes  # each code first in some row
    w = QuantWeight("fp8_b128", data.view(torch.float8_e4m3fn), torch.rand(2, 2, generator=g) + 0.5, (254, 254))
    x = torch.randn(1, 254, generator=g)
    _kernels.set_fp16(True)
    y = api.gemv(x, w, variant="avx512_bf16", threads=2)
    _assert_fp16_bound(y, x, w)
    _kernels.set_fp16(False)
    assert not torch.equal(y, api.gemv(x, w, variant="avx512_bf16", threads=2))  # it took the other kernel


@FP16
def test_fp8_fp16_more_accurate_than_bf16(amx_switch):
    """Against the fp32 activations the FP16 kernel (activations to 11 bits, sums in fp16 sixteen
    to a lane) errs less than the bf16 one (activations to 8 bits): measured about 4x at these shapes;
    asserted 2x. The whole-layer call at one token (each expert one token) too."""
    g = torch.Generator().manual_seed(2)
    for shape in [(256, 2048), (64, 7168), (100, 1090)]:
        w = _q(torch.randn(shape, generator=g) * 0.05, "fp8_b128")
        x = torch.randn(1, shape[1], generator=g)
        ref = x.double() @ dequantize(w).double().T
        errs = []
        for on in (True, False):
            _kernels.set_fp16(on)
            errs.append(((api.gemv(x, w, variant="avx512_bf16", threads=2).double() - ref).abs().max()).item())
        assert errs[0] < 0.5 * errs[1], (shape, errs)
    gate, up, down = _experts("fp8_b128", I=256, D=1024, seed=2)
    x, ids, weights = torch.randn(1, 1024, generator=g), torch.tensor([[1, 4, 6]]), torch.rand(1, 3, generator=g)
    exact = [QuantWeight("dense", dequantize(q).double(), None, tuple(q.shape)) for q in (gate, up, down)]
    experts = RoutedExperts(*exact)
    ref = experts(x.double(), ids, weights.double())
    errs = []
    for on in (True, False):
        _kernels.set_fp16(on)
        errs.append((api.moe_forward(x, ids, weights, gate, up, down, variant="avx512_bf16", threads=2).double()
                     - ref).abs().max().item())
    assert errs[0] < 0.5 * errs[1], errs


@FP16
def test_fp8_fp16_largest_sums_stay_finite(amx_switch):
    """Activations times their block scales are scaled per row block so that the largest is below
    2^11: weights all at e4m3's largest (448) with every activation at that bound make each lane's
    sixteen products (256 columns, folded to 16 lanes) sum to under 16 x 1.75 x 2^11 = 57344, under
    fp16's 65504; the result is finite and within the bound. Activations from 2^-100 to 2^100 scale
    the same way."""
    data = torch.full((32, 1024), 0x7E, dtype=torch.uint8)
    data[1::2] |= 0x80  # odd rows all -448
    w = QuantWeight("fp8_b128", data.view(torch.float8_e4m3fn), torch.ones(1, 8), (32, 1024))
    _kernels.set_fp16(True)
    for e in (-100, -3, 0, 5, 13, 100):
        x = torch.full((1, 1024), 2.0**e * (1 - 2**-20))
        y = api.gemv(x, w, variant="avx512_bf16", threads=2)
        assert torch.isfinite(y).all(), e
        _assert_fp16_bound(y, x, w, f"2^{e}")


@FP16
def test_fp8_fp16_folds_each_row_blocks_scales(amx_switch):
    """The FP16 kernel multiplies the activations by each 128-row block's scales (a copy per row
    block, kept by each thread while its call runs): block scales spread over twelve orders of
    magnitude, three weights of one call with scales of their own, and the same weights called
    again with other activations (whose copies must not be taken for the first call's)."""
    g = torch.Generator().manual_seed(5)
    ws = []
    for rows in (384, 130, 256):
        w = _q(torch.randn(rows, 1090, generator=g), "fp8_b128")
        ws.append(QuantWeight("fp8_b128", w.data, 10.0 ** (torch.rand(w.scale.shape, generator=g) * 12 - 6), w.shape))
    _kernels.set_fp16(True)
    for seed in range(3):
        x = torch.randn(1, 1090, generator=torch.Generator().manual_seed(seed)) * 10.0 ** (seed - 1)
        y = api.gemv_multi(x, ws, variant="avx512_bf16", threads=2)
        for w, part in zip(ws, y.split([w.shape[0] for w in ws], dim=1), strict=True):
            _assert_fp16_bound(part, x, w, f"call {seed}, {list(w.shape)}")
        _assert_fp16_bound(api.gemv(x, ws[0], variant="avx512_bf16", threads=3), x, ws[0], f"alone, call {seed}")
    # a MoE call at one token: the down projection's row block goes through each chosen expert's scales
    gate, up, down = _experts("fp8_b128", E=24, I=256, D=384, seed=5)
    down = QuantWeight("fp8_b128", down.data, 10.0 ** (torch.rand(down.scale.shape, generator=g) * 6 - 3), down.shape)
    x, ids = torch.randn(1, 384, generator=g), torch.randperm(24, generator=g)[:20][None]
    weights = torch.rand(1, 20, generator=g)
    exact = [QuantWeight("dense", dequantize(q).double(), None, tuple(q.shape)) for q in (gate, up, down)]
    ref = RoutedExperts(*exact)(x.double(), ids, weights.double())
    out = api.moe_forward(x, ids, weights, gate, up, down, variant="avx512_bf16", threads=2).double()
    assert (out - ref).abs().max() / ref.abs().max() < 1e-2


@FP16
def test_fp8_fp16_reads_nothing_before_the_weight(amx_switch):
    """The even bytes' load starts a byte before the chunk; at a row's first chunk that byte is
    masked off. A weight placed right after a page that may not be read: a read there would kill
    the process."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    data = torch.frombuffer(buf, dtype=torch.uint8, count=16 * 128, offset=page).view(16, 128)
    data.copy_(_q(torch.randn(16, 128), "fp8_b128").data.view(torch.uint8))
    w = QuantWeight("fp8_b128", data.view(torch.float8_e4m3fn), torch.ones(1, 1), (16, 128))
    x = torch.randn(1, 128)
    assert libc.mprotect(base, page, 0) == 0, ctypes.get_errno()  # PROT_NONE
    try:
        _kernels.set_fp16(True)
        y = api.gemv(x, w, variant="avx512_bf16", threads=2)
    finally:
        libc.mprotect(base, page, 3)  # PROT_READ | PROT_WRITE
    _assert_fp16_bound(y, x, w)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_gemv_multi_equals_separate_calls(variant, fmt, tokens):
    """Several weights in one call (decode's q, k, v): bit for bit the separate calls, each in its
    own columns, with row counts that are not multiples of the 16-row tile."""
    g = torch.Generator().manual_seed(tokens)
    ws = [_q(torch.randn(rows, 256, generator=g) * 0.05, fmt) for rows in (40, 16, 7)]
    x = torch.randn(tokens, 256, generator=g)
    y = api.gemv_multi(x, ws, variant=variant, threads=2)
    assert y.shape == (tokens, 63)
    assert torch.equal(y, torch.cat([api.gemv(x, w, variant=variant, threads=2) for w in ws], dim=1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_past_64_tokens_equals_its_segments(variant, fmt):
    """Past 64 tokens a call runs them 64 at a time inside each tile of rows (the weights read
    once): bit for bit the calls on each run of 64 (and the rest) alone, several weights at once."""
    g = torch.Generator().manual_seed(3)
    ws = [_q(torch.randn(rows, 256, generator=g) * 0.05, fmt) for rows in (40, 7)]
    x = torch.randn(150, 256, generator=g)
    y = api.gemv_multi(x, ws, variant=variant, threads=2)
    assert torch.equal(y, torch.cat([api.gemv_multi(x[i : i + 64], ws, variant=variant, threads=2)
                                     for i in range(0, 150, 64)]))


def test_kernel_bench_timing_loops_run_the_kernel_and_the_read():
    """The bench's C timing loops (timing.h): the GEMV loop calls the kernel on the copies in turn
    (the output is the last one's product); the read loop times a read of the spans."""
    from cython_kernels import bench

    g = torch.Generator().manual_seed(5)
    ws = [_q(torch.randn(48, 256, generator=g) * 0.05, "int4_g128") for _ in range(3)]
    bound = [api.Gemv([w], threads=2) for w in ws]
    x, out = torch.randn(2, 256, generator=g), torch.full((2, 48), float("nan"))
    assert bench.kernel_seconds(bound, x, out, 2, cython_kernels.VARIANT, passes=1) > 0
    assert torch.equal(out, api.gemv(x, ws[-1], variant=cython_kernels.VARIANT, threads=2))
    code = _kernels.VARIANT_CODES[cython_kernels.VARIANT]
    with pytest.raises(ValueError, match="time_gemv"):
        _kernels.time_gemv(code, [], x.data_ptr(), 2, out.data_ptr(), 2, 0.001)
    with pytest.raises(ValueError, match=r"out must be a contiguous CPU float32 \[2, 48\]"):
        bench.kernel_seconds(bound, x, torch.empty(1, 48), 2, cython_kernels.VARIANT, passes=1)
    b = torch.ones(1 << 16, dtype=torch.int64)
    assert _kernels.time_read([(b.data_ptr(), 8 << 16), (b.data_ptr(), 64)], 2, 0.001) > 0
    assert _kernels.time_read([], 2, 0.001) > 0  # (nothing to read: empty rounds, still timed)


def test_bound_gemv_quick_checks_refuse_what_the_full_ones_do():
    """A bound GEMV checks x and out with a few tensor attributes (api._is_f32_matrix) and takes a
    contiguous fp32 x as it is (a 2-D bf16 one widened in one call); anything else still goes
    through the full checks: converted where it can be (strided, one row), refused with the same
    errors where not."""
    g = torch.Generator().manual_seed(4)
    w = _q(torch.randn(40, 256, generator=g) * 0.05, "fp8_b128")
    bound = api.Gemv([w], threads=2)
    x = torch.randn(3, 256, generator=g)
    assert api._activations(x, 256, "t", max_tokens=None) is x
    ref = bound(x)
    strided = torch.randn(256, 3, generator=g).t()  # [3, 256], not contiguous
    assert not strided.is_contiguous()
    assert torch.equal(bound(strided), bound(strided.contiguous()))
    widened = api._activations(strided.bfloat16(), 256, "t", max_tokens=None)
    assert widened.is_contiguous() and widened.dtype == torch.float32
    assert torch.equal(widened, strided.bfloat16().float())
    assert torch.equal(bound(strided.bfloat16()), bound(strided.bfloat16().float()))
    assert torch.equal(bound(x[1]), bound(x[1:2]))  # one row given as a vector
    with pytest.raises(ValueError, match="1 to 4 tokens per call"):
        api._activations(torch.randn(5, 256), 256, "t", max_tokens=4)
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match="on the CPU"):
            bound(torch.empty(1, 256, dtype=dtype, device="meta"))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        bound(x.half())
    for bad in (torch.empty(3, 40, dtype=torch.bfloat16), torch.empty(40, 3).t(), torch.empty(3, 41),
                torch.empty(2, 40), torch.empty(3, 40, device="meta")):
        with pytest.raises(ValueError, match=r"out must be a contiguous CPU float32 \[3, 40\]"):
            bound(x, bad)
    out = torch.empty(3, 40)
    assert bound(x, out) is out and torch.equal(out, ref)


def test_gemv_multi_bad_input():
    g = torch.Generator().manual_seed(0)
    a, b = _q(torch.randn(32, 256, generator=g), "fp8_b128"), _q(torch.randn(32, 256, generator=g), "int4_g128")
    c = _q(torch.randn(32, 128, generator=g), "fp8_b128")
    x = torch.randn(1, 256)
    with pytest.raises(ValueError, match="differ in format or input size"):
        api.gemv_multi(x, [a, b])
    with pytest.raises(ValueError, match="differ in format or input size"):
        api.gemv_multi(x, [a, c])
    with pytest.raises(ValueError, match="1 to 16 weights"):
        api.gemv_multi(x, [])
    with pytest.raises(ValueError, match=r"activations must be \[tokens, 256\]"):
        api.gemv_multi(torch.randn(1, 100), [a])


def test_bound_gemv_and_experts_equal_the_one_call_forms():
    """api.Gemv and api.Experts check their weights once and then only each call's activations:
    the same results as gemv_multi / moe_forward over calls of different sizes, the pool takes
    a bound layer, and bad activations still raise."""
    g = torch.Generator().manual_seed(3)
    ws = [_q(torch.randn(rows, 256, generator=g) * 0.05, "fp8_b128") for rows in (40, 7)]
    bound = api.Gemv(ws, threads=2)
    assert (bound.rows, bound.cols) == (47, 256)
    for tokens in (1, 5, 1):
        x = torch.randn(tokens, 256, generator=g)
        assert torch.equal(bound(x), api.gemv_multi(x, ws, threads=2))
    out = torch.empty(2, 47)
    x = torch.randn(2, 256, generator=g).bfloat16()
    assert bound(x, out) is out and torch.equal(out, api.gemv_multi(x, ws, threads=2))
    with pytest.raises(ValueError, match=r"activations must be \[tokens, 256\]"):
        bound(torch.randn(1, 255))
    with pytest.raises(ValueError, match=r"out must be a contiguous CPU float32 \[1, 47\]"):
        bound(torch.randn(1, 256), torch.empty(1, 46))
    with pytest.raises(ValueError, match="not supported here|not a kernel variant"):
        api.Gemv(ws, variant="avx9000")

    gate, up, down = _experts("fp8_b128")
    ex = api.Experts(gate, up, down, threads=2)
    pool = api.MoEPool(threads=2)
    try:
        for tokens in (1, 3):
            x, ids, w = torch.randn(tokens, 256, generator=g), torch.randint(0, 8, (tokens, 2), generator=g), \
                torch.rand(tokens, 2, generator=g)
            want = api.moe_forward(x, ids, w, gate, up, down, threads=2)
            assert torch.equal(ex(x, ids, w), want)
            assert torch.equal(pool.sync(pool.submit(x, ids, w, ex)), want)
        with pytest.raises(ValueError, match="bound Experts carry their weights"):
            pool.submit(x, ids, w, ex, up, down)
        with pytest.raises(ValueError, match=r"routing weights must be CPU float32 \[3, 2\]"):
            pool.submit(x, ids, w.double(), ex)
    finally:
        pool.close()
    with pytest.raises(ValueError, match=r"expert ids must be CPU int64 \[3, k\]"):
        ex(x, ids.int(), w)
    with pytest.raises(ValueError, match=r"must be \[E, I, D\], \[E, I, D\], \[E, D, I\]"):
        api.Experts(gate, down, up)
