"""The kernels' decode attention (one new token read in place from a paged cache) against the
torch reference (shared.layers.decode_attention over the gathered blocks), for every variant this
machine runs, and its use by the decode engine."""

from __future__ import annotations

import pytest
import torch
from logits import assert_paths_agree

import cython_kernels
from cython_kernels import api
from shared.layers import decode_attention

VARIANTS = cython_kernels.supported_variants()


def _case(L, K, G, dk, dv, bs, dtype, seed, layout="gqa"):
    """A shuffled paged cache holding L positions, its block table, q, and the reference output."""
    g = torch.Generator().manual_seed(seed)
    n = -(-L // bs)
    if layout == "gqa":  # keys then values, head after head
        width, kw = 2 * K * dk, dict(kv_heads=K, k_off=0, k_head=dk, v_off=K * dk, v_head=dk, dv=dk)
    else:  # MLA's absorbed form: one kv head, the value is the first dv elements of the key
        width, kw = dk, dict(kv_heads=1, k_off=0, k_head=0, v_off=0, v_head=0, dv=dv)
    cache = (torch.randn((n + 3) * bs, width, generator=g) * 2).to(dtype)
    blocks = torch.randperm(n + 3, generator=g)[:n].contiguous()
    q = torch.randn(K * G, dk, generator=g).to(dtype)
    kv = cache.view(-1, bs, width).index_select(0, blocks).flatten(0, 1)[:L].float()
    if layout == "gqa":
        k, v = kv.view(L, 2, K, dk).permute(1, 2, 0, 3)
        ref = decode_attention(q.float()[None], k, v, dk**-0.5)[0].view(K * G, dk)
    else:  # (decode_attention takes values as wide as keys)
        ref = torch.softmax(q.float() @ kv.T * dk**-0.5, dim=-1) @ kv[:, :dv]
    return q, cache, blocks, kw, ref


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,K,G,dk,bs", [
    (1, 4, 8, 128, 16),      # one position
    (37, 2, 4, 64, 16),      # a partial block
    (528, 4, 8, 128, 16),    # Qwen3-30B-A3B's heads, items split over threads
    (300, 1, 3, 48, 7),      # an odd group, a block size that is no power of two, 3 vectors a head
    (2100, 2, 5, 32, 32),    # many items, merged
])
def test_decode_attention_matches_reference(variant, dtype, L, K, G, dk, bs):
    q, cache, blocks, kw, ref = _case(L, K, G, dk, dk, bs, dtype, seed=L)
    for threads in (1, 2):
        out = api.decode_attention(q, cache, blocks, bs, L, scale=dk**-0.5, variant=variant, threads=threads, **kw)
        assert out.shape == (K * G, dk) and out.dtype == torch.float32
        assert (out - ref).abs().max().item() < 2e-6 * ref.abs().max().item() + 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_attention_mla_layout(variant):
    """MLA's absorbed form is one kv head whose value is the head of its key (576 and 512 wide):
    the same kernel, other offsets."""
    q, cache, blocks, kw, ref = _case(70, 1, 16, 576, 512, 16, torch.bfloat16, seed=5, layout="mla")
    out = api.decode_attention(q, cache, blocks, 16, 70, scale=576**-0.5, variant=variant, **kw)
    assert (out - ref).abs().max().item() < 2e-6 * ref.abs().max().item() + 1e-6


def test_decode_attention_extreme_scores():
    """Scores far apart (one position dominating, others underflowing to zero weight) and an empty
    sequence."""
    q, cache, blocks, kw, _ = _case(100, 2, 2, 64, 64, 16, torch.float32, seed=9)
    cache = cache * 30  # scores in the thousands
    kv = cache.view(-1, 16, cache.shape[1]).index_select(0, blocks).flatten(0, 1)[:100]
    k, v = kv.view(100, 2, 2, 64).permute(1, 2, 0, 3)
    ref = decode_attention(q[None], k, v, 64**-0.5)[0].view(4, 64)
    out = api.decode_attention(q, cache, blocks, 16, 100, scale=64**-0.5, **kw)
    assert torch.isfinite(out).all() and (out - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    empty = api.decode_attention(q, cache, blocks, 16, 0, scale=1.0, **kw)
    assert torch.equal(empty, torch.zeros(4, 64))


def test_decode_attention_bad_input():
    q, cache, blocks, kw, _ = _case(40, 2, 2, 64, 64, 16, torch.float32, seed=1)
    call = dict(scale=0.125, **kw)
    with pytest.raises(ValueError, match=r"q must be a CPU float32/bfloat16 \[heads, dk\]"):
        api.decode_attention(q[None], cache, blocks, 16, 40, **call)
    with pytest.raises(ValueError, match="cache must be a contiguous"):
        api.decode_attention(q, cache.t(), blocks, 16, 40, **call)
    with pytest.raises(ValueError, match="do not split over"):
        api.decode_attention(q[:3], cache, blocks, 16, 40, **call)
    with pytest.raises(ValueError, match="overrun entries"):
        api.decode_attention(q, cache, blocks, 16, 40, **{**call, "v_off": 200})
    with pytest.raises(ValueError, match="at least 3 ids"):
        api.decode_attention(q, cache, blocks[:2], 16, 40, **call)
    with pytest.raises(ValueError, match="int64"):
        api.decode_attention(q, cache, blocks.int(), 16, 40, **call)
    with pytest.raises(ValueError, match="block ids must lie in"):
        api.decode_attention(q, cache, torch.tensor([0, 1, 99]), 16, 40, **call)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        api.decode_attention(q, cache, blocks, 0, 40, **call)


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-mixtral"])
def test_engine_uses_paged_attention_and_matches_gathered(tiny_models, preset, monkeypatch):
    """The decode engine's one-token steps read attention in place (where the vector kernel runs)
    and produce the same tokens and logits as the gathered torch path (see assert_paths_agree)."""
    from services.engine.decode import DecodeEngine
    from shared.layers import GQAttention
    from shared.model import load_model
    from shared.sampling import SamplingParams

    calls = []
    original = GQAttention.attend_paged
    monkeypatch.setattr(GQAttention, "attend_paged", lambda self, *a: calls.append(1) or original(self, *a))
    results = []
    for paged in (True, False):
        m = load_model(tiny_models[preset, "fp8"], dtype=torch.float32)
        eng = DecodeEngine(m, num_blocks=64, block_size=4, experts="kernel", keep_logits=True)
        if paged and not eng.runner.paged_attention:
            pytest.skip("this CPU has no AVX-512: the engine keeps torch's attention")
        eng.runner.paged_attention = paged
        calls.clear()
        for i, n in enumerate((5, 13, 2)):
            eng.add(str(i), list(range(3, 3 + n)), SamplingParams(max_tokens=6, ignore_eos=True))
        results.append(eng.run_all())
        assert bool(calls) == paged
    assert_paths_agree(*results)


def test_engine_paged_attention_bf16_first_steps(tiny_models):
    """With a bf16 model the cache is bf16: the first decode steps' logits through the kernel
    match the gathered torch path to bf16's resolution (both take scores and sums in fp32)."""
    from services.engine.decode import DecodeEngine
    from shared.model import load_model
    from shared.sampling import SamplingParams

    logits = []
    for paged in (True, False):
        m = load_model(tiny_models["tiny-qwen3-moe", "fp8"], dtype=torch.bfloat16)
        eng = DecodeEngine(m, num_blocks=64, block_size=4, experts="kernel", keep_logits=True)
        if paged and not eng.runner.paged_attention:
            pytest.skip("this CPU has no AVX-512: the engine keeps torch's attention")
        eng.runner.paged_attention = paged
        eng.add("r", list(range(3, 20)), SamplingParams(max_tokens=2, ignore_eos=True))
        logits.append([e.logits for e in eng.run_all()["r"]])
    for a, b in zip(*logits, strict=True):
        assert (a - b).abs().max().item() <= 0.02 * a.abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_batch_equals_one_at_a_time(variant, dtype):
    """Several sequences of one cache in one call (lengths 1 to 700, one empty) give each
    sequence's own result."""
    g = torch.Generator().manual_seed(7)
    K, G, Dh, bs = 2, 4, 64, 16
    lengths = [37, 0, 700, 1, 129]
    nblk = sum(-(-n // bs) for n in lengths) + 2
    cache = torch.randn(nblk * bs, 2 * K * Dh, generator=g).to(dtype)
    perm, tables, at = torch.randperm(nblk, generator=g), [], 0
    for n in lengths:
        tables.append(perm[at : at + -(-n // bs)].contiguous())
        at += -(-n // bs)
    q = torch.randn(len(lengths), K * G, Dh, generator=g).to(dtype)
    kw = dict(kv_heads=K, k_off=0, k_head=Dh, v_off=K * Dh, v_head=Dh, dv=Dh, scale=Dh**-0.5, variant=variant)
    out = api.decode_attention_batch(q, cache, tables, bs, lengths, threads=2, **kw)
    assert out.shape == (len(lengths), K * G, Dh)
    for i, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(out[i], torch.zeros(K * G, Dh))
            continue
        kv = cache.view(-1, bs, 2 * K * Dh).index_select(0, tables[i]).flatten(0, 1)[:n].float()
        k, v = kv.view(n, 2, K, Dh).permute(1, 2, 0, 3)
        ref = decode_attention(q[i].float()[None], k, v, Dh**-0.5)[0].view(K * G, Dh)
        assert (out[i] - ref).abs().max().item() < 2e-6 * ref.abs().max().item() + 1e-6
    with pytest.raises(ValueError, match="need as many block tables and lengths"):
        api.decode_attention_batch(q, cache, tables[:2], bs, lengths, **kw)
