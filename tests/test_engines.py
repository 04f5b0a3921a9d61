"""The engines against the full-sequence forward of the foundation issue: stream-loading prefill
(chunked, expert-parallel), paged decode with continuous batching and dual-batch overlap."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from services.engine.bench import step_bytes
from services.engine.decode import DecodeEngine
from services.engine.experts import place_except_experts
from services.engine.prefill import PrefillEngine
from shared.layers import MoE, QuantLinear
from shared.model import load_model
from shared.sampling import SamplingParams

PRESETS = ("tiny-deepseek-v3", "tiny-qwen3-moe", "tiny-mixtral")


def _model(tiny_models, preset, quant="fp8"):
    return load_model(tiny_models[preset, quant], dtype=torch.float32)


def _prompt(model, n, seed):
    return torch.randint(0, model.embed.shape[0], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_prefill_equals_forward(tiny_models, preset, chunk):
    m = _model(tiny_models, preset)
    prompt = _prompt(m, 23, 0)
    ref = m(torch.tensor([prompt]))[0]
    seen = []
    eng = PrefillEngine(m, chunk_size=chunk, copy_on_cpu=chunk != 64)
    res = eng.prefill(prompt, on_kv=lambda layer, start, e: seen.append((layer, start, e.shape[0])), all_logits=True)
    eng.close()
    assert (res.logits - ref).abs().max() < 1e-4
    assert res.choice.token == int(ref[-1].argmax())
    assert len(res.kv) == len(m.layers) and all(t.shape[0] == 23 for t in res.kv)
    # the callback saw every layer of every chunk, covering the prompt exactly once per layer
    for layer in range(len(m.layers)):
        spans = sorted((s, n) for li, s, n in seen if li == layer)
        assert sum(n for _, n in spans) == 23 and spans[0][0] == 0


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("quant", ["fp8", "int4_g32"])
@pytest.mark.parametrize("chunk,copy", [(3, True), (64, False)])
def test_kernel_prefill_matches_reference(tiny_models, preset, quant, chunk, copy):
    """Prefill's experts through the CPU kernels (FP8 and INT4 as stored, bf16 activations)
    against the dequantized full forward, chunked and whole, the ring copying or not; and "auto"
    picks the kernels for a bf16 model and torch for an fp32 one."""
    m = _model(tiny_models, preset, quant)
    prompt = _prompt(m, 23, 4)
    ref = m(torch.tensor([prompt]))[0]
    eng = PrefillEngine(m, chunk_size=chunk, copy_on_cpu=copy, experts="kernel")
    res = eng.prefill(prompt, all_logits=True)
    eng.close()
    assert eng.experts == "kernel" and PrefillEngine(m).experts == "torch"
    assert ((res.logits - ref).abs().max(-1).values / ref.abs().max(-1).values).max() < 2e-2
    assert PrefillEngine(load_model(tiny_models[preset, quant])).experts == "kernel"  # (bf16)


def test_prefill_experts_choice_is_checked(tiny_models):
    m = _model(tiny_models, "tiny-qwen3-moe", "bf16")  # fp32 dense experts: no kernel takes them
    with pytest.raises(ValueError, match="cannot run this model"):
        PrefillEngine(m, experts="kernel")
    with pytest.raises(ValueError, match="experts must be"):
        PrefillEngine(m, experts="cpu")
    assert PrefillEngine(m).experts == "torch"


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("quant", ["bf16", "fp8", "int4_g32"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_prefill_then_decode_teacher_forced(tiny_models, preset, quant, block_size):
    """Logits of every decoded token equal the full forward of prompt + tokens so far."""
    m = _model(tiny_models, preset, quant)
    prompt = _prompt(m, 11, 1)
    pre = PrefillEngine(m, chunk_size=4).prefill(prompt, SamplingParams(max_tokens=7))
    eng = DecodeEngine(m, num_blocks=64, block_size=block_size, experts="torch", keep_logits=True)
    eng.add("r", prompt, SamplingParams(max_tokens=7), kv=pre.kv, first=pre.choice)
    events = eng.run_all()["r"]
    assert len(events) == 6 and events[-1].finish_reason == "length"
    seq = prompt + [pre.choice.token] + [e.token for e in events]
    ref = m(torch.tensor([seq]))[0]
    for i, e in enumerate(events):
        assert (e.logits - ref[len(prompt) + i]).abs().max() < 1e-4
        assert e.token == int(ref[len(prompt) + i].argmax())
    assert eng.kv_usage() == 0


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("quant", ["fp8", "int4_g32"])
@pytest.mark.parametrize("overlap", [False, True])
def test_kernel_decode_matches_reference(tiny_models, preset, quant, overlap):
    """The CPU kernels (bf16 products) against the dequantized reference, overlap on and off."""
    m = _model(tiny_models, preset, quant)
    eng = DecodeEngine(m, num_blocks=64, block_size=4, experts="kernel", overlap=overlap, keep_logits=True)
    prompts = [_prompt(m, n, n) for n in (4, 9, 6)]
    for i, p in enumerate(prompts):
        eng.add(str(i), p, SamplingParams(max_tokens=5))
    out = eng.run_all()
    eng.close()
    for i, p in enumerate(prompts):
        seq = p + [e.token for e in out[str(i)]]
        ref = m(torch.tensor([seq]))[0]
        for j, e in enumerate(out[str(i)]):
            want = ref[len(p) - 1 + j]
            assert (e.logits - want).abs().max() / want.abs().max() < 2e-2


def test_hybrid_placement_moves_all_but_the_routed_experts(tiny_models):
    """decode.device on a GPU: every weight but the routed experts moves (here to the meta device,
    which any machine has), the experts stay in host memory, and a tied weight stays one tensor."""
    m = load_model(tiny_models["tiny-deepseek-v3", "fp8"])
    m._buffers["lm_head"] = m.embed  # tie them
    experts = {id(t) for layer in m.layers if isinstance(layer.ffn, MoE) for t in layer.ffn.experts.buffers()}
    assert any(isinstance(mod, QuantLinear) for mod in m.modules())
    place_except_experts(m, "meta")
    for name, buf in m.named_buffers(remove_duplicate=False):
        routed = ".experts." in name and ".shared_experts." not in name
        assert buf.device.type == ("cpu" if routed else "meta"), name
        assert (id(buf) in experts) == routed, name
    assert m.lm_head is m.embed and len(experts) > 0
    # FP8 linears are dequantized once on the device, to the model's dtype
    assert not any(isinstance(mod, QuantLinear) for mod in m.modules())
    assert m.layers[0].attn.o_proj.dtype == m.dtype


def _dequantized(model):
    """The model with its quantized linears replaced by their dense weights (what loading did
    before FP8 linears stayed FP8)."""
    for mod in list(model.modules()):
        for name, child in list(mod._modules.items()):
            if isinstance(child, QuantLinear):
                del mod._modules[name]
                mod.register_buffer(name, child.dense(model.dtype))
    return model


@pytest.mark.parametrize("preset", PRESETS)
def test_fp8_linears_stay_fp8_and_decode_reads_them_so(tiny_models, preset, monkeypatch):
    """An FP8 checkpoint's attention, shared-expert and dense-layer weights load as stored
    (QuantLinear, one byte a weight in the decode step's bytes) and decode's kernel GEMV reads them
    so (bf16), its logits those of the full forward; a CPU prefill engine keeps their dense form
    after first use, with the logits of a model whose linears were dequantized at load."""
    path = tiny_models[preset, "fp8"]
    m = load_model(path, dtype=torch.bfloat16)
    quant = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    assert quant and all(q.fmt == "fp8_b128" and q.data.dtype == torch.float8_e4m3fn for q in quant)
    attn = m.layers[0].attn
    assert isinstance(attn.o_proj, QuantLinear)
    dense = _dequantized(load_model(path, dtype=torch.bfloat16))
    assert step_bytes(dense) - step_bytes(m) == sum(q.data.numel() - q.scale.numel() * 4 for q in quant)

    from cython_kernels import api

    fmts = []
    original = api.Gemv.__call__
    monkeypatch.setattr(api.Gemv, "__call__", lambda self, *a: fmts.append(self.weights[0].fmt) or original(self, *a))
    prompts = [_prompt(m, n, n) for n in (5, 11, 3, 70)]  # (70: the GEMV's rows past 64, in segments)
    ref = load_model(path, dtype=torch.float32)
    gaps = {}
    for name, model in (("fp8", m), ("dense", dense)):
        fmts.clear()
        eng = DecodeEngine(model, num_blocks=128, block_size=4, experts="kernel", keep_logits=True)
        for i, p in enumerate(prompts):
            eng.add(str(i), p, SamplingParams(max_tokens=5, ignore_eos=True))
        results = eng.run_all()
        eng.close()
        assert ("fp8_b128" in fmts) == (name == "fp8")
        # teacher-forced against the fp32 forward of the same (dequantized) weights
        gaps[name] = []
        for rid, events in results.items():
            p = prompts[int(rid)]
            full = ref(torch.tensor([p + [e.token for e in events]]))[0]
            for j, e in enumerate(events):
                want = full[len(p) - 1 + j]
                gaps[name].append(float((e.logits - want).abs().max() / want.abs().max()))
        gaps[name].sort()
    # bf16's rounding, the same for both paths but for the order of the sums: the FP8 path as
    # close to the reference as the dense one, at the median step (a rounding can flip a near-tied
    # routing choice, and that step then differs more; a path that computed something else would
    # be off at every step)
    median = {k: v[len(v) // 2] for k, v in gaps.items()}
    assert median["fp8"] < 1.5 * median["dense"] + 2e-3 and median["fp8"] < 2e-2, gaps

    eng = PrefillEngine(m, chunk_size=8)
    got = eng.prefill(prompts[1], all_logits=True).logits
    eng.close()
    assert all(q.keep_dense and q._dense is not None for q in quant)
    eng = PrefillEngine(dense, chunk_size=8)
    want = eng.prefill(prompts[1], all_logits=True).logits
    eng.close()
    assert torch.equal(got, want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no CUDA device is visible")
def test_decode_on_cuda_without_a_gpu_is_refused_clearly(tiny_models):
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        DecodeEngine(_model(tiny_models, "tiny-mixtral"), num_blocks=8, experts="kernel", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("overlap", [False, True])
def test_gpu_attention_with_cpu_kernel_experts(tiny_models, preset, overlap):
    """decode.device = cuda: attention, dense parts and the paged cache on the GPU, the routed
    experts in host memory through the CPU kernels; a prefilled request (KV made on the CPU) and
    short prompts together, teacher-forced against the CPU reference forward."""
    ref = _model(tiny_models, preset)
    m = _model(tiny_models, preset)
    eng = DecodeEngine(m, num_blocks=64, block_size=4, experts="kernel", overlap=overlap, keep_logits=True,
                       device="cuda")
    assert m.embed.is_cuda and eng.cache.layers[0].is_cuda
    assert all(not t.is_cuda for layer in m.layers if isinstance(layer.ffn, MoE) for t in layer.ffn.experts.buffers())
    prompts = [_prompt(ref, n, n) for n in (4, 9, 6)]
    pre = PrefillEngine(ref, chunk_size=4).prefill(prompts[1])
    for i, p in enumerate(prompts):
        kw = {"kv": pre.kv, "first": pre.choice} if i == 1 else {}
        eng.add(str(i), p, SamplingParams(max_tokens=5), **kw)
    out = eng.run_all()
    eng.close()
    for i, p in enumerate(prompts):
        gen = ([pre.choice.token] if i == 1 else []) + [e.token for e in out[str(i)]]
        logits = ref(torch.tensor([p + gen]))[0]
        first = len(p) if i == 1 else len(p) - 1  # the row that predicted the first event's token
        for j, e in enumerate(out[str(i)]):
            want = logits[first + j]
            assert (e.logits - want).abs().max() / want.abs().max() < 2e-2


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("overlap", [False, True])
def test_batch_equals_alone(tiny_models, preset, overlap):
    m = _model(tiny_models, preset)
    prompts = [_prompt(m, n, 10 + n) for n in (3, 12, 5, 8, 1)]

    def run(batch, overlap_):
        eng = DecodeEngine(m, num_blocks=128, block_size=4, experts="kernel", overlap=overlap_)
        for i, p in batch:
            eng.add(str(i), p, SamplingParams(max_tokens=6))
        out = eng.run_all()
        eng.close()
        return {k: [e.token for e in v] for k, v in out.items()}

    alone = {}
    for i, p in enumerate(prompts):
        alone.update(run([(i, p)], False))
    assert run(list(enumerate(prompts)), overlap) == alone


def test_streamer_overlaps_copy_with_compute_and_never_overwrites_a_slot_in_use(tiny_models):
    m = _model(tiny_models, "tiny-qwen3-moe")
    eng = PrefillEngine(m, chunk_size=3, depth=2, copy_on_cpu=True)
    eng.prefill(_prompt(m, 9, 2))
    trace = eng.streamer.trace
    eng.close()
    n_moe = len(eng.streamer.order)
    def where(kind):
        return [i for i, (k, *_) in enumerate(trace) if k == kind]

    issues, loads, starts, ends = where("copy_issue"), where("copy_start"), where("compute_start"), where("compute_end")
    assert len(loads) == len(starts) == len(ends) == 3 * n_moe  # every MoE layer of every chunk streamed once
    assert [trace[i][1] for i in loads] == [trace[i][1] for i in starts]  # in the order computed
    for j in range(len(loads) - 1):  # copy j + 1 was under way before compute j began
        assert issues[j + 1] < starts[j]
    for j in range(len(loads) - 2):  # copy j + 2 reuses compute j's slot: only once compute j is done
        assert trace[loads[j + 2]][2] >= trace[ends[j]][2]


def test_streamer_refuses_an_out_of_plan_layer(tiny_models):
    m = _model(tiny_models, "tiny-mixtral")
    eng = PrefillEngine(m, depth=2)
    eng.streamer.begin(1)
    with pytest.raises(RuntimeError, match="stream plan expects"):
        eng.streamer.acquire(eng.streamer.order[-1] + 1)


def _ep_worker(rank, world, path, init_file, prompt, out, experts="torch"):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = load_model(path, dtype=torch.float32)
        eng = PrefillEngine(m, chunk_size=4, group=dist.group.WORLD, copy_on_cpu=True, experts=experts,
                            threads=1)
        res = eng.prefill(prompt, all_logits=True)
        eng.close()
        if rank == 0:
            torch.save({"logits": res.logits, "kv": res.kv, "range": eng.expert_range}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("preset,experts", [("tiny-deepseek-v3", "torch"), ("tiny-qwen3-moe", "torch"),
                                            ("tiny-qwen3-moe", "kernel")])
def test_expert_parallel_prefill_two_ranks_equals_one(tiny_models, preset, experts, tmp_path):
    """Each rank computes its experts' share (with the kernels: the other ranks' choices passed as
    -1, no expert) and the all-reduce sums them. With torch the sums come out as one rank's to
    1e-4; the kernels round their activations to bf16, so a share's fp32 sum in another order can
    move a rounding by a step: 2e-3 of the largest logit."""
    m = _model(tiny_models, preset)
    prompt = _prompt(m, 10, 3)
    one = PrefillEngine(m, chunk_size=4, experts=experts).prefill(prompt, all_logits=True)
    out = tmp_path / "rank0.pt"
    mp.spawn(_ep_worker, args=(2, str(tiny_models[preset, "fp8"]), str(tmp_path / "init"), prompt, str(out), experts),
             nprocs=2, join=True)
    two = torch.load(out)
    E = m.layers[-1].ffn.experts.num_experts
    assert two["range"] == (0, E // 2)  # rank 0 streamed only half of the experts
    tol = 1e-4 if experts == "torch" else 2e-3 * one.logits.abs().max()
    assert (two["logits"] - one.logits).abs().max() < tol
    for a, b in zip(two["kv"], one.kv, strict=True):
        assert (a - b).abs().max() < (1e-4 if experts == "torch" else 2e-3 * b.abs().max())


def test_admission_waits_for_capacity_and_abort_frees(tiny_models):
    m = _model(tiny_models, "tiny-qwen3-moe")
    eng = DecodeEngine(m, num_blocks=4, block_size=4, experts="torch")  # 16 tokens in all
    eng.add("a", _prompt(m, 6, 4), SamplingParams(max_tokens=4))  # needs 3 blocks
    eng.add("b", _prompt(m, 3, 5), SamplingParams(max_tokens=4))  # needs 2: must wait for a
    eng.step()
    assert [r.id for r in eng.running] == ["a"] and [r.id for r in eng.waiting] == ["b"]
    assert eng.kv_usage() == 0.75
    assert eng.abort("a") and not eng.abort("nope")
    assert eng.kv_usage() == 0
    eng.step()
    assert [r.id for r in eng.running] == ["b"]
    out = eng.run_all()
    assert len(out["b"]) == 3 and out["b"][-1].finish_reason == "length"
    assert eng.kv_usage() == 0 and not eng.has_work


def test_sampling_controls(tiny_models):
    m = _model(tiny_models, "tiny-deepseek-v3")
    prompt = _prompt(m, 5, 6)
    eng = DecodeEngine(m, num_blocks=64, block_size=4, experts="torch", keep_logits=True)
    eng.add("greedy", prompt, SamplingParams(max_tokens=6, logprobs=3))
    greedy = eng.run_all()["greedy"]
    for e in greedy:
        lp = e.logits.log_softmax(-1)
        assert e.logprob == pytest.approx(float(lp[e.token]), abs=1e-5)
        assert [t for t, _ in e.top_logprobs] == lp.topk(3).indices.tolist()
    # a stop token ends the request with reason "stop" and is reported
    stop = greedy[2].token
    eng.add("stop", prompt, SamplingParams(max_tokens=6, stop_token_ids=(stop,)))
    out = eng.run_all()["stop"]
    assert out[-1].token == stop and out[-1].finish_reason == "stop"
    assert len(out) == 1 + next(i for i, e in enumerate(greedy) if e.token == stop)
    # seeded sampling repeats; different seeds differ somewhere over a few requests
    runs = []
    for seed in (7, 7, 8):
        eng.add(f"s{len(runs)}", prompt, SamplingParams(max_tokens=8, temperature=1.5, seed=seed))
        runs.append([e.token for e in eng.run_all()[f"s{len(runs)}"]])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_bad_requests_are_refused_clearly(tiny_models):
    m = _model(tiny_models, "tiny-mixtral")
    eng = DecodeEngine(m, num_blocks=8, block_size=4, prefill_threshold=8, experts="torch")
    with pytest.raises(ValueError, match="needs the prefill engine"):
        eng.add("long", _prompt(m, 9, 0))
    with pytest.raises(ValueError, match="context"):
        eng.add("huge", _prompt(m, 40, 0))
    with pytest.raises(ValueError, match="token ids"):
        eng.add("oob", [m.embed.shape[0]])
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add("p", [1], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="layer 0 KV"):
        eng.add("kv", [1, 2], kv=[torch.zeros(3, w.shape[1]) for w in eng.cache.layers],
                first=PrefillEngine(m).prefill([1, 2]).choice)
    eng.add("ok", [1, 2])
    with pytest.raises(ValueError, match="already in use"):
        eng.add("ok", [3])
    with pytest.raises(ValueError, match="kernels cannot run"):
        DecodeEngine(load_model(tiny_models["tiny-mixtral", "bf16"], dtype=torch.float32), experts="kernel")


@pytest.mark.gpu
def test_cuda_streaming_overlaps_copy_and_compute(tiny_models):
    """On CUDA: pinned host experts, copies on their own stream, same result as the CPU run."""
    m = _model(tiny_models, "tiny-deepseek-v3")
    prompt = _prompt(m, 30, 9)
    ref = PrefillEngine(m, chunk_size=8).prefill(prompt, all_logits=True).logits
    eng = PrefillEngine(_model(tiny_models, "tiny-deepseek-v3"), device="cuda", chunk_size=8, depth=2)
    res = eng.prefill(prompt, all_logits=True)
    assert (res.logits - ref).abs().max() < 1e-3
    assert all(ws[0].data.is_pinned() for ws in eng.streamer.host.values())
    times = eng.streamer.cuda_times()
    assert {k for k, *_ in times} == {"copy_start", "copy_end", "compute_start", "compute_end"}


def test_bench_decode_smoke(tiny_models, tmp_path):
    from services.engine import bench

    out = tmp_path / "decode.json"
    report = bench.run(model_path=str(tiny_models["tiny-qwen3-moe", "fp8"]), prompt_len=16, steps=2,
                       json_path=str(out), compare=False)
    assert out.is_file() and report["memory_bandwidth_gbps"] > 0
    assert [(r["streams"], r["overlap"]) for r in report["decode"]] == [
        (n, o) for o in (False, True) for n in bench.STREAMS]
    assert all(r["tok_s"] > 0 for r in report["decode"]) and report["prefill_tok_s"] > 0
    assert 0 < report["decode"][0]["fraction_of_bandwidth"]
    assert report["weights"] == "shm"
    from shared import weight_store

    assert report["shm_huge"] == weight_store.shm_huge_pages()


def test_bench_loads_weights_as_the_services_do(tiny_models):
    """The decode bench reads the weights from shared memory, as the decode service does: they
    are published under a namespace of the process while it runs and removed after; ``file``
    maps the checkpoint instead; the two give the same model."""
    import os

    from services.engine import bench

    path = tiny_models["tiny-qwen3-moe", "fp8"]
    mine = lambda: [n for n in os.listdir("/dev/shm") if f"hmbench{os.getpid()}" in n]  # noqa: E731
    with bench.loaded(path, "shm") as shm_model, bench.loaded(path, "file") as file_model:
        assert mine()
        ids = torch.tensor([[3, 5, 7]])
        assert torch.equal(shm_model(ids), file_model(ids))
    assert not mine()
    with pytest.raises(ValueError, match="weights must be one of"), bench.loaded(path, "disk"):
        pass


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bench_prefill_smoke(tiny_models, tmp_path, device):
    from services.engine import bench_prefill

    out = tmp_path / "prefill.json"
    report = bench_prefill.run(model_path=str(tiny_models["tiny-deepseek-v3", "fp8"]), chunks=(4, 16),
                               prompt_len=16, device=device, json_path=str(out))
    assert out.is_file() and [r["chunk"] for r in report["runs"]] == [4, 16]
    assert report["dense_layers"] == 1 and report["layers"] == 3
    for r in report["runs"]:
        assert r["tok_s"] > 0 and r["dense_layer_s"] > 0 and r["moe_layer_s"] > 0
        # the layers' marks cover the run: their sum is within the wall time
        assert r["dense_layer_s"] + 2 * r["moe_layer_s"] <= r["seconds"]
    if device == "cuda":
        assert report["pinned_h2d_gbps"] > 0
        assert all(r["copies_alone_s"] > 0 and r["compute_alone_s"] > 0 and r["h2d_gbps_streaming"] > 0
                   for r in report["runs"])


def test_kernel_linear_matches_torch_and_declines_what_it_cannot_take():
    from services.engine.runner import KernelLinears, align_for_kernels, kernel_linear_max_rows

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=gen).to(torch.bfloat16)
    w2 = torch.randn(32, 160, generator=gen).to(torch.bfloat16)
    most = kernel_linear_max_rows()
    lin = KernelLinears(most)
    for rows in range(1, most + 1):
        x = torch.randn(rows, 160, generator=gen).to(torch.bfloat16)
        got, want = lin.linear(x, w), F.linear(x.float(), w.float())
        assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() <= 2e-2 * want.abs().max()
        # several weights in one call, each its own part; the bound call again gives the same
        a, b = lin.linear(x, (w, w2))
        assert torch.equal(a, got) and torch.equal(b, lin.linear(x, w2))
        assert torch.equal(lin.f32(x, (w, w2))[:, :96], lin.f32(x.float(), (w,)))
    assert lin.linear(torch.randn(most + 1, 160).bfloat16(), w) is None
    assert lin.linear(torch.randn(1, 160), w.float()) is None
    assert lin.linear(torch.randn(1, 96).bfloat16(), w) is None  # another input size
    misaligned = torch.empty(96 * 160 + 8, dtype=torch.bfloat16)[4:4 + 96 * 160].view(96, 160)
    assert misaligned.data_ptr() % 64 and lin.linear(torch.randn(1, 160).bfloat16(), misaligned) is None
    assert lin.linear(torch.randn(1, 160).bfloat16(), (w, torch.randn(8, 96).bfloat16())) is None
    lin.MAX_BOUND = 3  # weights made per call do not pile up
    for _ in range(10):
        assert lin.linear(torch.randn(1, 160).bfloat16(), torch.randn(8, 160).bfloat16()) is not None
    assert len(lin._bound) <= 3

    class Tied(torch.nn.Module):
        def __init__(self, t):
            super().__init__()
            self.register_buffer("a", t)
            self.register_buffer("b", t)

    m = Tied(misaligned.copy_(w))
    assert align_for_kernels(m) == 1
    assert m.a.data_ptr() % 64 == 0 and m.a.data_ptr() == m.b.data_ptr() and torch.equal(m.a, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 16])
def test_decode_attention_equals_sdpa(dtype, T):
    """The decode attention (fp32 bmm per kv group) against torch's scaled_dot_product_attention
    with the suffix-causal mask and GQA, on strided K/V as the cache hands them over."""
    from shared.layers import decode_attention, suffix_causal_mask

    g = torch.Generator().manual_seed(T)
    H, K, Dh, L = 8, 2, 32, 40
    q = torch.randn(T, H, Dh, generator=g).to(dtype)
    kv = torch.randn(L, 2, K, Dh, generator=g).to(dtype)
    k, v = kv.permute(1, 2, 0, 3)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float(), v.float(), attn_mask=suffix_causal_mask(T, L, q.device),
        scale=Dh**-0.5, enable_gqa=True).transpose(0, 1).flatten(1)
    out = decode_attention(q, k, v, Dh**-0.5)
    assert out.dtype == dtype and out.shape == (T, H * Dh)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32),
                                          pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("heads,kv_heads,dq,dv", [(8, 8, 48, 32), (8, 2, 32, 32)])
@pytest.mark.parametrize("T,L", [(5, 5), (7, 19), (1, 9), (64, 200)])
def test_suffix_causal_sdpa_equals_the_masked_reference(device, dtype, heads, kv_heads, dq, dv, T, L):
    """The prefill attention (lower-right causal bias on a GPU: the efficient kernel in fp32,
    flash in bf16; the explicit mask elsewhere; MLA's wider q/k than v, grouped K/V) against
    softmax(q k^T) v with the mask written out, in fp64."""
    from shared.layers import suffix_causal_sdpa

    g = torch.Generator().manual_seed(T * L + heads)
    q = torch.randn(heads, T, dq, generator=g)
    k = torch.randn(kv_heads, L, dq, generator=g)
    v = torch.randn(kv_heads, L, dv, generator=g)
    kk, vv = (t.double().repeat_interleave(heads // kv_heads, dim=0) for t in (k, v))
    s = q.double() @ kk.transpose(1, 2) * dq**-0.5
    allowed = torch.ones(T, L, dtype=torch.bool).tril(L - T)
    ref = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv
    q, k, v = (t.to(dtype) for t in (q, k, v))  # the reference keeps the unrounded inputs
    out = suffix_causal_sdpa(q.to(device), k.to(device), v.to(device), dq**-0.5)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert out.shape == (heads, T, dv) and (out.cpu().double() - ref).abs().max() < tol


@pytest.mark.gpu
def test_suffix_causal_sdpa_on_cuda_never_builds_the_score_matrix():
    """At MLA's shapes (q/k 192 wide, v 128) in bf16 the prefill attention must run fused: its
    peak memory stays far below one [H, T, L] score matrix (the math path's)."""
    from shared.layers import suffix_causal_sdpa

    H, T, L = 16, 2048, 3072
    q = torch.randn(H, T, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(H, L, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(H, L, 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = suffix_causal_sdpa(q, k, v, 192**-0.5)
    torch.cuda.synchronize()
    scores = H * T * L * 2
    assert out.shape == (H, T, 128) and torch.isfinite(out).all()
    assert torch.cuda.max_memory_allocated() - base < scores / 3  # v padded to 192 and the output: ~30 MB


def test_paged_cache_writes_within_and_across_blocks():
    """A write inside one block takes the slice path, one across blocks the index path: both land
    where reads find them, and nothing else moves."""
    from shared.kv_cache import PagedKVCache

    cache = PagedKVCache([6], num_blocks=8, block_size=4, dtype=torch.float32)
    table = [5, 2, 7]
    entries = torch.arange(60, dtype=torch.float32).view(10, 6)
    cache.write(0, table, 0, entries[:3])  # within block 5
    cache.write(0, table, 3, entries[3:9])  # block 5's last slot, all of 2, the first of 7
    cache.write(0, table, 9, entries[9:])  # one token (decode)
    assert torch.equal(cache.read(0, table, 10), entries)
    untouched = [b for b in range(8) if b not in table]
    assert not cache.layers[0].view(8, 4, 6)[untouched].any()


def test_rotary_tables_follow_the_positions():
    """Rotary keeps the last tables; new positions, or the same tensor changed in place, get new
    ones."""
    from shared.layers import Rotary

    rot = Rotary({"rope_theta": 10000.0, "rope_type": "default"}, 8, interleaved=False)
    pos = torch.tensor([[3, 4]])
    cos, sin = rot.cos_sin(pos, torch.float32)
    again = rot.cos_sin(pos.clone(), torch.float32)
    assert again[0] is cos and again[1] is sin
    pos[0, 1] = 9
    cos9, _ = rot.cos_sin(pos, torch.float32)
    fresh = Rotary({"rope_theta": 10000.0, "rope_type": "default"}, 8, interleaved=False).cos_sin(pos, torch.float32)
    assert torch.equal(cos9, fresh[0]) and not torch.equal(cos9, cos)
    assert rot.cos_sin(pos, torch.bfloat16)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_apply_equals_the_textbook_form(interleaved, dtype):
    """apply's four-op form (x (cos, cos) + roll(x) (-sin, sin)) rounds exactly as
    (x1 cos - x2 sin, x2 cos + x1 sin) does, for halves and for interleaved pairs, with tables
    from cos_sin (the kept doubled ones) and from elsewhere."""
    from shared.layers import Rotary

    rot = Rotary({"rope_theta": 10000.0, "rope_type": "default"}, 16, interleaved=interleaved)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 16, generator=g).to(dtype)
    cos, sin = rot.cos_sin(torch.arange(5)[None].expand(2, 5), dtype)
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    ref = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    assert torch.equal(rot.apply(x, cos, sin), ref)
    assert torch.equal(rot.apply(x, cos, sin), ref)  # the doubled tables kept
    assert torch.equal(rot.apply(x, cos.clone(), sin.clone()), ref)  # tables not from the last cos_sin


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-mixtral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_projection_equals_per_group_form(tiny_models, preset, dtype):
    """qkv runs q and k through the norms and rope as one tensor: bit for bit what q_norm, k_norm
    and rope give head group by head group."""
    from shared.layers import GQAttention

    model = load_model(tiny_models[preset, "bf16"], dtype=dtype)
    attn = next(m for m in model.modules() if isinstance(m, GQAttention))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, attn.q_proj.shape[1], generator=g).to(dtype)
    pos = torch.arange(3, 8)[None].expand(2, 5)
    H, K, Dh = attn.heads, attn.kv_heads, attn.head_dim
    q = F.linear(x, attn.q_proj).unflatten(-1, (H, Dh))
    k = F.linear(x, attn.k_proj).unflatten(-1, (K, Dh))
    v = F.linear(x, attn.v_proj).unflatten(-1, (K, Dh))
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = attn.rotary.cos_sin(pos, dtype)
    ref = (attn.rotary.apply(q.transpose(1, 2), cos, sin), attn.rotary.apply(k.transpose(1, 2), cos, sin),
           v.transpose(1, 2))
    for got, want in zip(attn.qkv(x, pos), ref, strict=True):
        assert torch.equal(got, want)
    qe, entries = attn.project(x[0], pos[0])
    assert torch.equal(qe, ref[0][0].transpose(0, 1))
    k0, v0 = ref[1][0].transpose(0, 1).flatten(1), ref[2][0].transpose(0, 1).flatten(1)
    assert torch.equal(entries, torch.cat((k0, v0), -1))
