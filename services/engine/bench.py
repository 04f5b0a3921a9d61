"""``hybridmoe bench decode``: the engines on a real-shaped checkpoint, on the CPU.

Measured in one run: the machine's memory-read bandwidth; decode tok/s for 1, 2, 4, 8 streams
(continuous batching, CPU kernel experts); the one-stream step's bytes read per token (every
non-expert weight, the top-k experts of each MoE layer, the LM head) as a fraction of that
bandwidth; CPU stream-loading prefill tok/s; and, when transformers is installed, transformers'
own CPU forward of the same weights (a BF16 copy of the checkpoint made with the same seed, since
transformers has no CPU path for block-FP8) for the same prompt.

The weights are read where the decode service reads them: published into POSIX shared memory
(``shared.weight_store``, a namespace of this process, removed at the end) and attached, unless
``weights="file"`` (the checkpoint's files mapped by safetensors: the page cache of the file, which
reads about 7 % slower on the 2-core VM of the README's figures).
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from cython_kernels import bench as kbench
from services.engine.decode import DecodeEngine
from services.engine.prefill import PrefillEngine
from shared import envs, weight_store
from shared.kv_cache import blocks_for
from shared.layers import CausalLM, MoE
from shared.model import load_model
from shared.sampling import SamplingParams

STREAMS = (1, 2, 4, 8)


def bench_model_path(preset: str, layers: int, quant: str, seed: int = 0, device: str = "cpu") -> Path:
    """A make-model checkpoint kept in the cache folder, made on first use (its weights drawn on
    ``device``: a GPU makes real-shaped layers much faster, with its own random stream)."""
    from shared.make_model import make_model

    where = "" if device == "cpu" else f"-{device}"
    path = envs.cache_dir() / "bench" / f"{preset}-l{layers}-{quant}-s{seed}{where}"
    if not (path / "config.json").is_file():
        tmp = path.with_name(path.name + ".tmp")
        make_model(preset, tmp, layers=layers, quant=quant, seed=seed, progress=True, device=device)
        tmp.rename(path)
    return path


def step_bytes(model: CausalLM, experts_only: bool = False) -> int:
    """Bytes one single-token decode step must read: every weight but the routed experts, as the
    checkpoint stores it (an FP8 release's attention, shared experts and dense layers in FP8), plus
    top-k experts per MoE layer and the LM head (the embedding contributes one row). MLA's absorbed
    form reads fp32 copies of kv_b_proj instead of it (4x its FP8 bytes): what it must read is
    the stored weight, so that is what counts. With ``experts_only``, the top-k experts alone:
    what the CPU reads when the rest is on a GPU."""
    total = 0
    for layer in model.layers:
        for name, buf in layer.named_buffers():
            if ".experts." not in f".{name}" and not experts_only:
                total += buf.numel() * buf.element_size()
        if isinstance(layer.ffn, MoE):
            ex = layer.ffn.experts
            per_expert = sum(ex.weight(n).nbytes for n in ("gate", "up", "down")) / ex.num_experts
            total += int(per_expert * model.args.num_experts_per_tok)
    for t in () if experts_only else (model.lm_head, model.norm.weight):
        total += t.numel() * t.element_size()
    return total


def bench_decode(model: CausalLM, streams: int, prompt_len: int, steps: int, overlap: bool,
                 device: str = "cpu") -> dict:
    V = model.embed.shape[0]
    g = torch.Generator().manual_seed(streams)
    eng = DecodeEngine(model, num_blocks=streams * blocks_for(prompt_len + steps + 2, 16) + 1, block_size=16,
                       prefill_threshold=prompt_len, experts="kernel", overlap=overlap, device=device)
    for i in range(streams):
        eng.add(str(i), torch.randint(0, V, (prompt_len,), generator=g).tolist(),
                SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    eng.step()  # admission and the prompts' prefill
    eng.step()  # warm-up decode step
    start = time.perf_counter()
    for _ in range(steps):
        eng.step()
    dt = time.perf_counter() - start
    eng.close()
    return {"streams": streams, "overlap": overlap, "step_ms": dt / steps * 1e3, "tok_s": streams * steps / dt,
            "tok_s_per_stream": steps / dt}


def bench_prefill(model: CausalLM, prompt_len: int, chunk: int) -> float:
    eng = PrefillEngine(model, chunk_size=chunk)
    ids = torch.randint(0, model.embed.shape[0], (prompt_len,), generator=torch.Generator().manual_seed(0))
    eng.prefill(ids[: min(prompt_len, 16)])  # warm-up
    start = time.perf_counter()
    eng.prefill(ids)
    dt = time.perf_counter() - start
    eng.close()
    return prompt_len / dt


def bench_transformers_prefill(path: Path, prompt_len: int) -> float | None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids[:, :16])
        start = time.perf_counter()
        model(ids)
        dt = time.perf_counter() - start
    del model
    gc.collect()
    return prompt_len / dt


WEIGHTS = ("shm", "file")


@contextmanager
def loaded(path: Path, weights: str = "shm"):
    """The model at ``path`` with its weights in shared memory as the services read them (published
    under a namespace of this process and removed on the way out), or (``file``) mapped from the
    checkpoint's files."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if weights == "file":
        yield load_model(path)
        return
    with tempfile.TemporaryDirectory() as d:
        manifest = weight_store.publish(path, Path(d) / "manifest.json", namespace=f"hmbench{os.getpid()}")
        attached = None
        try:
            attached = weight_store.attach(Path(d) / "manifest.json")
            yield attached.build("cpu")
        finally:
            weight_store.unlink(manifest)  # (the memory goes with the last mapping)
            if attached is not None:
                attached.close()


def run(preset: str = "qwen3-30b-a3b", layers: int = 4, quant: str = "fp8", model_path: str | None = None,
        prompt_len: int = 256, steps: int = 8, json_path: str | None = None, compare: bool = True,
        threads: int | None = None, device: str = "cpu", weights: str = "shm") -> dict:
    """``device``: where decode's attention and dense parts run (the routed experts are always on
    the CPU kernels). On a GPU the one-stream roofline counts the experts' bytes only (what the
    CPU reads), and the CPU prefill and transformers comparison are skipped. ``weights``: see
    :func:`loaded`."""
    from cython_kernels import api

    threads = threads or api.default_threads()
    bw = kbench.memory_bandwidth(threads)
    path = Path(model_path) if model_path else bench_model_path(preset, layers, quant)
    with loaded(path, weights) as model:
        report = _run_loaded(model, path, bw, threads, prompt_len, steps, device, weights)
        del model
    on_cpu = torch.device(device).type == "cpu"
    gc.collect()
    if on_cpu and compare and not model_path:
        bf16 = bench_model_path(preset, layers, "bf16") if quant != "bf16" else path
        hf = bench_transformers_prefill(bf16, prompt_len)
        if hf is not None:
            report["transformers_prefill_tok_s"] = hf
            ours = load_model(bf16)
            report["prefill_bf16_tok_s"] = bench_prefill(ours, prompt_len, chunk=prompt_len)
            del ours
            print(f"prefill {prompt_len} tokens, same weights in BF16: ours {report['prefill_bf16_tok_s']:.1f} "
                  f"tok/s, transformers {hf:.1f} tok/s (x{report['prefill_bf16_tok_s'] / hf:.2f})")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _run_loaded(model: CausalLM, path: Path, bw: float, threads: int, prompt_len: int, steps: int, device: str,
                weights: str) -> dict:
    on_cpu = torch.device(device).type == "cpu"
    huge = weight_store.shm_huge_pages() if weights == "shm" else None
    print(f"model {path} (weights: {weights}{f', /dev/shm huge={huge}' if huge else ''}); {threads} threads; "
          f"measured memory-read bandwidth {bw:.1f} GB/s; attention on {device}")
    nbytes = step_bytes(model, experts_only=not on_cpu)
    report: dict = {"model": str(path), "weights": weights, "shm_huge": huge, "threads": threads,
                    "memory_bandwidth_gbps": bw, "device": device,
                    "step_bytes_one_token": nbytes, "step_bytes_counted": "all" if on_cpu else "routed experts",
                    "decode": [], "prompt_len": prompt_len}
    for overlap in (False, True):
        for n in STREAMS:
            r = bench_decode(model, n, 32, steps, overlap, device)
            if n == 1:
                r["fraction_of_bandwidth"] = nbytes / (r["step_ms"] / 1e3) / 1e9 / bw
            report["decode"].append(r)
            frac = f"  {r['fraction_of_bandwidth']:.2f} of bw ({nbytes / 1e6:.0f} MB/token)" if n == 1 else ""
            print(f"decode {n} stream(s) overlap={'on ' if overlap else 'off'} {r['step_ms']:8.1f} ms/step "
                  f"{r['tok_s']:7.2f} tok/s{frac}")
    if on_cpu:
        report["prefill_tok_s"] = bench_prefill(model, prompt_len, chunk=prompt_len)
        print(f"prefill {prompt_len} tokens (CPU, stream-loading): {report['prefill_tok_s']:.1f} tok/s")
    return report
