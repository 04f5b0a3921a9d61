"""Stream-loading prefill (SLP).

Everything but the routed experts is resident on the prefill device. The routed experts stay in
host memory (pinned on CUDA, so copies are DMA) and are streamed, layer by layer, into a ring of
``depth`` staging slots on the device by :class:`ExpertStreamer`: while layer L computes from its
slot, layer L+1's experts are already being copied into the next one, on a separate CUDA stream
(on CPU, a copy thread). A slot is refilled only after the compute that read it is done.

Long prompts run in chunks (``chunk_size`` tokens, large by default: each streamed byte then
serves more tokens); attention of a chunk covers the whole cache so far, so chunking is exact.

Expert parallelism (DSLP / SmallEP): with a torch.distributed group of W ranks, rank r owns the
whole experts ``[E*r/W, E*(r+1)/W)`` and streams only those. Every rank holds the same tokens and
runs the dense parts; each computes its experts' share of the routed output and an all-reduce
sums the shares. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cython_kernels import api
from services.engine.experts import kernel_unsupported_reason, place_except_experts
from services.engine.runner import ModelRunner, Segment
from shared.kv_cache import ContiguousKV
from shared.layers import CausalLM, MoE, QuantLinear, RoutedExperts, experts_forward
from shared.quant import QuantWeight, dequantize_fast
from shared.sampling import Choice, SamplingParams, choose

ExpertWeights = tuple[QuantWeight, QuantWeight, QuantWeight]  # gate, up, down


def _empty_like(w: QuantWeight, device: torch.device) -> QuantWeight:
    scale = None if w.scale is None else torch.empty_like(w.scale, device=device)
    return QuantWeight(w.fmt, torch.empty_like(w.data, device=device), scale, w.shape)


def _copy(dst: QuantWeight, src: QuantWeight, non_blocking: bool) -> None:
    dst.data.copy_(src.data, non_blocking=non_blocking)
    if src.scale is not None:
        dst.scale.copy_(src.scale, non_blocking=non_blocking)


def _nbytes(ws: ExpertWeights) -> int:
    return sum(w.nbytes for w in ws)


def choose_depth(layer_bytes: int, device: torch.device, budget_fraction: float = 0.5) -> int:
    """2 or 3 staging slots, as many as fit in ``budget_fraction`` of the free device memory."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    fits = int(free * budget_fraction // max(layer_bytes, 1))
    if fits < 2:
        raise MemoryError(f"stream-loading prefill needs 2 staging slots of {layer_bytes / 2**20:.0f} MiB "
                          f"(one layer's routed experts); {free / 2**20:.0f} MiB is free on {device}")
    return min(fits, 3)


class ExpertStreamer:
    """A ring of staging slots on ``device``, filled from the host weights of each MoE layer in
    the order the passes visit them. On CPU ``trace`` records (event, layer, seconds): a copy's
    issue, start and end, a compute's start and end; on CUDA see ``cuda_times``."""

    def __init__(self, host: dict[int, ExpertWeights], device: torch.device, depth: int | None = None,
                 copy_on_cpu: bool = False) -> None:
        if not host:
            raise ValueError("no routed experts to stream")
        self.host, self.device = host, device
        self.order = sorted(host)
        first = host[self.order[0]]
        for li in self.order:
            if [w.shape for w in host[li]] != [w.shape for w in first] or host[li][0].fmt != first[0].fmt:
                raise ValueError(f"layer {li}'s experts differ in shape or format from layer {self.order[0]}'s")
        self.layer_bytes = _nbytes(first)
        self.cuda = device.type == "cuda"
        self.copy = self.cuda or copy_on_cpu
        self.depth = depth or (choose_depth(self.layer_bytes, device) if self.copy else 2)
        if self.depth < 2:
            raise ValueError(f"the staging ring needs at least 2 slots, got {self.depth}")
        # On CPU the host memory is the device memory: unless asked to copy (which the tests do,
        # to exercise the ring), a slot is the host weights themselves and a load costs nothing.
        self.slots: list = [tuple(_empty_like(w, device) for w in first) if self.copy else None
                            for _ in range(self.depth)]
        self.trace: list[tuple[str, int, float]] = []
        self.cuda_events: list[tuple[str, int, torch.cuda.Event]] = []
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event() for _ in range(self.depth)]
            self.free = [torch.cuda.Event() for _ in range(self.depth)]
        else:
            self.pending: list[Future | None] = [None] * self.depth
            self.copier = ThreadPoolExecutor(1, thread_name_prefix="hybridmoe-stream") if self.copy else None
        self.schedule: list[int] = []
        self.cursor = 0
        self.dry = False  # benchmarks only: skip the copies (the slots keep stale weights) to time compute alone

    def begin(self, passes: int) -> None:
        """Plan ``passes`` visits of every MoE layer and start the first ``depth`` copies."""
        if self.cursor < len(self.schedule):
            raise RuntimeError("a streaming pass is still in progress")
        self.schedule, self.cursor = self.order * passes, 0
        self.trace, self.cuda_events = [], []  # this pass's
        for i in range(min(self.depth, len(self.schedule))):
            self._load(i)

    def _load(self, i: int) -> None:
        layer, slot = self.schedule[i], i % self.depth
        src, dst = self.host[layer], self.slots[slot]
        if not self.copy:
            self.slots[slot] = src
            now = time.perf_counter()
            self.trace += [("copy_issue", layer, now), ("copy_start", layer, now), ("copy_end", layer, now)]
            self.pending[slot] = None
        elif self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[slot])  # the compute that read the slot is done
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(self.copy_stream)
                for d, s in zip(dst, src, strict=True):
                    if not self.dry:
                        _copy(d, s, non_blocking=True)
                end.record(self.copy_stream)
                self.ready[slot].record(self.copy_stream)
            self.cuda_events += [("copy_start", layer, start), ("copy_end", layer, end)]
        else:
            self.trace.append(("copy_issue", layer, time.perf_counter()))

            def copy() -> None:
                self.trace.append(("copy_start", layer, time.perf_counter()))
                for d, s in zip(dst, src, strict=True):
                    _copy(d, s, non_blocking=False)
                self.trace.append(("copy_end", layer, time.perf_counter()))
            self.pending[slot] = self.copier.submit(copy)

    def acquire(self, layer: int) -> ExpertWeights:
        """The slot holding ``layer``'s experts, once its copy is done (on CUDA: once the compute
        stream has been told to wait for it)."""
        if self.cursor >= len(self.schedule) or self.schedule[self.cursor] != layer:
            expected = self.schedule[self.cursor] if self.cursor < len(self.schedule) else None
            raise RuntimeError(f"experts of layer {layer} asked for; the stream plan expects {expected}")
        slot = self.cursor % self.depth
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            self.cuda_events.append(("compute_start", layer, ev))
        else:
            if self.pending[slot] is not None:
                self.pending[slot].result()
            self.trace.append(("compute_start", layer, time.perf_counter()))
        return self.slots[slot]

    def release(self, layer: int) -> None:
        """The compute that reads ``layer``'s slot has been issued: refill the slot behind it."""
        slot = self.cursor % self.depth
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            self.cuda_events.append(("compute_end", layer, ev))
        else:
            self.trace.append(("compute_end", layer, time.perf_counter()))
        self.cursor += 1
        nxt = self.cursor + self.depth - 1
        if nxt < len(self.schedule):
            self._load(nxt)

    def cuda_times(self) -> list[tuple[str, int, float]]:
        """The CUDA events as (event, layer, milliseconds since the first), after a synchronize."""
        torch.cuda.synchronize(self.device)
        if not self.cuda_events:
            return []
        t0 = self.cuda_events[0][2]
        return [(k, layer, t0.elapsed_time(e)) for k, layer, e in self.cuda_events]

    def close(self) -> None:
        if not self.cuda and self.copier is not None:
            self.copier.shutdown(wait=True)


class StreamedExperts:
    """Expert backend of the prefill runner: each layer's experts from the streamer's slot,
    computed with torch on the device, or (``kernels``, on CPU) by the CPU kernels' whole-layer
    call on the weights as they are stored (FP8 and INT4 never dequantized to a copy); with a
    process group, this rank's share, all-reduced."""

    def __init__(self, streamer: ExpertStreamer, first: int = 0, group: dist.ProcessGroup | None = None,
                 kernels: bool = False, threads: int | None = None) -> None:
        self.streamer, self.first, self.group = streamer, first, group
        self.kernels, self.threads = kernels, threads

    def start(self, layer: int, experts: RoutedExperts, x, ids, weights) -> torch.Tensor:
        g, u, d = self.streamer.acquire(layer)
        if self.kernels:  # this rank's experts are first .. first + E - 1; other choices are -1: none
            local = ids - self.first
            local = local.masked_fill((local < 0) | (local >= g.shape[0]), -1)
            out = api.Experts(g, u, d, threads=self.threads)(x, local, weights.float())
        else:
            out = experts_forward(x, ids, weights, g, u, d, first=self.first, dequantize=dequantize_fast)
        self.streamer.release(layer)
        if self.group is not None:
            dist.all_reduce(out, group=self.group)
        return out

    def finish(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


@dataclass
class PrefillResult:
    choice: Choice  # the first sampled token (and its logprobs if asked)
    kv: list[torch.Tensor]  # per layer [prompt tokens, kv_width]
    logits: torch.Tensor  # fp32 [V] for the last token, or [P, V] with all_logits


KVCallback = Callable[[int, int, torch.Tensor], None]  # (layer, first position, entries)


class PrefillEngine:
    """Chunked, stream-loading prefill of one prompt at a time on ``device``.

    On CUDA the model's non-expert weights are moved to the device and its routed experts are
    taken over (pinned in host memory, streamed from there): the model object is the engine's
    afterwards. On CPU the model is left as it is and the ring's slots are its experts in place
    (``copy_on_cpu`` makes the ring copy them, as on a GPU: the tests use it).
    """

    def __init__(self, model: CausalLM, device: str | torch.device = "cpu", chunk_size: int = 16384,
                 depth: int | None = None, group: dist.ProcessGroup | None = None, copy_on_cpu: bool = False,
                 host_pinned: bool = False, experts: str = "auto", threads: int | None = None) -> None:
        """``host_pinned``: the routed experts already lie in page-locked host memory (the weight
        store's shared pages registered with CUDA), so they are streamed from where they are.

        ``experts``: on CPU, "kernel" (the CPU kernels' whole-layer call, on ``threads`` threads:
        FP8 and INT4 multiplied as stored; 2.9x the tok/s of "torch" at Qwen3-30B-A3B's shapes),
        "torch" (each layer's chosen experts dequantized, ``F.linear``) or "auto": the kernels
        when they can run the experts (FP8, INT4, BF16) and the model computes in bf16, whose
        rounding of the activations the kernels share; an fp32 model's experts take torch, since
        the kernels would round its activations to bf16. On a GPU the experts are torch's on the
        device ("auto" or "torch").

        Quantized linear layers (an FP8 checkpoint's attention, shared experts and dense layers)
        are dequantized once and kept dense, on a GPU at placement, on the CPU at first use: the
        GEMMs of long chunks want them so (on the CPU that is a second copy beside the FP8 one)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.device = torch.device(device)
        if experts not in ("auto", "kernel", "torch"):
            raise ValueError(f"experts must be 'kernel', 'torch' or 'auto', got {experts!r}")
        if experts == "kernel" and self.device.type != "cpu":
            raise ValueError(f"the CPU kernels compute prefill's experts on the CPU, not on {self.device}")
        reason = kernel_unsupported_reason(model) if self.device.type == "cpu" else "not on the CPU"
        if experts == "kernel" and reason:
            raise ValueError(f"the CPU kernels cannot run this model: {reason}")
        auto = reason is None and model.dtype == torch.bfloat16
        self.experts = "kernel" if experts == "kernel" or (experts == "auto" and auto) else "torch"
        self.chunk_size = chunk_size
        self.group = group
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
        self.model = model
        moe_layers = {i: layer.ffn.experts for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoE)}
        E = next(iter(moe_layers.values())).num_experts if moe_layers else 0
        self.expert_range = (E * rank // world, E * (rank + 1) // world)
        lo, hi = self.expert_range
        host = {i: tuple(ex.weight(n).experts(lo, hi) for n in ("gate", "up", "down")) for i, ex in moe_layers.items()}
        if self.device.type == "cuda":
            if not host_pinned:
                host = {i: tuple(_pinned(w) for w in ws) for i, ws in host.items()}
            for ex in moe_layers.values():  # the host copies are the experts' only home now
                for n in ("gate", "up", "down"):
                    setattr(ex, f"{n}_data", torch.empty(0))
                    if getattr(ex, f"{n}_scale") is not None:
                        setattr(ex, f"{n}_scale", torch.empty(0))
            place_except_experts(model, self.device)
        elif self.device.type != model.device.type:
            raise ValueError(f"the model is on {model.device}; a prefill engine on {self.device} needs it on the CPU")
        else:  # quantized linears (an FP8 checkpoint's attention, ...) dequantized once, as a GPU places them
            for mod in model.modules():
                if isinstance(mod, QuantLinear):
                    mod.keep_dense = True
        self.streamer = ExpertStreamer(host, self.device, depth, copy_on_cpu) if host else None
        backend = StreamedExperts(self.streamer, lo, group, self.experts == "kernel", threads) if host else None
        self.runner = ModelRunner(model, backend)
        self.widths = [layer.attn.kv_width for layer in model.layers]

    @torch.inference_mode()
    def prefill(self, tokens: list[int] | torch.Tensor, params: SamplingParams | None = None,
                on_kv: KVCallback | None = None, all_logits: bool = False,
                layer_hook: Callable[[int], None] | None = None) -> PrefillResult:
        """Prefill ``tokens``; ``on_kv(layer, start, entries)`` receives each chunk's cache
        entries of each layer as soon as they exist (so they can be shipped meanwhile);
        ``layer_hook(layer)`` runs before each layer of each chunk (the benchmark times layers)."""
        ids = torch.as_tensor(tokens, dtype=torch.int64).flatten()
        P = ids.shape[0]
        if P == 0:
            raise ValueError("cannot prefill an empty prompt")
        vocab = self.model.embed.shape[0]
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab})")
        params = (params or SamplingParams()).validate()
        kv = ContiguousKV(self.widths, self.model.dtype, self.device, capacity=P)
        chunks = [(c, min(c + self.chunk_size, P)) for c in range(0, P, self.chunk_size)]
        # The token ids go to the device before the streaming starts: a small copy issued while
        # the experts' copies are in flight waits for them, and the host with it.
        ids = ids.to(self.device)
        if self.streamer is not None:
            self.streamer.begin(len(chunks))
        hook = (lambda layer, seg, entries: on_kv(layer, seg.start, entries)) if on_kv else None
        logits = []
        for c0, c1 in chunks:
            seg = Segment(ids[c0:c1], c0, kv, all_logits=all_logits)
            logits.append(self.runner.forward([seg], kv_hook=hook, layer_hook=layer_hook)[0])
        out = torch.cat(logits) if all_logits else logits[-1]
        last = out[-1] if all_logits else out
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        return PrefillResult(choose(last.cpu(), params, gen), [kv.read(i, P) for i in range(len(self.widths))],
                             out.cpu())

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()


def _pinned(w: QuantWeight) -> QuantWeight:
    scale = None if w.scale is None else w.scale.contiguous().pin_memory()
    return QuantWeight(w.fmt, w.data.contiguous().pin_memory(), scale, w.shape)
