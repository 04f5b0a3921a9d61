"""The router: admission, placement, token relay, cancellation and failover.

A request's life here (:class:`State`):

    Submit ─► QUEUED (bounded; full: Reject 429; no decode service: Reject 503)
           ─► placed on the decode service with the most free KV that fits prompt + max_tokens
              short prompt:  DecodeTask(prefill_here) ─────────────────────────► DECODING
              otherwise:     DecodeTask + PrefillTask(kv_endpoint) ─► PREFILLING ─► DECODING
              scoring only:  PrefillTask(no KV) ─► SCORING ─► done on PromptLogprobs
           ─► Tokens relayed to the gateway until one carries a finish reason

Every service sends a heartbeat; the first registers it. One silent for ``dead_after_s`` is
dead: its requests go back to the front of the queue with prompt + the tokens generated so far
(re-prefilled elsewhere), or fail with 503 when no decode service is left. A Cancel from the
gateway (the client went away) is passed to whichever services hold the request.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from enum import IntEnum

import zmq

from shared import log as logging
from shared.config import Config
from shared.messages import (
    Cancel,
    DecodeTask,
    Failed,
    FirstToken,
    Heartbeat,
    Kind,
    Message,
    Params,
    PrefillTask,
    PromptLogprobs,
    Reject,
    RouterStatus,
    Submit,
    TokenItem,
    Tokens,
    encode,
    try_decode,
)
from shared.service import Stopper, run_service


class State(IntEnum):
    QUEUED = 1
    PREFILLING = 2
    DECODING = 3
    SCORING = 4


@dataclass
class _Service:
    identity: bytes
    beat: Heartbeat
    last_seen: float
    rids: set[str] = field(default_factory=set)
    reserved: int = 0  # decode: KV tokens the router has placed on it


@dataclass
class _Request:
    submit: Submit
    gateway: bytes
    arrived: float
    state: State = State.QUEUED
    prompt: list[int] = field(default_factory=list)  # the prompt to prefill (grows on re-homing)
    params: Params = field(default_factory=Params)
    generated: list[int] = field(default_factory=list)
    prefill: str | None = None
    decode: str | None = None
    need: int = 0  # KV tokens reserved on the decode service
    early: list[TokenItem] = field(default_factory=list)  # decode's tokens that overtook prefill's first
    queued_s: float | None = None  # arrival to placement; reported with the first token


class Router:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.log = logging.setup("router", cfg.log_format, cfg.log_level)
        self.stopper = Stopper()
        self._init_socket()
        self.services: dict[str, _Service] = {}
        self.names: dict[bytes, str] = {}  # socket identity -> service name
        self.gateways: dict[bytes, float] = {}
        self.requests: dict[str, _Request] = {}
        self.queue: deque[str] = deque()
        self.epoch = f"{os.getpid()}-{time.time():.6f}"
        self.handlers = {Kind.HEARTBEAT: self._on_heartbeat, Kind.SUBMIT: self._on_submit, Kind.CANCEL: self._on_cancel,
                         Kind.FIRST_TOKEN: self._on_first, Kind.TOKENS: self._on_tokens,
                         Kind.PROMPT_LOGPROBS: self._on_prompt_logprobs, Kind.FAILED: self._on_failed}

    def _init_socket(self) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.bind(self.cfg.router_endpoint)

    def _send(self, identity: bytes, msg: Message) -> None:
        self.sock.send_multipart([identity, *encode(msg)], copy=False)

    def _live(self, role: str) -> list[tuple[str, _Service]]:
        return [(n, s) for n, s in self.services.items() if s.beat.role == role]

    # --- handlers --------------------------------------------------------------------------------

    def _on_heartbeat(self, ident: bytes, m: Heartbeat) -> None:
        if m.role == "gateway":
            self.gateways[ident] = time.monotonic()
            return
        if m.role not in ("prefill", "decode"):
            self.log.warning("heartbeat from an unknown role", role=m.role, name=m.name)
            return
        s = self.services.get(m.name)
        if s is None or s.identity != ident or s.beat.pid != m.pid:
            if s is not None:  # the same name came back as a new process: the old one is gone
                self._lost(m.name, "restarted")
            self.services[m.name] = _Service(ident, m, time.monotonic())
            self.names[ident] = m.name
            self.log.info("service joined", name=m.name, role=m.role, pid=m.pid)
            return
        s.beat, s.last_seen = m, time.monotonic()

    def _on_submit(self, ident: bytes, m: Submit) -> None:
        if m.rid in self.requests:
            self._send(ident, Reject(rid=m.rid, status=400, message=f"request id {m.rid!r} is already in use"))
            return
        if not self._live("decode") and m.generate:
            self._send(ident, Reject(rid=m.rid, status=503, message="no decode service is running"))
            return
        if len(self.queue) >= self.cfg.router.max_queue:
            self._send(ident, Reject(rid=m.rid, status=429, message=f"the server is busy: {len(self.queue)} "
                                     "requests are already waiting; retry later"))
            return
        self.requests[m.rid] = _Request(m, ident, time.monotonic(), prompt=list(m.prompt), params=m.params)
        self.queue.append(m.rid)
        self.log.debug("queued", rid=m.rid, prompt=len(m.prompt), max_tokens=m.params.max_tokens)

    def _on_cancel(self, ident: bytes, m: Cancel) -> None:
        r = self.requests.get(m.rid)
        if r is not None:
            self._release(m.rid, r, cancel=True)
            self.log.info("cancelled", rid=m.rid)

    def _on_first(self, ident: bytes, m: FirstToken) -> None:
        r = self.requests.get(m.item.rid)
        if r is None or r.state != State.PREFILLING or self.services.get(r.prefill or "", None) is None:
            return
        r.state = State.DECODING
        items, r.early = [self._stamp(r, m.item), *r.early], []
        for item in items:
            if item.new:
                r.generated.append(item.token)
        self._send(r.gateway, Tokens(items=items))
        if items[-1].finish is not None:
            self._release(m.item.rid, r, cancel=False)

    def _on_tokens(self, ident: bytes, m: Tokens) -> None:
        name = self._name_of(ident)
        by_gateway: dict[bytes, list[TokenItem]] = {}
        for item in m.items:
            r = self.requests.get(item.rid)
            if r is None or r.decode != name:
                continue  # a request cancelled or re-homed meanwhile
            if r.state == State.PREFILLING:  # came by another socket than prefill's first token: wait for it
                r.early.append(item)
                continue
            if item.new:
                item = self._stamp(r, item)
                r.generated.append(item.token)
            by_gateway.setdefault(r.gateway, []).append(item)
            if item.finish is not None:
                self._release(item.rid, r, cancel=False)
        for gw, items in by_gateway.items():
            self._send(gw, Tokens(items=items))

    def _on_prompt_logprobs(self, ident: bytes, m: PromptLogprobs) -> None:
        r = self.requests.get(m.rid)
        if r is None:
            return
        self._send(r.gateway, m)
        if r.state == State.SCORING:
            self._send(r.gateway, Tokens(items=[TokenItem(m.rid, -1, finish="length", new=False)]))
            self._release(m.rid, r, cancel=False)

    def _on_failed(self, ident: bytes, m: Failed) -> None:
        r = self.requests.get(m.rid)
        if r is None:
            return
        self.log.warning("request failed", rid=m.rid, service=self._name_of(ident), reason=m.message)
        self._send(r.gateway, Reject(rid=m.rid, status=500, message=m.message))
        self._release(m.rid, r, cancel=True)

    # --- placement ---------------------------------------------------------------------------------

    @staticmethod
    def _stamp(r: _Request, item: TokenItem) -> TokenItem:
        """The request's queue time rides on its first token."""
        if r.generated or r.queued_s is None:
            return item
        return replace(item, queued_s=r.queued_s)

    def _need(self, r: _Request, s: _Service) -> int:
        b = max(s.beat.block_size, 1)
        tokens = min(len(r.prompt) + r.params.max_tokens, s.beat.max_context)
        return -(-tokens // b) * b

    def _place(self) -> None:
        # A request is either in the queue or placed on services, so the placed ones are the rest.
        while self.queue and len(self.requests) - len(self.queue) < self.cfg.router.max_running:
            rid = self.queue[0]
            r = self.requests[rid]
            if not r.submit.generate:
                self.queue.popleft()
                if not self._start_prefill(rid, r, kv_endpoint=""):
                    self._fail(rid, r, 503, "no prefill service is running (prompt scoring needs one)")
                    continue
                r.state = State.SCORING
                continue
            decodes = self._live("decode")
            if not decodes:
                self.queue.popleft()
                self._fail(rid, r, 503, "no decode service is running")
                continue
            longest = max(s.beat.max_context for _, s in decodes)
            if len(r.prompt) + 1 > longest:
                self.queue.popleft()
                self._fail(rid, r, 400, f"the prompt has {len(r.prompt)} tokens; the longest context a decode "
                           f"service holds is {longest}")
                continue
            fits = [(s.beat.total_tokens - s.reserved, n, s, need) for n, s in decodes
                    if len(r.prompt) + 1 <= s.beat.max_context
                    and (need := self._need(r, s)) <= s.beat.total_tokens - s.reserved]
            if not fits:
                break  # first come, first served: wait for KV to free up
            _, name, s, need = max(fits, key=lambda x: x[0])
            short = len(r.prompt) <= self.cfg.router.short_prompt and r.submit.prompt_logprobs is None
            if not short and not self._live("prefill"):
                self.queue.popleft()
                self._fail(rid, r, 503, "no prefill service is running")
                continue
            self.queue.popleft()
            if r.queued_s is None:
                r.queued_s = time.monotonic() - r.arrived
            r.decode, r.need = name, need
            s.reserved += r.need
            s.rids.add(rid)
            self._send(s.identity, DecodeTask(rid=rid, prompt=r.prompt, params=r.params, prefill_here=short))
            r.state = State.DECODING if short else State.PREFILLING
            if not short:
                self._start_prefill(rid, r, kv_endpoint=s.beat.kv_endpoint)
            self.log.debug("placed", rid=rid, decode=name, prefill=r.prefill,
                           queued_s=round(time.monotonic() - r.arrived, 4))

    def _start_prefill(self, rid: str, r: _Request, kv_endpoint: str) -> bool:
        prefills = self._live("prefill")
        if not prefills:
            return False
        name, s = min(prefills, key=lambda x: len(x[1].rids))
        r.prefill = name
        s.rids.add(rid)
        self._send(s.identity, PrefillTask(rid=rid, prompt=r.prompt, params=r.params, kv_endpoint=kv_endpoint,
                                           prompt_logprobs=r.submit.prompt_logprobs))
        return True

    def _fail(self, rid: str, r: _Request, status: int, message: str) -> None:
        self._send(r.gateway, Reject(rid=rid, status=status, message=message))
        self._release(rid, r, cancel=True)

    def _detach(self, rid: str, r: _Request, cancel: bool) -> None:
        """Take the request off the live services that hold it (and their KV reservation); with
        ``cancel`` tell them to drop it."""
        for name in (r.prefill, r.decode):
            s = self.services.get(name or "")
            if s is None or rid not in s.rids:
                continue
            s.rids.discard(rid)
            if name == r.decode:
                s.reserved -= r.need
            if cancel:
                self._send(s.identity, Cancel(rid=rid))

    def _release(self, rid: str, r: _Request, cancel: bool) -> None:
        """Forget the request; with ``cancel`` tell the services that hold it to drop it."""
        self._detach(rid, r, cancel)
        if rid in self.queue:
            self.queue.remove(rid)
        self.requests.pop(rid, None)

    def _name_of(self, ident: bytes) -> str | None:
        return self.names.get(ident)

    # --- failover ---------------------------------------------------------------------------------

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for name, s in list(self.services.items()):
            if now - s.last_seen > self.cfg.router.dead_after_s:
                self._lost(name, "silent")
        for gw, seen in list(self.gateways.items()):
            if now - seen > self.cfg.router.dead_after_s:
                del self.gateways[gw]
                for rid, r in list(self.requests.items()):
                    if r.gateway == gw:  # nobody is listening any more
                        self._release(rid, r, cancel=True)

    def _lost(self, name: str, why: str) -> None:
        s = self.services.pop(name)
        self.names.pop(s.identity, None)
        self.log.warning("service lost", name=name, role=s.beat.role, why=why, requests=len(s.rids))
        rehome = []
        for rid in list(s.rids):
            self._send(s.identity, Cancel(rid=rid))  # in case it is only slow: it must not finish them too
            r = self.requests.get(rid)
            if r is None:
                continue
            self._detach(rid, r, cancel=True)  # the other side (still live) drops its part
            left = r.submit.params.max_tokens - len(r.generated)
            if not r.submit.generate:
                r.prefill = None
            else:
                # Prefill again from prompt + tokens so far; the client sees one unbroken stream.
                r.prompt = list(r.submit.prompt) + r.generated
                r.params = replace(r.submit.params, max_tokens=max(left, 1))
                r.prefill, r.decode, r.need, r.early = None, None, 0, []
            r.state = State.QUEUED
            rehome.append(rid)
            self.log.info("re-homing", rid=rid, generated=len(r.generated))
        for rid in reversed(rehome):
            self.queue.appendleft(rid)

    # --- the loop --------------------------------------------------------------------------------

    def _status(self) -> RouterStatus:
        decodes = self._live("decode")
        return RouterStatus(epoch=self.epoch, prefill=len(self._live("prefill")), decode=len(decodes),
                            max_context=max((s.beat.max_context for _, s in decodes), default=0),
                            queued=len(self.queue), running=len(self.requests) - len(self.queue),
                            kv_used_tokens=sum(s.reserved for _, s in decodes),
                            kv_total_tokens=sum(s.beat.total_tokens for _, s in decodes))

    def event_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        next_beat = 0.0
        while not self.stopper.stopping:
            for _ in poller.poll(timeout=int(self.cfg.router.heartbeat_s * 500)):
                while True:
                    try:
                        ident, *frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._dispatch(ident.bytes, frames)
            now = time.monotonic()
            if now >= next_beat:
                self._check_heartbeats()
                status = self._status()
                for gw in self.gateways:
                    self._send(gw, status)
                next_beat = now + self.cfg.router.heartbeat_s
            self._place()

    def _dispatch(self, ident: bytes, frames: list) -> None:
        msg = try_decode(frames, self.log)
        if msg is None:
            return
        handler = self.handlers.get(msg.KIND)
        if handler is None:
            self.log.warning("dropped a message of an unexpected kind", kind=msg.KIND.name)
            return
        try:
            handler(ident, msg)
        except Exception:  # a bug in one handler must not stop the routing of everything else
            self.log.exception("handler failed", kind=msg.KIND.name)

    def close(self) -> None:
        self.sock.close(linger=0)


def run_router(cfg: Config) -> int:
    return run_service("router", "router", cfg, lambda: Router(cfg))


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def main(cfg: Config, args: argparse.Namespace) -> int:
    return run_router(cfg)
