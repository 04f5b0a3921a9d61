"""``hybridmoe bench kernels``: the CPU kernels against this machine's memory bandwidth and torch.

Everything is measured in one run: the machine's memory-read bandwidth first (all threads), then
each format x shape x token count, reported as GB/s of weights read, the fraction of the bandwidth
at which a plain read of the same bytes ran just before and after (read_bandwidth), and the speed
ratio against torch on the same problem (dequantized BF16 weights, and FP32). Enough distinct
weight copies are cycled through that no call finds its weights in cache. A GEMV's time is the
kernel's, its calls over the copies timed in a C loop (timing.h), as the plain reads it is held to
are; the same calls through the bound Python API (api.Gemv, as the decode service calls it: a call
checks only its activations) are timed too, as ``api_us``, and compared with torch's, both called
from Python. The whole-layer MoE call (api.Experts) is timed through Python: its milliseconds
dwarf the call's overhead.
"""

from __future__ import annotations

import glob
import json
import mmap
import time
from pathlib import Path

import torch

import cython_kernels
from cython_kernels import _kernels, api
from shared.quant import QuantWeight, quantize

SHAPES = {"deepseek-v3 gate/up": (2048, 7168), "deepseek-v3 down": (7168, 2048),
          "qwen3-30b-a3b gate/up": (768, 2048), "qwen3-30b-a3b down": (2048, 768)}
FORMATS = ("fp8_b128", "int4_g128", "int4_g32", "dense")
TOKENS = (1, 2, 4, 8, 16)


def _last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), 0 if it says nothing."""
    best = 0
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        n = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        best = max(best, n)
    return best


# bytes of weight copies cycled per problem: twice the last-level cache (a server's L3 reaches
# hundreds of MB: 480 MiB on the VM these figures come from, where 384 MiB of copies let BF16
# read part of its weights from L3 and report 1.1 of the DRAM bandwidth), at least 384 MiB
COPY_BYTES = max(384 << 20, 2 * _last_level_cache_bytes())


# seconds a timed pass runs at least: a kernel's, the API call's or torch's (best of three), and a
# read of a problem's own bytes (best of two, before and after)
PASS_SECONDS, READ_SECONDS = 0.1, 0.05


def _time(fn, copies: int, min_seconds: float = 0.3) -> float:
    """Seconds per call, cycling fn(i) over the copies."""
    fn(0)
    calls, start = 0, time.perf_counter()
    while True:
        for i in range(copies):
            fn(i)
        calls += copies
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def _best(fn, copies: int, passes: int = 3, min_seconds: float | None = None) -> float:
    """Seconds per call, the best of ``passes`` runs of :func:`_time`: the statistic the reads they
    are held to take (a shared machine's noise only ever slows a run), so that a fraction compares
    like with like."""
    return min(_time(fn, copies, min_seconds or PASS_SECONDS) for _ in range(passes))


def _read_gbps(nbytes: int, read, passes: int, min_seconds: float = 0.5) -> float:
    """GB/s of read() over nbytes, the best of ``passes`` timed runs (a shared machine's noise only
    ever lowers a read)."""
    return max(nbytes / _time(read, 1, min_seconds) / 1e9 for _ in range(passes))


def _roofline_bytes() -> int:
    """The machine-bandwidth reads' buffer: 1 GiB or twice the last-level cache, the larger."""
    return max(1 << 30, 2 * _last_level_cache_bytes())


def memory_bandwidth(threads: int, buf: torch.Tensor | None = None) -> float:
    """GB/s read with all threads from ``buf`` or a new buffer of 1 GiB or twice the last-level
    cache, whichever is larger: the best of three passes by each of two readers, torch's sum and a
    plain C sum prefetched into L2 as the kernels are (7-15 % faster than torch's on the machine
    these figures come from); the best, because a shared machine's noise only ever lowers it. The
    machine's figure, printed first."""
    torch.set_num_threads(threads)
    buf = torch.ones(_roofline_bytes() // 8, dtype=torch.int64) if buf is None else buf
    n = buf.numel() * buf.element_size() // 8 * 8
    readers = (lambda i: buf.sum(), lambda i: _kernels.read_sum(buf.data_ptr(), n, threads))
    return max(_read_gbps(n, f, 3) for f in readers)


def huge_page_read_bandwidth(threads: int, thp: str | Path = "/sys/kernel/mm/transparent_hugepage/enabled",
                             nbytes: int | None = None) -> float | None:
    """GB/s of the C sum over a buffer of :func:`_roofline_bytes` (or ``nbytes``), in anonymous
    memory advised into 2 MB pages (best of three): what this machine reads when the weights sit
    in huge pages (README, "Huge pages"). None where the kernel grants none (``thp`` says never or
    cannot be read). The kernels' fractions stay held to reads of their own bytes in 4 KB pages,
    as their weights are here."""
    try:
        if "[never]" in Path(thp).read_text():
            return None
    except OSError:
        return None
    n = nbytes or _roofline_bytes()
    with mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as mm:  # (shared: shmem, not THP)
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            return None
        buf = torch.frombuffer(mm, dtype=torch.int64)
        buf.fill_(1)  # (the pages are allocated here, huge where the kernel has them)
        ptr = buf.data_ptr()
        del buf  # (the mapping stays; it cannot close while a tensor holds it)
        if _anon_huge_bytes() < n // 2:  # (none to be had: no figure rather than a mislabelled one)
            return None
        return _read_gbps(n, lambda i: _kernels.read_sum(ptr, n, threads), 3)


def _anon_huge_bytes() -> int:
    """This process's anonymous memory in huge pages (/proc/self/smaps_rollup), 0 if unknown."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def read_bandwidth(tensors: list[torch.Tensor], threads: int, passes: int = 2) -> float:
    """GB/s of the C sum reading these tensors' bytes one after the other, all threads, best of
    ``passes`` (each timed in C, as the kernels are: :func:`kernel_seconds`)."""
    spans = [(t.data_ptr(), t.numel() * t.element_size() // 8 * 8) for t in tensors]
    total = sum(n for _, n in spans)
    return max(total / _kernels.time_read(spans, threads, READ_SECONDS) / 1e9 for _ in range(passes))


def kernel_seconds(bound: list[api.Gemv], x: torch.Tensor, out: torch.Tensor, threads: int, variant: str,
                   passes: int = 3) -> float:
    """Seconds per call of the kernel alone: each binding's GEMV in turn (copies of one problem),
    timed in C (timing.h), best of ``passes``. Through the bound Python API the same calls take
    tens of microseconds longer (the call's ``api_us``): its checks and the interpreter run with
    caches the previous call has just flushed."""
    x = api._activations(x, bound[0].cols, "bench", max_tokens=None)
    if not api._is_f32_matrix(out, bound[0].rows, x.shape[0]):
        raise ValueError(f"bench: out must be a contiguous CPU float32 [{x.shape[0]}, {bound[0].rows}] tensor")
    ws = [w for b in bound for w in b._wts]
    if len(ws) != len(bound):
        raise ValueError("bench: one weight per binding")
    code = api._variant_code(variant)
    return min(_kernels.time_gemv(code, ws, x.data_ptr(), x.shape[0], out.data_ptr(), threads, PASS_SECONDS)
               for _ in range(passes))


def _beside(read, timed, machine=None):
    """timed()'s result, the faster of read() just before and just after it, and the roofline it
    is held to: the fastest of those and of machine() (a read of the machine-bandwidth buffer)
    just before and just after.

    Why both. The speed of a plain read depends on where the pages it reads happen to lie: in one
    process on the VM these figures come from, 40 copies of a 2048 x 7168 FP8 weight read at
    25-28 GB/s in one allocation and at 31-32 in another, the order reversing from process to
    process, while the kernel ran at 25 GB/s on both. Held to its own bytes' read alone, a kernel
    whose weights landed badly scored 0.93-1.03 of it. Held also to the machine's buffer, read the
    same way beside it, it is held to what this machine can read."""
    own_before, machine_before = read(), machine() if machine else 0.0
    result = timed()
    own = max(own_before, read())
    return result, own, max(own, machine_before, machine() if machine else 0.0)


def _paths(variant: str) -> dict[str, bool]:
    """Which of avx512_bf16's paths are on (each switched by an environment variable; see README)."""
    on = variant == "avx512_bf16"
    return {"amx": on and _kernels.amx_enabled(), "amx_int8": on and _kernels.amx_int8_enabled(),
            "vnni": on and _kernels.vnni_enabled(), "fp16": on and _kernels.fp16_enabled()}


def _bytes_of(ws: list[QuantWeight]) -> list[torch.Tensor]:
    return [t for w in ws for t in (w.data, w.scale) if t is not None]


def bench_gemv(fmt: str, shape: tuple[int, int], threads: int, variant: str, machine=None) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    one = quantize(torch.randn(shape, generator=g).bfloat16() if fmt == "dense" else torch.randn(shape, generator=g),
                   fmt)
    # the copies hold the same values at other addresses: only where the bytes are matters
    copies = max(2, COPY_BYTES // one.nbytes)
    ws = [one] + [QuantWeight(one.fmt, one.data.clone(), None if one.scale is None else one.scale.clone(), one.shape)
                  for _ in range(copies - 1)]
    # bound once, as the decode service binds its weights: a call checks only its activations
    bound = [api.Gemv([w], threads=threads, variant=variant) for w in ws]
    b1, f1 = one.dequantize(torch.bfloat16), one.dequantize(torch.float32)
    bf16 = [b1] + [b1.clone() for _ in range(max(2, COPY_BYTES // b1.nbytes) - 1)]
    fp32 = [f1] + [f1.clone() for _ in range(max(2, COPY_BYTES // f1.nbytes) - 1)]
    rows = []
    for T in TOKENS:
        x = torch.randn(T, shape[1], generator=g)
        xb = x.bfloat16()
        out = torch.empty(T, shape[0])
        t_k, own, roof = _beside(lambda: read_bandwidth(_bytes_of(ws), threads),
                                 lambda x=x, out=out: kernel_seconds(bound, x, out, threads, variant), machine)
        # the API call against torch's: both through Python
        t_a = _best(lambda i, x=x, out=out: bound[i](x, out), len(ws))
        t_b = _best(lambda i, xb=xb: torch.matmul(xb, bf16[i].T), len(bf16))
        t_f = _best(lambda i, x=x: torch.matmul(x, fp32[i].T), len(fp32))
        gbps = one.nbytes / t_k / 1e9
        rows.append({"kind": "gemv", "format": fmt, "shape": list(shape), "tokens": T, "us": t_k * 1e6,
                     "api_us": t_a * 1e6, "gbps": gbps, "own_bytes_gbps": own, "bandwidth_gbps": roof,
                     "fraction_of_bandwidth": gbps / roof, "vs_torch_bf16": t_b / t_a, "vs_torch_fp32": t_f / t_a})
    return rows


def bench_moe(fmt: str, E: int | None, I: int, D: int, top_k: int, threads: int, variant: str,
              machine=None) -> list[dict]:
    """``E`` experts, or (None) enough that top-k touches a fraction (at least 32) and the layer
    is twice the last-level cache."""
    g = torch.Generator().manual_seed(1)

    def w(rows, cols):
        t = torch.randn(rows, cols, generator=g) * cols ** -0.5
        return quantize(t.bfloat16() if fmt == "dense" else t, fmt)

    one = {"gate": w(I, D), "up": w(I, D), "down": w(D, I)}
    per_expert = sum(q.nbytes for q in one.values())
    E = E or max(32, -(-COPY_BYTES // per_expert))

    def rep(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[None].expand(E, *x.shape).contiguous()

    def stack(q: QuantWeight) -> QuantWeight:  # one expert repeated E times: only where the bytes are matters
        return QuantWeight(fmt, rep(q.data), rep(q.scale), (E, *q.shape))

    stacked = [stack(one["gate"]), stack(one["up"]), stack(one["down"])]
    layer = api.Experts(*stacked, threads=threads, variant=variant)
    rows = []
    for T in TOKENS:
        x = torch.randn(T, D, generator=g)
        routings = [torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)]) for _ in range(16)]
        weights = torch.rand(T, top_k, generator=g)
        def call(i: int, x=x, r=routings, w=weights) -> None:
            layer(x, r[i], w)

        # the roofline: a plain read of the same bytes, the chosen experts' weights routing by
        # routing (their scales, under 1/32 of the bytes, left out: a read of each on its own is
        # mostly a fork and join). (A read of the whole stacked layer instead, one long stream per
        # thread, ran 2-4 % faster than 16 routings' experts read one by one, in one process.)
        chosen = [q.data[e] for r in routings for e in r.unique().tolist() for q in stacked]
        t, own, roof = _beside(lambda chosen=chosen: read_bandwidth(chosen, threads), lambda call=call: _best(call, 16),
                               machine)
        touched = sum(len(r.unique()) for r in routings) / len(routings) * per_expert
        gbps = touched / t / 1e9
        rows.append({"kind": "moe_layer", "format": fmt, "experts": E, "shape": [I, D], "top_k": top_k,
                     "tokens": T, "us": t * 1e6, "gbps": gbps, "own_bytes_gbps": own, "bandwidth_gbps": roof,
                     "fraction_of_bandwidth": gbps / roof})
    return rows


def _held(r: dict) -> str:
    """A record's fraction, the roofline it is held to and its own bytes' read, as printed."""
    return f"{r['fraction_of_bandwidth']:5.2f} of {r['bandwidth_gbps']:4.1f} (own {r['own_bytes_gbps']:4.1f})"


def run(json_path: str | None = None, threads: int | None = None, quick: bool = False,
        variant: str | None = None) -> dict:
    threads = threads or api.default_threads()
    variant = variant or cython_kernels.VARIANT
    if variant not in cython_kernels.supported_variants():
        raise ValueError(f"kernel variant {variant!r} is not one this CPU runs: {cython_kernels.supported_variants()}")
    roof = torch.ones(_roofline_bytes() // 8, dtype=torch.int64)  # (kept: each problem is held to it too)
    bw = memory_bandwidth(threads, roof)

    def machine() -> float:
        return read_bandwidth([roof], threads, passes=1)

    huge = huge_page_read_bandwidth(threads)
    paths = _paths(variant)
    print(f"kernel variant {variant} ({', '.join(k for k, on in paths.items() if on) or 'no AMX, VNNI or FP16'}), "
          f"{threads} threads; measured memory-read bandwidth {bw:.1f} GB/s"
          + (f" (in 2 MB pages {huge:.1f} GB/s)" if huge else ""))
    results: list[dict] = []
    shapes = dict(list(SHAPES.items())[:1]) if quick else SHAPES
    for fmt in FORMATS:
        for name, shape in shapes.items():
            for r in bench_gemv(fmt, shape, threads, variant, machine):
                results.append({**r, "name": name})
                print(f"gemv {fmt:10s} {name:22s} T={r['tokens']:2d} {r['us']:9.1f} us (API {r['api_us']:7.1f}) "
                      f"{r['gbps']:6.1f} GB/s "
                      f"{_held(r)}  x{r['vs_torch_bf16']:.2f} torch-bf16 x{r['vs_torch_fp32']:.2f} torch-fp32")
    for fmt in FORMATS[:2]:
        for r in bench_moe(fmt, 16 if quick else None, 2048, 7168, 8, threads, variant, machine):
            results.append(r)
            print(f"moe  {fmt:10s} E={r['experts']} top-{r['top_k']} 2048x7168 T={r['tokens']:2d} "
                  f"{r['us']:9.1f} us {r['gbps']:6.1f} GB/s {_held(r)}")
    best = max([bw] + [r["bandwidth_gbps"] for r in results])
    print(f"fastest plain read in 4 KB pages seen in this run: {best:.1f} GB/s")
    report = {"variant": variant, "paths": paths, "threads": threads, "memory_bandwidth_gbps": bw,
              "memory_bandwidth_best_gbps": best, "memory_bandwidth_huge_gbps": huge, "results": results}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report
