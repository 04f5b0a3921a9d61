"""The decode service: one per NUMA node, continuous batching over the CPU expert kernels.

A request's life here (:class:`State`):

    DecodeTask(prefill_here)  ──────────────────────────────► engine (prefills the short prompt)
    DecodeTask ─► AWAIT_KV ─ KVChunk… (from prefill, direct) ─ KVDone ─► engine
    engine: waiting (admission reserves prompt + max_tokens of KV) ─► running ─► Tokens ─► router

KV chunks may arrive before the task (they come on another socket): they wait in ``pending``
either way. A Cancel drops the request wherever it is and frees its blocks. The weights are the
shared-memory mapping the weights service published; nothing is loaded here.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from services.engine.decode import DecodeEngine, TokenEvent
from shared import log as logging
from shared import weight_store
from shared.config import Config
from shared.messages import Cancel, DecodeTask, Failed, Heartbeat, Kind, KVChunk, KVDone, Message, TokenItem, Tokens
from shared.sampling import Choice
from shared.service import ServiceIO, Stopper, numa_cpus, run_service


class State(IntEnum):
    AWAIT_KV = 1  # the task is here, its KV is still coming from prefill
    IN_ENGINE = 2  # waiting for admission or running in the engine


@dataclass
class _Pending:
    task: DecodeTask | None = None
    chunks: list[KVChunk] = field(default_factory=list)
    done: KVDone | None = None
    since: float = field(default_factory=time.monotonic)


class DecodeService:
    def __init__(self, cfg: Config, name: str, numa_node: int) -> None:
        self.cfg, self.name, self.numa_node = cfg, name, numa_node
        self.log = logging.setup("decode", cfg.log_format, cfg.log_level, name=name, numa_node=numa_node)
        self.stopper = Stopper()
        self._init_affinity()
        self._init_engine()
        self._init_io()
        self.handlers = {Kind.DECODE_TASK: self._on_task, Kind.KV_CHUNK: self._on_chunk,
                         Kind.KV_DONE: self._on_done, Kind.CANCEL: self._on_cancel}

    def _init_affinity(self) -> None:
        self.cpus = numa_cpus(self.numa_node)
        os.sched_setaffinity(0, self.cpus)  # the kernel pool's threads inherit it
        self.threads = self.cfg.decode.threads or len(self.cpus)
        torch.set_num_threads(self.threads)

    def _init_engine(self) -> None:
        t0 = time.perf_counter()
        self.weights = weight_store.attach(self.cfg.manifest, wait_s=60)
        model = self.weights.build("cpu")  # the engine moves all but the routed experts to decode.device
        d = self.cfg.decode
        self.engine = DecodeEngine(
            model, num_blocks=d.num_blocks, block_size=d.block_size, max_batch=d.max_batch,
            max_context=d.max_context or None, prefill_threshold=max(self.cfg.router.short_prompt, 1),
            experts=d.experts, overlap=d.overlap, threads=self.threads, device=d.device,
            eos_token_id=_eos_token_id(self.weights.manifest["model"]))
        self.states: dict[str, State] = {}
        self.pending: dict[str, _Pending] = {}
        self.cancelled: dict[str, float] = {}  # rid -> when; KV still in flight for it is dropped
        self.log.info("attached", seconds=round(time.perf_counter() - t0, 2), cpus=len(self.cpus),
                      experts=self.engine.experts, kv_tokens=d.num_blocks * d.block_size)

    def _init_io(self) -> None:
        self.kv_endpoint = self.cfg.kv_endpoint(self.name)
        self.io = ServiceIO(self.cfg.router_endpoint, self.name, self._heartbeat, self.cfg.router.heartbeat_s,
                            self.log, bind=self.kv_endpoint)

    def _heartbeat(self) -> Heartbeat:
        e = self.engine
        return Heartbeat(role="decode", name=self.name, pid=os.getpid(), kv_endpoint=self.kv_endpoint,
                         max_context=e.max_context, block_size=e.block_size,
                         total_tokens=e.cache.allocator.num_blocks * e.block_size,
                         running=len(e.running), waiting=len(e.waiting) + len(self.pending))

    # --- handlers --------------------------------------------------------------------------------

    def _on_task(self, m: DecodeTask) -> None:
        self.cancelled.pop(m.rid, None)  # a re-homed request may come back under its id
        if m.prefill_here:
            self._add(m.rid, lambda: self.engine.add(m.rid, m.prompt, m.params.sampling()))
            return
        p = self.pending.setdefault(m.rid, _Pending())
        p.task = m
        self.states[m.rid] = State.AWAIT_KV
        self._maybe_start(m.rid)

    def _on_chunk(self, m: KVChunk) -> None:
        if m.rid in self.cancelled:
            return
        self.pending.setdefault(m.rid, _Pending()).chunks.append(m)

    def _on_done(self, m: KVDone) -> None:
        if m.rid in self.cancelled:
            return
        self.pending.setdefault(m.rid, _Pending()).done = m
        self._maybe_start(m.rid)

    def _maybe_start(self, rid: str) -> None:
        p = self.pending[rid]
        if p.task is None or p.done is None:
            return
        del self.pending[rid]
        kv = self._assemble(p)
        f = p.done.first
        first = Choice(f.token, f.logprob, [tuple(x) for x in f.top] if f.top is not None else None)
        self._add(rid, lambda: self.engine.add(rid, p.task.prompt, p.task.params.sampling(), kv=kv, first=first))

    def _assemble(self, p: _Pending) -> list[torch.Tensor]:
        P = len(p.task.prompt)
        widths = [buf.shape[1] for buf in self.engine.cache.layers]
        kv = [torch.empty(P, w, dtype=self.engine.model.dtype) for w in widths]
        filled = [0] * len(widths)
        for c in p.chunks:
            t = c.tensors[0] if c.tensors else None
            if t is None or not 0 <= c.layer < len(kv) or t.dim() != 2 or t.shape[1] != widths[c.layer] \
                    or c.start < 0 or c.start + t.shape[0] > P:
                raise ValueError(f"KV chunk for layer {c.layer} at {c.start} does not fit the request")
            kv[c.layer][c.start:c.start + t.shape[0]].copy_(t)
            filled[c.layer] += t.shape[0]
        if filled != [P] * len(kv):
            raise ValueError(f"incomplete KV: {filled} rows per layer for a {P}-token prompt")
        return kv

    def _add(self, rid: str, add) -> None:
        try:
            add()
        except ValueError as e:
            self.log.warning("request refused", rid=rid, reason=str(e))
            self.io.send(Failed(rid=rid, message=str(e)))
            self.states.pop(rid, None)
            return
        self.states[rid] = State.IN_ENGINE

    def _on_cancel(self, m: Cancel) -> None:
        if (state := self.states.get(m.rid)) is not None:
            self.log.info("cancel", rid=m.rid, state=state.name)
        self.pending.pop(m.rid, None)
        self.engine.abort(m.rid)
        self.states.pop(m.rid, None)
        self.io.cancelled.discard(m.rid)
        self.cancelled[m.rid] = time.monotonic()

    # --- the loop ----------------------------------------------------------------------------

    def event_loop(self) -> None:
        while not self.stopper.stopping:
            for msg in self.io.drain(wait=not self.engine.has_work):
                self._dispatch(msg)
            if self.engine.has_work:
                self._step()
            self._expire_pending()

    def _dispatch(self, msg: Message) -> None:
        handler = self.handlers.get(msg.KIND)
        if handler is None:
            self.log.warning("dropped a message of an unexpected kind", kind=msg.KIND.name)
            return
        try:
            handler(msg)
        except Exception as e:  # one bad request must not take the service down
            rid = getattr(msg, "rid", "")
            self.log.exception("request failed", rid=rid)
            if rid:
                self.pending.pop(rid, None)
                self.engine.abort(rid)
                self.io.send(Failed(rid=rid, message=f"decode failed: {e}"))

    def _step(self) -> None:
        events: list[TokenEvent] = self.engine.step()
        if not events:
            return
        items = []
        for ev in events:
            items.append(TokenItem(ev.request_id, ev.token, ev.logprob,
                                   [list(p) for p in ev.top_logprobs] if ev.top_logprobs is not None else None,
                                   ev.finish_reason, ev.new))
            if ev.finish_reason is not None:
                self.log.info("finished", rid=ev.request_id, reason=ev.finish_reason)
                self.states.pop(ev.request_id, None)
                self.io.cancelled.discard(ev.request_id)
        self.io.send(Tokens(items=items))

    def _expire_pending(self) -> None:
        """KV whose task never came (the router cancelled it before we heard) is dropped, and
        cancelled ids are forgotten once no KV for them can still be on its way."""
        now = time.monotonic()
        for rid, when in list(self.cancelled.items()):
            if now - when > 60:
                del self.cancelled[rid]
        for rid, p in list(self.pending.items()):
            if p.task is None and now - p.since > 60:
                del self.pending[rid]
                self.log.warning("dropped orphaned KV", rid=rid)

    def close(self) -> None:
        self.io.close()
        self.engine.close()
        self.weights.close()


def _eos_token_id(model_path: str) -> int | None:
    from shared.tokenizer import Tokenizer

    try:
        return Tokenizer(model_path).eos_token_id
    except Exception:  # a checkpoint without a tokenizer still decodes; it just never stops on EOS
        return None


def run_decode(cfg: Config, name: str, numa_node: int) -> int:
    return run_service("decode", name, cfg, lambda: DecodeService(cfg, name, numa_node))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--numa-node", type=int, default=0, help="NUMA node whose cores this service uses (default 0)")
    p.add_argument("--name", help="service name (default: decode-<numa node>)")


def main(cfg: Config, args: argparse.Namespace) -> int:
    return run_decode(cfg, args.name or f"decode-{args.numa_node}", args.numa_node)

