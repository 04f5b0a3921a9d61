"""The prefill service: stream-loading prefill on the GPU (on the CPU when there is none).

A request's life here (:class:`State`):

    PrefillTask ─► QUEUED (FIFO) ─► RUNNING: chunk by chunk, layer by layer
        each layer's new KV ──KVChunk──► the decode service the router chose (directly)
        end ──KVDone(first token)──► decode;  FirstToken ──► router (the client's first token)
        with prompt_logprobs: PromptLogprobs ──► router (prompt scoring, echo + logprobs)

A Cancel removes a queued task, or stops a running one at its next layer boundary. The weights
are the weights service's shared-memory mapping: attention and dense parts go to the device, the
routed experts stream from the mapped host pages.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import deque
from enum import IntEnum

import torch

from services.engine.prefill import PrefillEngine
from shared import log as logging
from shared import weight_store
from shared.config import Config
from shared.messages import (
    Cancel,
    Failed,
    FirstToken,
    Heartbeat,
    Kind,
    KVChunk,
    KVDone,
    Message,
    PrefillTask,
    PromptLogprobs,
    TokenItem,
)
from shared.service import ServiceIO, Stopper, run_service


class State(IntEnum):
    QUEUED = 1
    RUNNING = 2


class _Cancelled(Exception):
    pass


class PrefillService:
    def __init__(self, cfg: Config, name: str) -> None:
        self.cfg, self.name = cfg, name
        self.log = logging.setup("prefill", cfg.log_format, cfg.log_level, name=name)
        self.stopper = Stopper()
        self.queue: deque[PrefillTask] = deque()
        self.running: str | None = None
        self.states: dict[str, State] = {}
        self._init_engine()
        self._init_io()
        self.handlers = {Kind.PREFILL_TASK: self._on_task, Kind.CANCEL: self._on_cancel}

    def _init_engine(self) -> None:
        p = self.cfg.prefill
        device = p.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            if p.threads:
                torch.set_num_threads(p.threads)
            os.nice(p.nice)  # decode's latency first; prefill takes what it leaves
        t0 = time.perf_counter()
        self.weights = weight_store.attach(self.cfg.manifest, wait_s=60)
        model = self.weights.build("cpu")
        on_gpu = device.startswith("cuda")
        if on_gpu:
            self.weights.pin_for_cuda()  # experts stream from the shared pages themselves, by DMA
        self.engine = PrefillEngine(model, device, chunk_size=p.chunk_size, host_pinned=on_gpu,
                                     experts=p.experts, threads=p.threads or None)
        self.log.info("attached", seconds=round(time.perf_counter() - t0, 2), device=device)

    def _init_io(self) -> None:
        self.io = ServiceIO(self.cfg.router_endpoint, self.name, self._heartbeat, self.cfg.router.heartbeat_s, self.log)

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(role="prefill", name=self.name, pid=os.getpid(), running=int(self.running is not None),
                         waiting=len(self.queue))

    # --- handlers --------------------------------------------------------------------------------

    def _on_task(self, m: PrefillTask) -> None:
        if m.rid in self.io.cancelled:
            self.io.cancelled.discard(m.rid)
            return
        self.queue.append(m)
        self.states[m.rid] = State.QUEUED

    def _on_cancel(self, m: Cancel) -> None:
        if (state := self.states.get(m.rid)) is not None:
            self.log.info("cancel", rid=m.rid, state=state.name)
        for t in self.queue:
            if t.rid == m.rid:
                self.queue.remove(t)
                self.states.pop(m.rid, None)
                break
        if self.running != m.rid:
            self.io.cancelled.discard(m.rid)

    def _run(self, task: PrefillTask) -> None:
        self.running = task.rid
        self.states[task.rid] = State.RUNNING
        t0 = time.perf_counter()

        def on_kv(layer: int, start: int, entries: torch.Tensor) -> None:
            if task.rid in self.io.cancelled:
                raise _Cancelled
            self.io.send(KVChunk(rid=task.rid, layer=layer, start=start, tensors=(entries.cpu(),)), task.kv_endpoint)

        try:
            res = self.engine.prefill(task.prompt, task.params.sampling(), on_kv=on_kv if task.kv_endpoint else None,
                                      all_logits=task.prompt_logprobs is not None)
        except _Cancelled:
            self.log.info("cancelled", rid=task.rid)
            return
        finally:
            self.running = None
            self.states.pop(task.rid, None)
            self.io.cancelled.discard(task.rid)
        if task.prompt_logprobs is not None:
            self.io.send(_prompt_logprobs(task, res.logits))
        c = res.choice
        first = TokenItem(task.rid, c.token, c.logprob, [list(p) for p in c.top_logprobs]
                          if c.top_logprobs is not None else None)
        if task.kv_endpoint:  # the client's first token first; the router holds decode's if they overtake it
            self.io.send(FirstToken(item=first))
            self.io.send(KVDone(rid=task.rid, tokens=len(task.prompt), first=first), task.kv_endpoint)
        seconds = time.perf_counter() - t0
        self.log.info("prefilled", rid=task.rid, tokens=len(task.prompt), seconds=round(seconds, 3),
                      tok_s=round(len(task.prompt) / max(seconds, 1e-9), 1))

    # --- the loop ----------------------------------------------------------------------------

    def event_loop(self) -> None:
        while not self.stopper.stopping:
            for msg in self.io.drain(wait=not self.queue):
                self._dispatch(msg)
            if self.queue:
                task = self.queue.popleft()
                try:
                    self._run(task)
                except Exception as e:  # a bad request fails alone; the service keeps serving
                    self.log.exception("prefill failed", rid=task.rid)
                    self.io.send(Failed(rid=task.rid, message=f"prefill failed: {e}"))

    def _dispatch(self, msg: Message) -> None:
        handler = self.handlers.get(msg.KIND)
        if handler is None:
            self.log.warning("dropped a message of an unexpected kind", kind=msg.KIND.name)
            return
        handler(msg)

    def close(self) -> None:
        self.io.close()
        self.engine.close()
        self.weights.close()


def _prompt_logprobs(task: PrefillTask, logits: torch.Tensor) -> PromptLogprobs:
    """Logprob of each prompt token after the first given the ones before it, and the top N."""
    lp = logits[:-1].float().log_softmax(-1)  # [P-1, V]: position i predicts token i+1
    nxt = torch.tensor(task.prompt[1:], dtype=torch.int64)
    chosen = lp.gather(1, nxt[:, None])[:, 0].tolist() if len(nxt) else []
    top: list[list] = []
    if task.prompt_logprobs and len(nxt):
        v, i = lp.topk(task.prompt_logprobs, dim=-1)
        top = [[[t, x] for t, x in zip(ti, vi, strict=True)] for ti, vi in zip(i.tolist(), v.tolist(), strict=True)]
    return PromptLogprobs(rid=task.rid, logprobs=chosen, top=top)


def run_prefill(cfg: Config, name: str) -> int:
    return run_service("prefill", name, cfg, lambda: PrefillService(cfg, name))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="prefill-0", help="service name (default: prefill-0)")
    p.add_argument("--device", help="override prefill.device (auto, cpu, cuda, cuda:N)")


def main(cfg: Config, args: argparse.Namespace) -> int:
    return run_prefill(cfg, args.name)
