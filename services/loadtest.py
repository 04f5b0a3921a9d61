"""``hybridmoe bench serve``: a load test of a running server over its OpenAI HTTP API.

It sends ``--requests`` streamed completions, ``--concurrency`` at a time, with a mix of short
and long prompts (token-id prompts, so their lengths are exact whatever the tokenizer), and
reports time to first token, time per output token and inter-token latency (p50/p90/p99),
request and token throughput, and errors. With ``--compare-model`` it then runs the in-process
decode engine on that checkpoint, one stream, and reports how much of its speed survives the
HTTP + ZeroMQ pipeline.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class _Result:
    prompt_len: int
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def _summary(values: list[float]) -> dict:
    return {"p50": _pct(values, 50), "p90": _pct(values, 90), "p99": _pct(values, 99),
            "mean": statistics.fmean(values) if values else None}


async def _one(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], output_len: int,
               headers: dict) -> _Result:
    res = _Result(len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    try:
        async with session.post(f"{url}/completions", json=body, headers=headers) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return res
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))
                    return res
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.gaps.append(now - last)
                    last = now
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - t0
    res.ok = res.tokens > 0
    if not res.ok:
        res.error = "no tokens"
    return res


async def _run(url: str, concurrency: int, requests: int, prompt_len: int, long_prompt_len: int,
               long_fraction: float, output_len: int, api_key: str, seed: int) -> tuple[list[_Result], float, str]:
    rng = random.Random(seed)
    n_long = round(requests * long_fraction)  # exactly this many, spread at random through the run
    lengths = [long_prompt_len] * n_long + [prompt_len] * (requests - n_long)
    rng.shuffle(lengths)
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in lengths]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{url}/models", headers=headers) as r:
            r.raise_for_status()
            model = (await r.json())["data"][0]["id"]
        sem = asyncio.Semaphore(concurrency)

        async def bounded(p: list[int]) -> _Result:
            async with sem:
                return await _one(session, url, model, p, output_len, headers)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        return list(results), time.perf_counter() - t0, model


def in_process_decode_tok_s(model_path: str, prompt_len: int, output_len: int) -> float:
    """One stream through the in-process decode engine on ``model_path``: tokens per second."""
    import torch

    from services.engine.decode import DecodeEngine
    from shared.kv_cache import blocks_for
    from shared.model import load_model
    from shared.sampling import SamplingParams

    model = load_model(model_path)
    engine = DecodeEngine(model, num_blocks=blocks_for(prompt_len + output_len + 16, 16), block_size=16,
                          prefill_threshold=max(prompt_len, 1))
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    prompt = [random.Random(0).randrange(3, 250) for _ in range(prompt_len)]
    with torch.inference_mode():
        engine.add("warm", prompt, SamplingParams(max_tokens=4, ignore_eos=True))
        engine.run_all()
        engine.add("r", prompt, params)
        engine.step()  # the prefill step and the first token
        t0 = time.perf_counter()
        n = 0
        while engine.has_work:
            n += len(engine.step())
        elapsed = time.perf_counter() - t0
    engine.close()
    return n / elapsed


def run(url: str, concurrency: int, requests: int, prompt_len: int, long_prompt_len: int, long_fraction: float,
        output_len: int, json_path: str | None, api_key: str = "", compare_model: str | None = None,
        seed: int = 0) -> dict:
    url = url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    if concurrency < 1 or requests < 1 or prompt_len < 1 or output_len < 1 or not 0 <= long_fraction <= 1:
        raise ValueError("--concurrency, --requests, --prompt-len and --output-len must be >= 1 and "
                         "--long-fraction in [0, 1]")
    results, elapsed, model = asyncio.run(_run(url, concurrency, requests, prompt_len, long_prompt_len,
                                               long_fraction, output_len, api_key, seed))
    ok = [r for r in results if r.ok]
    tpot = [(r.latency - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    gaps = [g for r in ok for g in r.gaps]
    out_tokens = sum(r.tokens for r in ok)
    report = {
        "url": url, "model": model, "concurrency": concurrency, "requests": requests,
        "prompt_len": prompt_len, "long_prompt_len": long_prompt_len, "long_fraction": long_fraction,
        "output_len": output_len, "duration_s": elapsed, "completed": len(ok), "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if not r.ok})[:5],
        "request_throughput": len(ok) / elapsed, "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + sum(r.prompt_len for r in ok)) / elapsed,
        "ttft_s": _summary([r.ttft for r in ok]),
        "ttft_long_s": _summary([r.ttft for r in ok if r.prompt_len == long_prompt_len]),
        "tpot_s": _summary(tpot), "itl_s": _summary(gaps),
        "decode_tok_s_per_stream": 1 / statistics.median(tpot) if tpot else None,
    }
    if compare_model:
        ref = in_process_decode_tok_s(compare_model, prompt_len, output_len)
        report["in_process_decode_tok_s"] = ref
        if report["decode_tok_s_per_stream"]:
            report["http_vs_in_process"] = report["decode_tok_s_per_stream"] / ref
    _print(report)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _print(r: dict) -> None:
    def ms(d: dict) -> str:
        return "  ".join(f"{k} {v * 1000:8.1f}" for k, v in d.items() if v is not None and k != "mean") or "-"

    print(f"hybridmoe bench serve: {r['url']} ({r['model']}), {r['requests']} requests, concurrency "
          f"{r['concurrency']}, prompts {r['prompt_len']} (long {r['long_prompt_len']} x{r['long_fraction']:.0%}), "
          f"output {r['output_len']}")
    print(f"  completed {r['completed']}, errors {r['errors']} {r['error_samples'] or ''}")
    print(f"  duration {r['duration_s']:.2f} s; {r['request_throughput']:.2f} req/s; output {r['output_tok_s']:.1f} "
          f"tok/s; total {r['total_tok_s']:.1f} tok/s")
    print(f"  TTFT ms       {ms(r['ttft_s'])}")
    print(f"  TTFT long ms  {ms(r['ttft_long_s'])}")
    print(f"  TPOT ms       {ms(r['tpot_s'])}")
    print(f"  ITL ms        {ms(r['itl_s'])}")
    if r.get("decode_tok_s_per_stream"):
        print(f"  decode per stream {r['decode_tok_s_per_stream']:.1f} tok/s (1 / median TPOT)")
    if "in_process_decode_tok_s" in r:
        ratio = r.get("http_vs_in_process")
        print(f"  in-process engine, one stream: {r['in_process_decode_tok_s']:.1f} tok/s"
              + (f"; through HTTP: {ratio:.1%} of it" if ratio else ""))

