"""Hybrid CPU decode with continuous batching over a paged KV cache.

Requests join and leave between steps. A request arrives either with its prompt's KV cache and
first token from a prefill engine (possibly another process: the cache is just one tensor per
layer), or with a short prompt only (up to ``prefill_threshold`` tokens), which the engine
prefills itself as part of its next step.

Admission reserves the blocks a request can ever need (prompt + max_tokens, up to the context
length), so a running request never runs out of cache and nothing is preempted; requests wait in
order while the cache is full. Per layer, attention and the dense parts run on ``device`` (the CPU,
or a GPU: the hybrid placement) and the routed experts on the CPU kernels (whole-layer call) in
host memory; with ``overlap`` the batch is split in two and one half's experts run on the kernel
pool while the other half's attention runs. MLA attention uses the absorbed form over the cached
latents; the KV cache lives on ``device``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from cython_kernels import api
from services.engine.experts import KernelExperts, kernel_unsupported_reason, place_except_experts
from services.engine.runner import ModelRunner, Segment, TorchExperts
from shared.kv_cache import PagedKVCache, SequenceKV, blocks_for
from shared.layers import CausalLM
from shared.sampling import Choice, SamplingParams, choose


@dataclass
class TokenEvent:
    request_id: str
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", or None while running
    logits: torch.Tensor | None = None  # fp32 [V] the token was sampled from (keep_logits only)
    new: bool = True  # False: prefill's first token, reported again only because it ends the request


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    kv: list[torch.Tensor] | None = None  # from prefill, until admitted
    first: Choice | None = None  # the token prefill sampled
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens in the cache
    pending: list[int] = field(default_factory=list)  # tokens to feed in the next step
    generated: list[int] = field(default_factory=list)


class DecodeEngine:
    def __init__(self, model: CausalLM, *, num_blocks: int = 1024, block_size: int = 16, max_batch: int = 64,
                 max_context: int | None = None, prefill_threshold: int = 512, experts: str = "auto",
                 overlap: bool = False, threads: int | None = None, eos_token_id: int | None = None,
                 keep_logits: bool = False, device: str | torch.device | None = None) -> None:
        """``experts``: "kernel" (the CPU kernels), "torch" (the pure-torch reference on the
        model's device) or "auto" (the kernels when they can run this model's experts).

        ``device``: where attention, the dense parts and the KV cache run (default: where the
        model is). With the kernels the routed experts stay in host memory and everything else
        moves there; with "torch" experts the whole model moves. The model is the engine's."""
        self.block_size, self.max_batch = block_size, max_batch
        self.max_context = max_context or num_blocks * block_size
        if self.max_context > num_blocks * block_size:
            raise ValueError(f"max_context {self.max_context} exceeds the cache ({num_blocks} blocks of {block_size})")
        reason = kernel_unsupported_reason(model)
        if experts == "auto":
            experts = "torch" if reason else "kernel"
        if experts not in ("kernel", "torch"):
            raise ValueError(f"experts must be 'kernel', 'torch' or 'auto', got {experts!r}")
        if experts == "kernel" and reason:
            raise ValueError(f"the CPU kernels cannot run this model: {reason}")
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"the decode device is {device}, but no CUDA device is visible")
            if experts == "kernel":
                place_except_experts(model, device)
            else:
                model.to(device)
        self.model = model
        self.prefill_threshold = prefill_threshold
        self.eos_token_id, self.keep_logits, self.overlap = eos_token_id, keep_logits, overlap
        widths = [layer.attn.kv_width for layer in model.layers]
        self.cache = PagedKVCache(widths, num_blocks, block_size, model.dtype, model.device)
        if experts == "kernel":
            self.pool = api.MoEPool(threads) if overlap else None
            backend = KernelExperts(threads=threads, pool=self.pool)
        else:
            self.pool, backend = None, TorchExperts()
        self.experts = experts
        self.runner = ModelRunner(model, backend, absorbed_mla=True, cpu_lm_head=experts == "kernel")
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []

    # --- requests ----------------------------------------------------------------------------

    def add(self, request_id: str, prompt: list[int], params: SamplingParams | None = None,
            kv: list[torch.Tensor] | None = None, first: Choice | None = None) -> None:
        """Queue a request. With ``kv`` (one [len(prompt), width] tensor per layer) and ``first``
        (the token prefill sampled, already reported to the client), decoding continues from
        there; without, the prompt is prefilled here and must be at most ``prefill_threshold``."""
        params = (params or SamplingParams()).validate()
        if any(r.id == request_id for r in (*self.waiting, *self.running)):
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model.embed.shape[0]
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab})")
        if len(prompt) + 1 > self.max_context:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this engine's context is {self.max_context}")
        if (kv is None) != (first is None):
            raise ValueError("a prefilled request brings both its KV cache and its first token")
        if kv is None and len(prompt) > self.prefill_threshold:
            raise ValueError(f"a prompt of {len(prompt)} tokens needs the prefill engine (this engine "
                             f"prefills up to {self.prefill_threshold})")
        if kv is not None:
            if len(kv) != len(self.cache.layers):
                raise ValueError(f"KV for {len(kv)} layers; the model has {len(self.cache.layers)}")
            for i, (t, buf) in enumerate(zip(kv, self.cache.layers, strict=True)):
                if tuple(t.shape) != (len(prompt), buf.shape[1]):
                    raise ValueError(f"layer {i} KV is {list(t.shape)}, expected [{len(prompt)}, {buf.shape[1]}]")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.waiting.append(_Request(request_id, list(prompt), params, gen, kv, first))

    def abort(self, request_id: str) -> bool:
        """Drop a request (waiting or running) and free its blocks. False if unknown."""
        for r in self.waiting:
            if r.id == request_id:
                self.waiting.remove(r)
                return True
        for r in self.running:
            if r.id == request_id:
                self._retire(r)
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_usage(self) -> float:
        a = self.cache.allocator
        return 1 - a.num_free / a.num_blocks

    def free_tokens(self) -> int:
        return self.cache.allocator.num_free * self.block_size

    # --- stepping ----------------------------------------------------------------------------

    def _need_blocks(self, r: _Request) -> int:
        return blocks_for(min(len(r.prompt) + r.params.max_tokens, self.max_context), self.block_size)

    def _admit(self) -> list[TokenEvent]:
        events = []
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]
            need = self._need_blocks(r)  # <= the cache: __init__ bounds max_context by it
            if need > self.cache.allocator.num_free:
                break  # first come, first served: later requests wait too
            self.waiting.popleft()
            r.blocks = self.cache.allocator.allocate(need)
            self.running.append(r)
            if r.kv is not None:
                for li, t in enumerate(r.kv):
                    self.cache.write(li, r.blocks, 0, t)
                r.kv, r.cached = None, len(r.prompt)
                ev = self._accept(r, r.first, None)
                ev.new = False
                if ev.finish_reason is not None:
                    events.append(ev)  # the first token already ends it: report the reason
            else:
                r.pending = list(r.prompt)
        return events

    def _accept(self, r: _Request, c: Choice, logits: torch.Tensor | None) -> TokenEvent:
        r.generated.append(c.token)
        r.pending = [c.token]
        reason = None
        stops = set(r.params.stop_token_ids)
        if not r.params.ignore_eos and self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        if c.token in stops:
            reason = "stop"
        elif len(r.generated) >= r.params.max_tokens or len(r.prompt) + len(r.generated) >= self.max_context:
            reason = "length"
        ev = TokenEvent(r.id, c.token, c.logprob, c.top_logprobs, reason, logits if self.keep_logits else None)
        if reason is not None:
            self._retire(r)
        return ev

    def _retire(self, r: _Request) -> None:
        self.running.remove(r)
        self.cache.allocator.free(r.blocks)
        r.blocks = []

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit what fits, run one step over every running request, return the new tokens."""
        events = self._admit()
        batch = [r for r in self.running if r.pending]
        if not batch:
            return events
        segments = [Segment(torch.tensor(r.pending), r.cached, SequenceKV(self.cache, r.blocks)) for r in batch]
        logits = torch.stack(self.runner.forward(segments, overlap=self.overlap)).cpu()  # one transfer from a GPU
        for r, lg in zip(batch, logits, strict=True):
            r.cached += len(r.pending)
            events.append(self._accept(r, choose(lg, r.params, r.generator), lg))
        return events

    def run_all(self) -> dict[str, list[TokenEvent]]:
        """Step until nothing is left; every request's events in order (tests, benchmarks)."""
        out: dict[str, list[TokenEvent]] = {}
        while self.has_work:
            for ev in self.step():
                out.setdefault(ev.request_id, []).append(ev)
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
