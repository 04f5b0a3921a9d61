"""The kernels' decode ops (the residual add + RMSNorm, GQA's q/k norm + rotary, a softmax
router's top-k, one call each) against the torch sequences they replace, and the runner's use of
them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from logits import assert_paths_agree

from cython_kernels import api
from shared.layers import GQAttention, Rotary, SoftmaxTopKRouter, rms_norm


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """bf16: equal to the bit (the same roundings in the same order). fp32: the sum of squares runs
    in another order than torch's vector reduction, so within a few ulps."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.bfloat16:
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    else:
        torch.testing.assert_close(a, b, rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D", [(1, 2048), (5, 7), (3, 7168), (0, 64)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_torch(dtype, N, D, with_delta):
    g = torch.Generator().manual_seed(N * 7 + D)
    x = (torch.randn(N, D, generator=g) * 3).to(dtype)
    delta = torch.randn(N, D, generator=g).to(dtype) if with_delta else None
    w = (torch.rand(D, generator=g) + 0.5).to(dtype)
    s, y = api.add_rms_norm(x, delta, w, 1e-6)
    ref_s = x + delta if with_delta else x
    _close(s, ref_s)
    _close(y, rms_norm(ref_s, w, 1e-6))
    if not with_delta:
        assert s is x
    else:  # a block's fp32 sums as the delta: rounded to x's dtype, then added
        d32 = delta.float() + torch.randn(N, D, generator=g) * 1e-3
        s, y = api.add_rms_norm(x, d32, w, 1e-6)
        ref_s = x + d32.to(dtype)
        _close(s, ref_s)
        _close(y, rms_norm(ref_s, w, 1e-6))


def _gqa(H, K, Dh, D, dtype, normed, interleaved, seed):
    g = torch.Generator().manual_seed(seed)
    w = {f"a.{n}": (torch.randn(rows, D, generator=g) * D**-0.5).to(dtype)
         for n, rows in (("q_proj", H * Dh), ("k_proj", K * Dh), ("v_proj", K * Dh), ("o_proj", D))}
    if normed:
        w["a.q_norm.weight"] = (torch.rand(Dh, generator=g) + 0.5).to(dtype)
        w["a.k_norm.weight"] = (torch.rand(Dh, generator=g) + 0.5).to(dtype)
    rotary = Rotary({"rope_theta": 1e6, "rope_type": "default"}, Dh, interleaved)
    return GQAttention(w, "a", H, K, Dh, rotary, 1e-6 if normed else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normed", [True, False])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("H,K,Dh,N", [(32, 4, 128, 1), (4, 2, 48, 3), (6, 6, 64, 2)])
def test_qk_norm_rope_matches_project(dtype, normed, interleaved, H, K, Dh, N):
    """From the projections' fp32 sums to queries and cache entries: what GQAttention.project
    computes after its linears (which round to the dtype first)."""
    D = 96
    attn = _gqa(H, K, Dh, D, dtype, normed, interleaved, seed=H + Dh + N)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, D, generator=g).to(dtype)
    positions = torch.tensor([0, 4095, 17][:N])
    y = torch.cat([F.linear(h.float(), w.float()) for w in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=1)
    # the reference rounds y as its linears would; feed it the same sums
    ref_q, ref_kv = _project_from(attn, y, positions, dtype)
    cos, sin = attn.rotary.cos_sin(positions, dtype)
    norms = {} if not normed else {"q_weight": attn.q_norm.weight, "k_weight": attn.k_norm.weight, "eps": 1e-6}
    q, kv = api.qk_norm_rope(y, H, K, Dh, cos, sin, dtype, interleaved=interleaved, **norms)
    _close(q, ref_q)
    _close(kv, ref_kv)
    # straight into rows of a cache (wider than an entry): the same entries there, nothing else
    # touched, the same queries
    cache = torch.full((9, 2 * K * Dh + 5), 7.0, dtype=dtype)
    rows = torch.tensor([6, 0, 8][:N])
    q2, back = api.qk_norm_rope(y, H, K, Dh, cos, sin, dtype, interleaved=interleaved, kv_out=cache, kv_rows=rows,
                                **norms)
    assert back is cache and torch.equal(q2, q)
    assert torch.equal(cache[rows, : 2 * K * Dh], kv)
    rest = torch.ones(9, dtype=torch.bool)
    rest[rows] = False
    assert (cache[rest] == 7).all() and (cache[:, 2 * K * Dh :] == 7).all()


def _project_from(attn: GQAttention, y: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """GQAttention.project with its linears replaced by the given fp32 sums."""
    import shared.layers as layers

    parts = y.to(dtype).split([attn.heads * attn.head_dim] + 2 * [attn.kv_heads * attn.head_dim], dim=1)
    original = layers.linears
    layers.linears = lambda x, ws: tuple(p[None] for p in parts)
    try:
        return attn.project(torch.zeros(y.shape[0], 1, dtype=dtype), positions)
    finally:
        layers.linears = original


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("N,E,k", [(1, 128, 8), (3, 8, 2), (2, 5, 5), (0, 4, 1)])
def test_softmax_topk_matches_router(dtype, norm, N, E, k):
    """The router's softmax, top-k and division on the gate linear's sums: the same experts, weights
    within fp32's rounding (exp and the sum run in another order than torch's). Compared in id
    order: bf16 logits tie often, and torch.topk orders ties as it likes."""
    D = 64
    g = torch.Generator().manual_seed(E + k)
    router = SoftmaxTopKRouter(torch.randn(E, D, generator=g).to(dtype), k, norm)
    h = (torch.randn(N, D, generator=g) * 2).to(dtype)
    ref_ids, ref_w = router(h)
    ids, w = api.softmax_topk(F.linear(h.float(), router.weight.float()), k, norm, dtype)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == w.shape == (N, k)
    assert (w[:, :-1] >= w[:, 1:]).all()  # largest first
    ids, order = ids.sort(dim=1)
    ref_ids, ref_order = ref_ids.sort(dim=1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-5, atol=1e-7)


def test_softmax_topk_ties_and_extremes():
    """Ties go to the lower id; huge logits do not overflow (the max is taken out first)."""
    ids, w = api.softmax_topk(torch.tensor([[1.0, 3.0, 3.0, 3.0, -1.0], [1e30, 0.0, 1e30, -1e30, 5.0]]), 3, False,
                              torch.float32)
    assert ids.tolist() == [[1, 2, 3], [0, 2, 1]]  # (the rest underflow to 0 alike: the lowest id)
    assert torch.isfinite(w).all() and w[1, :2].tolist() == [0.5, 0.5] and w[1, 2] == 0


def test_decode_ops_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="x must be a .rows, dim. tensor"):
        api.add_rms_norm(torch.randn(8), None, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="delta: expected a contiguous CPU torch.float32 \\[2, 8\\]"):
        api.add_rms_norm(x, torch.randn(2, 8).bfloat16(), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="weight: expected"):
        api.add_rms_norm(x, None, torch.ones(9), 1e-6)
    with pytest.raises(ValueError, match="x: expected a contiguous"):
        api.add_rms_norm(torch.randn(8, 2).T, None, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="x: expected"):
        api.add_rms_norm(torch.randn(2, 8).half(), None, torch.ones(8).half(), 1e-6)
    y, cs = torch.randn(1, 6 * 16), torch.randn(1, 8)
    with pytest.raises(ValueError, match="4 heads over 3 kv heads"):
        api.qk_norm_rope(y, 4, 3, 16, cs, cs, torch.float32)
    with pytest.raises(ValueError, match="dim 15"):
        api.qk_norm_rope(y, 4, 1, 15, cs, cs, torch.float32)
    with pytest.raises(ValueError, match="y: expected a contiguous CPU torch.float32 \\[1, 96\\]"):
        api.qk_norm_rope(torch.randn(1, 95), 4, 1, 16, cs, cs, torch.float32)
    with pytest.raises(ValueError, match="cos: expected"):
        api.qk_norm_rope(y, 4, 1, 16, cs.bfloat16(), cs, torch.float32)
    with pytest.raises(ValueError, match="both norm weights or neither"):
        api.qk_norm_rope(y, 4, 1, 16, cs, cs, torch.float32, q_weight=torch.ones(16))
    with pytest.raises(ValueError, match="dtype must be"):
        api.qk_norm_rope(y, 4, 1, 16, cs, cs, torch.float16)
    cache = torch.zeros(4, 2 * 16)
    with pytest.raises(ValueError, match="kv_out and kv_rows together"):
        api.qk_norm_rope(y, 4, 1, 16, cs, cs, torch.float32, kv_out=cache)
    with pytest.raises(ValueError, match="kv_out must be a .rows, width >= 32. tensor"):
        api.qk_norm_rope(y, 4, 1, 16, cs, cs, torch.float32, kv_out=torch.zeros(4, 31), kv_rows=torch.tensor([0]))
    with pytest.raises(ValueError, match="kv_out: expected a contiguous CPU torch.float32"):
        api.qk_norm_rope(y, 4, 1, 16, cs, cs, torch.float32, kv_out=cache.bfloat16(), kv_rows=torch.tensor([0]))
    with pytest.raises(ValueError, match="kv_rows must be a contiguous CPU int64 \\[1\\]"):
        api.qk_norm_rope(y, 4, 1, 16, cs, cs, torch.float32, kv_out=cache, kv_rows=torch.tensor([0, 1]))
    for bad in (4, -1):  # outside the cache: raises before it writes
        with pytest.raises(ValueError, match="cache rows must lie in \\[0, 4\\)"):
            api.qk_norm_rope(y, 4, 1, 16, cs, cs, torch.float32, kv_out=cache, kv_rows=torch.tensor([bad]))
        assert (cache == 0).all()
    with pytest.raises(ValueError, match="k must lie in \\[1, 4\\]"):
        api.softmax_topk(torch.randn(2, 4), 5, True, torch.float32)
    with pytest.raises(ValueError, match="logits: expected a contiguous CPU torch.float32"):
        api.softmax_topk(torch.randn(2, 4).bfloat16(), 2, True, torch.bfloat16)
    with pytest.raises(ValueError, match="logits must be"):
        api.softmax_topk(torch.randn(4), 2, True, torch.float32)


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-mixtral"])
def test_engine_decode_ops_match_torch_sequences(tiny_models, preset, monkeypatch):
    """The decode engine with the decode ops (its default with the kernel experts) and without:
    the same tokens, logits that agree (assert_paths_agree), and the ops are called when on (q/k norm and
    rotary, and the router's top-k, for the GQA models with softmax routers)."""
    from services.engine.decode import DecodeEngine
    from shared.model import load_model
    from shared.sampling import SamplingParams

    calls = {"add_rms_norm": 0, "qk_norm_rope": 0, "softmax_topk": 0}
    for name in calls:
        original = getattr(api, name)
        monkeypatch.setattr(api, name, lambda *a, _f=original, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1)
                            or _f(*a, **k))
    results = []
    for on in (True, False):
        m = load_model(tiny_models[preset, "fp8"], dtype=torch.float32)
        eng = DecodeEngine(m, num_blocks=64, block_size=4, experts="kernel", keep_logits=True)
        assert eng.runner.decode_ops
        eng.runner.decode_ops = on
        for k in calls:
            calls[k] = 0
        for i, n in enumerate((5, 13, 2)):
            eng.add(str(i), list(range(3, 3 + n)), SamplingParams(max_tokens=6, ignore_eos=True))
        results.append(eng.run_all())
        assert (calls["add_rms_norm"] > 0) == on
        assert (calls["qk_norm_rope"] > 0) == (on and preset != "tiny-deepseek-v3")  # (MLA: torch's)
        assert (calls["softmax_topk"] > 0) == (on and preset != "tiny-deepseek-v3")  # (group-limited: torch's)
    assert_paths_agree(*results)


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-mixtral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_paged_step_equals_per_segment_path(tiny_models, preset, dtype, monkeypatch):
    """A decode step of one-token sequences writes its new entries straight into the paged cache
    (qk_norm_rope's kv_out) and reads attention there, with what every layer needs made once per
    step: the same logits, to the bit, as writing each segment's entries through its cache and
    attending per cache; and it is taken (and only for one-token steps)."""
    from services.engine.decode import DecodeEngine
    from shared.model import load_model
    from shared.sampling import SamplingParams

    direct = [0]
    original = api.qk_norm_rope
    monkeypatch.setattr(api, "qk_norm_rope", lambda *a, **k: direct.__setitem__(0, direct[0] + ("kv_out" in k))
                        or original(*a, **k))
    results = []
    for fast in (True, False):
        m = load_model(tiny_models[preset, "fp8"], dtype=dtype)
        eng = DecodeEngine(m, num_blocks=64, block_size=4, experts="kernel", keep_logits=True)
        if not eng.runner.paged_attention:
            pytest.skip("the kernels' paged attention needs an AVX-512 variant")
        eng.runner.fused_layers = False  # (the whole-layer call: test_engine_fused_layer_equals_the_op_calls)
        if not fast:
            monkeypatch.setattr(eng.runner, "_paged_step", lambda mb: None)
        direct[0] = 0
        for i, n in enumerate((5, 13, 2)):
            eng.add(str(i), list(range(3, 3 + n)), SamplingParams(max_tokens=6, ignore_eos=True))
        results.append(eng.run_all())
        layers = len(m.layers)
        # the prompts' step (several tokens a segment) takes the per-segment path; then 5 steps
        # of one token each
        assert direct[0] == (5 * layers if fast else 0)
    for rid, events in results[0].items():
        other = results[1][rid]
        assert [e.token for e in events] == [e.token for e in other]
        assert all(torch.equal(a.logits, b.logits) for a, b in zip(events, other, strict=True))


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-mixtral"])
@pytest.mark.parametrize("overlap", [False, True])
def test_engine_fused_layer_equals_the_op_calls(tiny_models, preset, overlap, monkeypatch):
    """A decode step through api.DecodeLayer (attention, post-attention norm and routing of a GQA
    layer in one kernel call) gives the logits of the op-by-op calls to the bit, with the
    dual-batch overlap on and off; it is taken for every layer of every one-token step."""
    from services.engine.decode import DecodeEngine
    from shared.model import load_model
    from shared.sampling import SamplingParams

    calls = [0]
    original = api.DecodeLayer.__call__
    monkeypatch.setattr(api.DecodeLayer, "__call__", lambda self, *a: calls.__setitem__(0, calls[0] + 1)
                        or original(self, *a))
    results = []
    for fused in (True, False):
        m = load_model(tiny_models[preset, "fp8"], dtype=torch.bfloat16)
        eng = DecodeEngine(m, num_blocks=64, block_size=4, experts="kernel", keep_logits=True, overlap=overlap)
        if not eng.runner.paged_attention:
            pytest.skip("the kernels' paged attention needs an AVX-512 variant")
        assert eng.runner.fused_layers
        eng.runner.fused_layers = fused
        calls[0] = 0
        for i, n in enumerate((5, 13, 2)):
            eng.add(str(i), list(range(3, 3 + n)), SamplingParams(max_tokens=6, ignore_eos=True))
        results.append(eng.run_all())
        eng.close()
        micro_batches = 2 if overlap else 1
        assert calls[0] == (5 * len(m.layers) * micro_batches if fused else 0)
    for rid, events in results[0].items():
        other = results[1][rid]
        assert [e.token for e in events] == [e.token for e in other]
        assert all(torch.equal(a.logits, b.logits) for a, b in zip(events, other, strict=True))


def _decode_layer(dtype=torch.bfloat16, H=4, K=2, dh=16, D=64, E=8, k=2):
    from shared.quant import QuantWeight

    g = torch.Generator().manual_seed(5)
    w = {n: (torch.randn(r, c, generator=g) * c**-0.5).to(torch.bfloat16)
         for n, (r, c) in {"q": (H * dh, D), "k": (K * dh, D), "v": (K * dh, D), "o": (D, H * dh),
                           "router": (E, D)}.items()}
    norms = [(1 + 0.1 * torch.randn(n, generator=g)).to(dtype) for n in (D, D, dh, dh)]
    layer = api.DecodeLayer(*(QuantWeight("dense", t, None, tuple(t.shape)) for t in w.values()), norms[0], 1e-6,
                            norms[1], 1e-5, heads=H, kv_heads=K, head_dim=dh, top_k=k, norm_topk=True, dtype=dtype,
                            q_norm=norms[2], k_norm=norms[3], qk_eps=1e-6)
    return layer, w, norms


def test_decode_layer_equals_the_op_calls_and_rejects_bad_input():
    """api.DecodeLayer against the one-op API calls it chains, on two sequences of a paged cache:
    the same residual, norm, routing and cache entries to the bit; bad input raises clearly, and a
    row or block id outside the cache raises before the cache is touched."""
    dtype, H, K, dh, D = torch.bfloat16, 4, 2, 16, 64
    layer, w, (n1, n2, qn, kn) = _decode_layer(dtype)
    g = torch.Generator().manual_seed(6)
    cache = torch.randn(8 * 4, 2 * K * dh, generator=g).to(dtype)
    blocks = [torch.tensor([3, 1]), torch.tensor([5])]
    lengths, rows = [6, 3], torch.tensor([1 * 4 + 1, 5 * 4 + 2])
    tokens = api.PagedTokens(blocks, lengths, 4, rows)
    x = torch.randn(2, D, generator=g).to(dtype)
    delta = torch.randn(2, D, generator=g)
    cos, sin = torch.rand(2, dh // 2, generator=g).to(dtype), torch.rand(2, dh // 2, generator=g).to(dtype)
    ref_cache = cache.clone()
    x_out, h, ids, wts = layer(x, delta, cos, sin, cache, tokens)
    s1, h1 = api.add_rms_norm(x, delta, n1, 1e-6)
    y = api.gemv_multi(h1, [api.QuantWeight("dense", w[n], None, tuple(w[n].shape)) for n in "qkv"])
    q, _ = api.qk_norm_rope(y, H, K, dh, cos, sin, dtype, q_weight=qn, k_weight=kn, eps=1e-6, kv_out=ref_cache,
                            kv_rows=rows)
    o = api.decode_attention_batch(q, ref_cache, blocks, 4, lengths, kv_heads=K, k_off=0, k_head=dh, v_off=K * dh,
                                   v_head=dh, dv=dh, scale=dh**-0.5)
    od = api.gemv(o.flatten(1), api.QuantWeight("dense", w["o"], None, tuple(w["o"].shape)))
    s2, h2 = api.add_rms_norm(s1, od, n2, 1e-5)
    logits = api.gemv(h2, api.QuantWeight("dense", w["router"], None, tuple(w["router"].shape)))
    ref_ids, ref_w = api.softmax_topk(logits, 2, True, dtype)
    assert torch.equal(cache, ref_cache) and torch.equal(x_out, s2) and torch.equal(h, h2)
    assert torch.equal(ids, ref_ids) and torch.equal(wts, ref_w)

    with pytest.raises(ValueError, match="x: expected a contiguous CPU torch.bfloat16 \\[2, 64\\]"):
        layer(x.float(), delta, cos, sin, cache, tokens)
    with pytest.raises(ValueError, match="cos: expected"):
        layer(x, delta, cos[:1], sin, cache, tokens)
    with pytest.raises(ValueError, match="cache must be a .rows, width >= 64. tensor"):
        layer(x, delta, cos, sin, cache[:, :32].contiguous(), tokens)
    with pytest.raises(ValueError, match="tokens must be PagedTokens"):
        layer(x, delta, cos, sin, cache, (blocks, lengths))
    with pytest.raises(ValueError, match="at least 2 ids"):
        api.PagedTokens([torch.tensor([3]), torch.tensor([5])], lengths, 4, rows)
    with pytest.raises(ValueError, match="rows must be a contiguous CPU int64 \\[2\\]"):
        api.PagedTokens(blocks, lengths, 4, rows[:1])
    before = cache.clone()
    for bad in (api.PagedTokens(blocks, lengths, 4, torch.tensor([5, 32])),  # a row past the cache
                api.PagedTokens([torch.tensor([3, 8]), torch.tensor([5])], lengths, 4, rows)):  # a block past it
        with pytest.raises(ValueError, match="must lie in the cache's 32 rows"):
            layer(x, delta, cos, sin, cache, bad)
        assert torch.equal(cache, before)
    with pytest.raises(ValueError, match="do not fit 4 x 1 heads of 16"):
        api.DecodeLayer(*(api.QuantWeight("dense", w[n], None, tuple(w[n].shape)) for n in "qvko"),
                        api.QuantWeight("dense", w["router"], None, (8, 64)), n1, 1e-6, n2, 1e-6, heads=4,
                        kv_heads=1, head_dim=16, top_k=2, norm_topk=True, dtype=dtype)
    with pytest.raises(ValueError, match="top_k must lie in \\[1, 8\\]"):
        _decode_layer(k=9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_absorbed_form_equals_expanded(tiny_models, dtype):
    """MLA's absorbed decode (attention over the cached latents through W_UK and W_UV) against the
    expanded form (per-head K and V through kv_b_proj), a few queries at the end of a sequence. In
    bf16 on the CPU the absorbed form computes in fp32 over W_UK and W_UV copied once (kept while
    kv_b_proj is the same tensor); in fp32 they are views of kv_b_proj."""
    from shared.model import load_model

    attn = load_model(tiny_models["tiny-deepseek-v3", "bf16"], dtype=dtype).layers[0].attn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, attn.a.hidden_size, generator=g).to(dtype)
    q, entries = attn.project(x, torch.arange(9))
    for t in (1, 3):
        absorbed = attn.attend(q[-t:], entries, absorbed=True)
        expanded = attn.attend(q[-t:], entries)
        assert absorbed.dtype == dtype and absorbed.shape == expanded.shape
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(absorbed.float(), expanded.float(), rtol=tol, atol=tol)
    w_uk, w_uv = attn.absorbed_weights()
    assert w_uk.dtype == torch.float32 and attn.absorbed_weights()[0] is w_uk
    assert (w_uk.data_ptr() == attn.kv_b_proj.data_ptr()) == (dtype == torch.float32)
