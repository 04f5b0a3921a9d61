"""The wire codec, the config loader and the shared-memory weight store, as units."""

from __future__ import annotations

import os
import stat

import msgpack
import pytest
import torch
import zmq

from shared import messages as m
from shared import weight_store
from shared.config import Config, ConfigError
from shared.layers import QuantLinear
from shared.model import load_model


def _sample(kind: m.Kind) -> m.Message:
    p = m.Params(max_tokens=5, temperature=0.5, seed=3, stop_token_ids=[1, 2], logprobs=2)
    item = m.TokenItem("r1", 7, -0.25, [[7, -0.25], [3, -1.5]], "stop", False)
    samples = {
        m.Kind.HEARTBEAT: m.Heartbeat(role="decode", name="d0", pid=1, kv_endpoint="ipc:///x", max_context=64,
                                      block_size=16, total_tokens=1024, running=1, waiting=2),
        m.Kind.SUBMIT: m.Submit(rid="r1", prompt=[1, 2, 3], params=p, prompt_logprobs=1),
        m.Kind.CANCEL: m.Cancel(rid="r1"),
        m.Kind.PREFILL_TASK: m.PrefillTask(rid="r1", prompt=[4], params=p, kv_endpoint="ipc:///kv"),
        m.Kind.DECODE_TASK: m.DecodeTask(rid="r1", prompt=[4], params=p, prefill_here=True),
        m.Kind.KV_CHUNK: m.KVChunk(rid="r1", layer=2, start=16,
                                   tensors=(torch.randn(8, 6).to(torch.bfloat16)[:, ::2],)),  # non-contiguous
        m.Kind.KV_DONE: m.KVDone(rid="r1", tokens=9, first=item),
        m.Kind.FIRST_TOKEN: m.FirstToken(item=item),
        m.Kind.TOKENS: m.Tokens(items=[item, m.TokenItem("r2", 1)]),
        m.Kind.PROMPT_LOGPROBS: m.PromptLogprobs(rid="r1", logprobs=[-1.0, -2.0], top=[[[1, -1.0]], [[2, -2.0]]]),
        m.Kind.REJECT: m.Reject(rid="r1", status=429, message="busy"),
        m.Kind.FAILED: m.Failed(rid="r1", message="boom"),
        m.Kind.ROUTER_STATUS: m.RouterStatus(prefill=1, decode=2, max_context=64, queued=3),
    }
    return samples[kind]


@pytest.mark.parametrize("kind", list(m.MESSAGES))
def test_every_message_round_trips(kind):
    msg = _sample(kind)
    frames = m.encode(msg)
    assert frames[0] == bytes([kind]) and len(frames) == 2 + len(msg.tensors)
    back = m.decode(frames)
    assert type(back) is type(msg) and back == msg
    for a, b in zip(msg.tensors, back.tensors, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_tensors_travel_through_zeromq_without_a_copy_of_the_header():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://wire-test")
    b.connect("inproc://wire-test")
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    a.send_multipart(m.encode(m.KVChunk(rid="x", layer=0, start=0, tensors=(t,))), copy=False)
    got = m.decode(b.recv_multipart(copy=False))
    assert torch.equal(got.tensors[0], t)
    a.close(), b.close()


def _header(**fields) -> bytes:
    return msgpack.packb({"v": m.PROTOCOL, "f": fields, "b": []})


@pytest.mark.parametrize("frames,reason", [
    ([b"\x63", b""], "unknown message kind"),
    ([b"\x03"], "frame"),
    ([b"\x03", b"\xc1\xc1"], "not MessagePack"),
    ([b"\x03", msgpack.packb([1, 2])], "not a map"),
    ([b"\x03", msgpack.packb({"v": 99, "f": {}})], "protocol version 99"),
    ([b"\x03", _header(rid=5)], "expected str"),
    ([b"\x03", _header(rid="x", prompt=[1, "a"])], "expected int"),
    ([b"\x03", _header(rid="x", params={"max_tokens": "many"})], "expected int"),
    ([b"\x03", _header(rid="x", colour="red")], "unknown fields"),
    ([b"\x07", msgpack.packb({"v": m.PROTOCOL, "f": {}, "b": [["float32", [4]]]}), b"\0" * 15], "needs 16"),
    ([b"\x07", msgpack.packb({"v": m.PROTOCOL, "f": {}, "b": [["complex", [1]]]}), b"\0" * 8], "bad spec"),
    ([b"\x07", msgpack.packb({"v": m.PROTOCOL, "f": {}, "b": []}), b"\0"], "names 0 buffers"),
])
def test_malformed_messages_are_refused_with_a_reason(frames, reason):
    with pytest.raises(m.BadMessage, match=reason):
        m.decode(frames)

    class Log:
        def __init__(self):
            self.lines = []

        def warning(self, event, **kw):
            self.lines.append((event, kw))

    log = Log()
    assert m.try_decode(frames, log) is None and log.lines


def test_config_file_flags_and_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('run_dir = "/tmp/x"\n[gateway]\nport = 9000\n[decode]\nnuma_nodes = [0, 1]\noverlap = true\n')
    cfg = Config.load(f, **{"gateway.port": 9100, "model.path": None})
    assert cfg.gateway.port == 9100 and cfg.decode.numa_nodes == [0, 1] and cfg.decode.overlap
    assert cfg.router_endpoint == "ipc:///tmp/x/router.sock"
    assert Config.load(None, **{"decode.numa_nodes": "0,1"}).decode.numa_nodes == [0, 1]
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert Config.load(again) == cfg
    for text, key in [("[gateway]\nport = 99999\n", "gateway.port"), ("[decode]\ncolour = 1\n", "decode.colour"),
                      ("[router]\nmax_queue = 'x'\n", "router.max_queue"), ("log_format = 'xml'\n", "log_format"),
                      ("[weights]\nquant = 'fp4'\n", "weights.quant"),
                      ("[prefill]\nexperts = 'gpu'\n", "prefill.experts"), ("[gateway\n", "not valid TOML")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            Config.load(f)
    with pytest.raises(ConfigError, match="no such config file"):
        Config.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="too long"):
        Config(run_dir="/tmp/" + "x" * 120).endpoint("router")


@pytest.mark.parametrize("quant", ["int4_g32", "fp8"])
def test_weight_store_publish_attach_reuse_unlink(tiny_models, tmp_path, quant):
    path = tiny_models["tiny-qwen3-moe", quant]
    manifest_path = tmp_path / "weights.json"
    ns = f"test{os.getpid()}"
    manifest = weight_store.publish(path, manifest_path, namespace=ns)
    try:
        for seg in manifest["segments"]:
            mode = os.stat(f"/dev/shm{seg['name']}").st_mode
            assert stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(os.stat(manifest_path).st_mode) == 0o600
        a = weight_store.attach(manifest_path)
        model = a.build()
        experts = model.layers[0].ffn.experts
        shared = [experts.gate_data, experts.down_scale, model.embed, model.lm_head]
        if quant == "fp8":  # the attention's FP8 weights are shared as stored too
            o = model.layers[0].attn.o_proj
            assert isinstance(o, QuantLinear) and o.fmt == "fp8_b128"
            shared += [o.data, o.scale]
        for t in shared:
            assert a.contains(t)  # a view of the shared pages, not a copy
        assert t.data_ptr() % 64 == 0
        x = torch.randint(0, 300, (1, 9))
        with torch.inference_mode():
            assert torch.equal(model(x), load_model(path)(x))
        # Published again with the same checkpoint: the segments are reused, nothing reloaded.
        assert weight_store.publish(path, manifest_path, namespace=ns)["published"] == manifest["published"]
    finally:
        assert weight_store.unlink(manifest) == len(manifest["segments"])
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"hm-{ns}")]
    with pytest.raises(weight_store.StoreError, match="is gone"):
        weight_store.attach(manifest_path)
    with pytest.raises(weight_store.StoreError, match="no weight manifest"):
        weight_store.attach(tmp_path / "nothing.json")


def test_shm_huge_pages_reads_the_mount_option(tmp_path):
    mounts = tmp_path / "mounts"
    assert weight_store.shm_huge_pages(tmp_path / "missing") == "never"
    mounts.write_text("proc /proc proc rw 0 0\ntmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0\n")
    assert weight_store.shm_huge_pages(mounts) == "never"
    mounts.write_text("tmpfs /run tmpfs rw,huge=always 0 0\ntmpfs /dev/shm tmpfs rw,nosuid,huge=advise 0 0\n")
    assert weight_store.shm_huge_pages(mounts) == "advise"
    # remounted: the last line is the one in effect
    mounts.write_text("tmpfs /dev/shm tmpfs rw,huge=advise 0 0\ntmpfs /dev/shm tmpfs rw,size=4g,huge=within_size 0 0\n")
    assert weight_store.shm_huge_pages(mounts) == "within_size"


def test_weight_store_asks_for_huge_pages_on_every_mapping(tiny_models, tmp_path, monkeypatch):
    """The writer's mapping (before its first write: that is when the tmpfs allocates) and each
    reader's mapping of every segment are advised MADV_HUGEPAGE."""
    advised = []
    real = weight_store._advise_huge

    def record(mm):
        advised.append(mm.size())
        real(mm)

    monkeypatch.setattr(weight_store, "_advise_huge", record)
    ns = f"testhuge{os.getpid()}"
    manifest = weight_store.publish(tiny_models["tiny-qwen3-moe", "fp8"], tmp_path / "w.json", namespace=ns)
    try:
        sizes = [seg["size"] for seg in manifest["segments"]]
        assert advised == sizes  # the writer's, one per segment
        advised.clear()
        a = weight_store.attach(tmp_path / "w.json")
        assert advised == sizes  # the reader's
        a.close()
    finally:
        weight_store.unlink(manifest)


def test_weight_store_quantizes_at_publish_time(tiny_models, tmp_path, monkeypatch):
    """Experts are written into their segment one at a time (the stacked loader is never called,
    so no layer's experts are held twice), and equal, bit for bit, the stack quantized whole."""
    from shared.checkpoint import Checkpoint, load_spec
    from shared.model import family_of
    from shared.quant import quantize

    path = tiny_models["tiny-mixtral", "bf16"]
    ckpt = Checkpoint(path)
    fam = family_of(ckpt.config)
    spec = next(s for s in fam.weight_specs(fam.args_from_config(ckpt.config)) if s.role == "experts")
    want = quantize(load_spec(ckpt, spec, torch.bfloat16).data, "fp8_b128")

    def no_stack(*args, **kwargs):
        raise AssertionError("publish loaded a whole stack of experts")

    monkeypatch.setattr(Checkpoint, "experts", no_stack)
    manifest = weight_store.publish(path, tmp_path / "w.json", namespace=f"q{os.getpid()}", quant="fp8")
    try:
        a = weight_store.attach(tmp_path / "w.json")
        assert manifest["tensors"][spec.name]["fmt"] == "fp8_b128"
        assert manifest["tensors"][spec.name]["shape"] == list(spec.shape)
        got = a.weights[spec.name]
        assert got.fmt == "fp8_b128" and got.shape == tuple(spec.shape)
        assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
        assert torch.equal(got.scale, want.scale)
        assert a.build().layers[0].ffn.experts.fmt == "fp8_b128"
    finally:
        weight_store.unlink(manifest)


def test_weight_store_rejects_mixed_experts_and_leaves_no_segment(tiny_models, tmp_path, monkeypatch):
    """An expert stored in another format than the layer's first (checked as stored, before any
    quantization at publish time) is a CheckpointError, and the segment being written when it
    surfaced is removed with the others."""
    from shared.checkpoint import Checkpoint, CheckpointError
    from shared.quant import quantize

    real = Checkpoint.linear

    def linear(self, prefix, shape, why):
        if ".experts.2." in prefix:  # one expert of each projection, stored as INT4
            return quantize(torch.randn(shape), "int4_g32")
        return real(self, prefix, shape, why)

    monkeypatch.setattr(Checkpoint, "linear", linear)
    ns = f"mix{os.getpid()}"
    for path, quant in ((tiny_models["tiny-qwen3-moe", "fp8"], ""), (tiny_models["tiny-mixtral", "bf16"], "int4_g32")):
        with pytest.raises(CheckpointError, match=r"experts\.2.* is int4_g32 but .* must share one format"):
            weight_store.publish(path, tmp_path / "w.json", namespace=ns, quant=quant)
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"hm-{ns}")]
        assert not (tmp_path / "w.json").exists()


@pytest.mark.gpu
def test_shared_weights_stream_to_cuda_from_the_shared_pages(tiny_models, tmp_path):
    """On CUDA the shared pages are registered, not copied into pinned memory: the streamer's host
    experts are views of the mapping, pinned, and prefill equals a GPU prefill of the same
    checkpoint loaded privately (the comparison stays on one device: BF16 logits of a GPU and a
    CPU run differ by a few 1e-2, and by ~1 where an expert choice is a near tie)."""
    from services.engine.prefill import PrefillEngine

    path = tiny_models["tiny-deepseek-v3", "fp8"]
    manifest = weight_store.publish(path, tmp_path / "w.json", namespace=f"g{os.getpid()}")
    try:
        a = weight_store.attach(tmp_path / "w.json")
        a.pin_for_cuda()
        eng = PrefillEngine(a.build("cpu"), "cuda", chunk_size=8, host_pinned=True)
        host = [w.data for ws in eng.streamer.host.values() for w in ws]
        assert all(t.is_pinned() and a.contains(t) for t in host)
        prompt = list(range(3, 40))
        got = eng.prefill(prompt, all_logits=True).logits
        want = PrefillEngine(load_model(path), "cuda", chunk_size=8).prefill(prompt, all_logits=True).logits
        assert (got - want).abs().max() < 1e-3
        eng.close()
        a.close()
    finally:
        weight_store.unlink(manifest)


def test_run_service_freezes_what_the_build_made_before_serving(monkeypatch):
    """A daemon's startup objects leave the garbage collector's view before it reports ready (a
    full collection over them cost a decode step's time); a failed build exits 1 without serving."""
    import gc

    from shared import log, service

    quiet = type("Log", (), {"info": staticmethod(lambda *a, **k: None), "error": staticmethod(lambda *a, **k: None)})()
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setattr(service, "set_title", lambda title: None)  # (not this test process's name)
    monkeypatch.setattr(log, "setup", lambda *a, **k: quiet)  # (nor its structlog configuration)
    seen = {}

    class Fake:
        log = quiet

        def event_loop(self):
            seen["frozen"] = gc.get_freeze_count()

        def close(self):
            seen["closed"] = True

    gc.unfreeze()
    cfg = Config()
    try:
        assert gc.get_freeze_count() == 0
        assert service.run_service("decode", "decode-test", cfg, Fake) == 0
        assert seen["frozen"] > 0 and seen["closed"]
    finally:
        gc.unfreeze()

    def fail():
        raise RuntimeError("no model")

    assert service.run_service("decode", "decode-test", cfg, fail) == 1
    assert gc.get_freeze_count() == 0
