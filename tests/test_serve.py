"""End to end: ``hybridmoe serve`` as real processes (weights, router, prefill, two decode
services, gateway) driven over HTTP with the official ``openai`` client."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serving import Reference, Server

from services.engine.prefill import PrefillEngine
from shared.model import load_model
from shared.tokenizer import Tokenizer

SHORT = 8  # prompts up to this many tokens are prefilled by decode itself
MODEL = "tiny"


@pytest.fixture(scope="module")
def model_path(tiny_models):
    return tiny_models["tiny-deepseek-v3", "fp8"]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    s = Server(model_path, tmp_path_factory.mktemp("serve") / "serve.log",
               model={"path": str(model_path), "name": MODEL},
               router={"short_prompt": SHORT, "heartbeat_s": 0.2, "dead_after_s": 2.0, "max_queue": 4,
                       "max_running": 4},
               prefill={"threads": 1, "chunk_size": 16, "device": "cpu"},  # the GPU path: its own test below
               decode={"numa_nodes": [0, 0], "num_blocks": 64, "block_size": 16, "max_batch": 8, "threads": 1})
    yield s
    status = s.stop()
    assert status == 0, s.log_path.read_text()[-3000:]
    assert s.leftovers() == []


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return Tokenizer(model_path)


@pytest.fixture(scope="module")
def reference(model_path, tokenizer):
    return Reference(model_path, SHORT, tokenizer.eos_token_id)


def _prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = httpx.get(server.url.removesuffix("/v1") + "/health")
    assert r.status_code == 200 and r.json()["decode"] == 2 and r.json()["prefill"] == 1


@pytest.mark.parametrize("text", ["Hi", "A longer prompt that goes through the prefill service, in chunks."])
def test_greedy_completion_equals_in_process_engine(client, tokenizer, reference, text):
    prompt = _prompt(tokenizer, text)
    assert (len(prompt) <= SHORT) == (text == "Hi")  # both paths: decode-local and prefill service
    want = reference.greedy(prompt, 12)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == tokenizer.decode(want)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")
    # The same prompt as text gives the same answer.
    r2 = client.completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


@pytest.mark.gpu
def test_gpu_prefill_and_gpu_attention_decode(model_path, tokenizer, tmp_path):
    """prefill.device and decode.device on CUDA: stream-loading prefill from the shared pages
    (registered with CUDA), KV shipped from the GPU, decode's attention on the GPU with the experts
    on the CPU kernels; against the in-process engines placed the same way."""
    s = Server(model_path, tmp_path / "serve.log", model={"path": str(model_path), "name": MODEL},
               router={"short_prompt": SHORT}, prefill={"chunk_size": 16, "device": "cuda"},
               decode={"numa_nodes": [0], "num_blocks": 64, "max_batch": 8, "threads": 1, "device": "cuda"})
    try:
        client = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0, timeout=60)
        ref = Reference(model_path, SHORT, tokenizer.eos_token_id, device="cuda", chunk_size=16)
        for text in ("Hi", "A longer prompt that goes through the prefill service, in chunks."):
            prompt = _prompt(tokenizer, text)
            want = ref.greedy(prompt, 12)
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
            assert r.choices[0].text == tokenizer.decode(want)
        assert any(r.get("device") == "cuda" for r in s.records() if r.get("event") == "attached")
    finally:
        assert s.stop() == 0, s.log_path.read_text()[-3000:]
        assert s.leftovers() == []


def test_chat_streamed_equals_unstreamed(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about MoE models."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_streamed_completion_equals_unstreamed(client):
    full = client.completions.create(model=MODEL, prompt="Streaming check, a few words", max_tokens=10, temperature=0)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Streaming check, a few words", max_tokens=10, temperature=0, stream=True))
    assert text == full.choices[0].text


def test_prompt_scoring_equals_forward(client, model_path, tokenizer):
    text = "Score this prompt, please."
    prompt = _prompt(tokenizer, text)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt)
    # against the engine as the service runs it (its chunks, its experts' path and threads): that
    # engine equals the full forward in test_engines, this checks the scoring's positions and values
    eng = PrefillEngine(load_model(model_path), chunk_size=16, threads=1)
    assert eng.experts == "kernel"
    ref = eng.prefill(prompt, all_logits=True).logits.float().log_softmax(-1)
    want = [float(ref[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=2e-3)
    top = ref[:-1].topk(2, dim=-1).values
    # OpenAI's format keys top logprobs by token text, so tokens with the same text share an entry.
    assert [max(d.values()) for d in lp.top_logprobs[1:]] == pytest.approx(top[:, 0].tolist(), abs=2e-3)
    assert r.choices[0].text.endswith(text) and r.usage.completion_tokens == 0


def test_generation_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Logprobs of generated tokens", max_tokens=5, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the best
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    assert len(c.choices[0].logprobs.content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in c.choices[0].logprobs.content)


def test_n_choices_and_seeds(client):
    greedy = client.completions.create(model=MODEL, prompt="Same twice", max_tokens=6, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text
    a = client.completions.create(model=MODEL, prompt="Sampled", max_tokens=8, temperature=1.0, seed=7, n=2)
    b = client.completions.create(model=MODEL, prompt="Sampled", max_tokens=8, temperature=1.0, seed=7, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed reproduces
    assert a.choices[0].text != a.choices[1].text  # each choice gets its own stream of randomness


def test_stop_string(client):
    full = client.completions.create(model=MODEL, prompt="Stop strings", max_tokens=16, temperature=0).choices[0]
    text = full.text
    assert len(text) > 4
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = text.find(stop)
    r = client.completions.create(model=MODEL, prompt="Stop strings", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:cut] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Stop strings", max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == text[:cut]


def test_stop_token_ids(client, tokenizer, reference):
    prompt = _prompt(tokenizer, "Stop tokens")
    want = reference.greedy(prompt, 10)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                  extra_body={"stop_token_ids": [want[3]]})
    cut = want.index(want[3])  # the first time that token comes
    assert r.usage.completion_tokens == cut + 1 and r.choices[0].finish_reason == "stop"


def test_both_decode_services_serve(server, client):
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: client.completions.create(model=MODEL, prompt=f"Parallel {i}", max_tokens=24,
                                                          temperature=0), range(4)))
    names = {r.get("name") for r in server.records() if r.get("event") == "finished" and r["service"] == "decode"}
    assert {"decode-0", "decode-1"} <= names


BAD_REQUESTS = [
    ("completions", b"{not json", 400),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": 7}, 400),
    ("completions", {"model": MODEL, "prompt": 5}, 400),
    ("completions", {"model": MODEL, "prompt": [1, 2, 99999]}, 400),
    ("completions", {"model": MODEL, "prompt": "x" * 3000, "max_tokens": 4}, 400),  # longer than the context
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400),
    ("completions", {"model": "no-such-model", "prompt": "x"}, 404),
    ("completions", {"prompt": "x"}, 400),
    ("completions", {"model": MODEL, "prompt": "x", "n": 0}, 400),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400),  # 0 only with echo
    ("chat/completions", {"model": MODEL}, 400),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400),
    ("chat/completions", [1, 2], 400),
]


@pytest.mark.parametrize("path,body,status", BAD_REQUESTS)
def test_invalid_requests_get_openai_errors(server, client, path, body, status):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/{path}", content=data, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    # ... and the server keeps serving.
    assert client.completions.create(model=MODEL, prompt="still fine", max_tokens=2).usage.completion_tokens >= 1


def test_malformed_zeromq_messages_are_dropped(server, client):
    import zmq

    from shared.messages import Cancel, encode

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.DEALER)
    kv = ctx.socket(zmq.PUSH)
    router.connect(f"ipc://{server.run_dir}/router.sock")
    kv.connect(f"ipc://{server.run_dir}/kv-decode-0.sock")
    good = encode(Cancel(rid="nobody"))
    for sock in (router, kv):
        sock.send_multipart([b"\xff", b"garbage"])
        sock.send_multipart([good[0], b"\xc1 not msgpack"])
        sock.send_multipart([good[0]])
        sock.send_multipart(good)  # well-formed, for a request nobody knows: ignored
    time.sleep(0.5)
    router.close(linger=0), kv.close(linger=0)
    assert client.completions.create(model=MODEL, prompt="after garbage", max_tokens=3).usage.completion_tokens >= 1
    dropped = [r for r in server.records() if r.get("event") == "dropped a malformed message"]
    assert {d["service"] for d in dropped} >= {"router", "decode"}


def test_cancellation_frees_kv(server, client):
    base = server.url.removesuffix("/v1")
    with httpx.stream("POST", f"{server.url}/completions", json={
            "model": MODEL, "prompt": "A long story", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one token, then the client goes away
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{base}/metrics").text
        running = _metric(metrics, "hybridmoe_requests_running")
        if running == 0 and _metric(metrics, "hybridmoe_kv_cache_usage_ratio") == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the cancelled request still holds KV:\n{metrics}")
    assert any('"cancelled"' in line and '"router"' in line for line in server.logs())


def test_full_queue_answers_429(server):
    """4 running + 4 queued fill the router; the rest are refused at once, not left hanging."""
    body = {"model": MODEL, "prompt": "Busy busy", "max_tokens": 150, "temperature": 0, "ignore_eos": True}

    def post(_):
        return httpx.post(f"{server.url}/completions", json=body, timeout=120).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(post, range(16)))
    assert codes.count(429) >= 1 and codes.count(200) >= 4, codes
    assert set(codes) <= {200, 429}


def test_metrics_exposes_latencies(server, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4)
    text = httpx.get(server.url.removesuffix("/v1") + "/metrics").text
    assert _metric(text, "hybridmoe_queue_time_seconds_count") >= 1
    for name in ("hybridmoe_time_to_first_token_seconds_bucket", "hybridmoe_time_per_output_token_seconds_count",
                 "hybridmoe_generation_tokens_total", "hybridmoe_kv_cache_usage_ratio",
                 'hybridmoe_requests_total{endpoint="/v1/completions",outcome="ok"}'):
        assert name in text, name


def test_bench_serve_smoke(server, model_path, tmp_path):
    from services.loadtest import run

    out = tmp_path / "serve.json"
    report = run(server.url.removesuffix("/v1"), concurrency=2, requests=6, prompt_len=6, long_prompt_len=40,
                 long_fraction=0.34, output_len=8, json_path=str(out), compare_model=str(model_path))
    saved = json.loads(out.read_text())
    assert saved["completed"] == 6 and saved["errors"] == 0
    assert saved["ttft_s"]["p50"] > 0 and saved["tpot_s"]["p99"] >= saved["tpot_s"]["p50"] > 0
    assert saved["output_tok_s"] > 0 and saved["in_process_decode_tok_s"] > 0
    assert report["ttft_long_s"]["p50"] is not None  # the mix had long prompts


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


# --- failover: a separate server, since its decode services get killed -------------------------


@pytest.fixture(scope="module")
def failover_server(model_path, tmp_path_factory):
    s = Server(model_path, tmp_path_factory.mktemp("failover") / "serve.log", model={"name": MODEL},
               router={"short_prompt": SHORT, "heartbeat_s": 0.1, "dead_after_s": 1.0},
               prefill={"threads": 1, "chunk_size": 64},
               decode={"numa_nodes": [0, 0], "num_blocks": 64, "block_size": 16, "threads": 1})
    yield s
    assert s.stop() == 0, s.log_path.read_text()[-3000:]
    assert s.leftovers() == []


def _stream(url: str, prompt: str, max_tokens: int, started) -> dict:
    """A streamed completion read to the end: its text, usage, finish reason and any error."""
    out = {"text": "", "usage": None, "finish": None, "error": None}
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=60) as r:
        if r.status_code != 200:
            out["error"] = r.read().decode()
            started.set()
            return out
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"]
                continue
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
            for c in chunk.get("choices", []):
                out["text"] += c["text"]
                out["finish"] = c["finish_reason"] or out["finish"]
                if len(out["text"]) >= 2:
                    started.set()
    started.set()
    return out


def test_killed_decode_requests_are_rehomed_then_fail_cleanly(failover_server):
    import os
    import signal
    import threading

    s = failover_server
    url = s.url
    decodes = s.pids("decode")
    assert len(decodes) == 2
    started = [threading.Event(), threading.Event()]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_stream, url, f"Failover stream number {i}, long enough to prefill", 300, started[i])
                   for i in range(2)]
        for ev in started:
            assert ev.wait(30)
        os.kill(decodes[0], signal.SIGKILL)  # one of the two streams lives there
        results = [f.result(timeout=60) for f in futures]
    for r in results:
        assert r["error"] is None, r
        assert r["finish"] == "length" and r["usage"]["completion_tokens"] == 300
    assert any('"re-homing"' in line for line in s.logs())
    # The last decode service dies too: its request fails with a clear error, nothing hangs.
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_stream, url, "The last one standing, long enough to prefill", 300, started)
        assert started.wait(30)
        os.kill(s.pids("decode")[0], signal.SIGKILL)
        r = fut.result(timeout=60)
    assert r["error"] is not None and "no decode service" in str(r["error"]), r
    after = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": "anyone?", "max_tokens": 2}, timeout=30)
    assert after.status_code == 503 and after.json()["error"]["message"]
    # A decode service started alone attaches to the published weights (no reload) and serves.
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "decode", "--config", str(s.run_dir / "config.toml"),
                             "--name", "decode-new"], stderr=s.log)
    try:
        deadline = time.monotonic() + 60
        while httpx.get(url.removesuffix("/v1") + "/health").status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        r = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": "back again", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        attached = [r for r in s.records() if r.get("name") == "decode-new" and r.get("event") == "attached"]
        assert attached and attached[0]["seconds"] < 10
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
