"""The gateway: OpenAI-compatible HTTP in front of the router. It holds no model state.

A request's life here: HTTP body ─► validated (openai_api) ─► chat template + tokenizer ─►
one Submit per choice (``n``) ─► token events from the router ─► incremental detokenization,
stop strings ─► JSON, or SSE chunks with ``stream: true``. A client that goes away is noticed
(the write fails, or the transport closes) and its requests are cancelled, freeing their KV.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio
from aiohttp import web
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.openai_api import ApiError, ChatRequest, CompletionRequest, Sampling, parse_chat, parse_completion
from shared import log as logging
from shared.config import Config
from shared.messages import (
    Cancel,
    Heartbeat,
    Kind,
    Params,
    PromptLogprobs,
    Reject,
    RouterStatus,
    Submit,
    TokenItem,
    encode,
    try_decode,
)
from shared.service import notify, set_title
from shared.tokenizer import IncrementalDecoder, Tokenizer

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterClient:
    """The gateway's DEALER socket to the router: submits, cancels, and delivers each request's
    events (TokenItem, PromptLogprobs, Reject) to the asyncio queue its caller gave."""

    def __init__(self, cfg: Config, log) -> None:
        self.cfg, self.log = cfg, log
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"gateway-{os.getpid()}-{uuid.uuid4().hex[:6]}".encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(cfg.router_endpoint)
        self.queues: dict[str, asyncio.Queue] = {}
        self.status = RouterStatus()
        self.status_at = 0.0
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._heartbeat())]

    @property
    def alive(self) -> bool:
        return time.monotonic() - self.status_at < self.cfg.router.dead_after_s

    async def submit(self, msg: Submit, q: asyncio.Queue) -> None:
        self.queues[msg.rid] = q
        await self.sock.send_multipart(encode(msg))

    async def cancel(self, rid: str) -> None:
        if self.queues.pop(rid, None) is not None:
            await self.sock.send_multipart(encode(Cancel(rid=rid)))

    def done(self, rid: str) -> None:
        self.queues.pop(rid, None)

    async def _heartbeat(self) -> None:
        while True:
            await self.sock.send_multipart(encode(Heartbeat(role="gateway", name="gateway", pid=os.getpid())))
            await asyncio.sleep(self.cfg.router.heartbeat_s)

    async def _reader(self) -> None:
        while True:
            msg = try_decode(await self.sock.recv_multipart(copy=False), self.log)
            if msg is None:
                continue
            if msg.KIND == Kind.ROUTER_STATUS:
                if self.status.epoch and msg.epoch != self.status.epoch:
                    self._router_restarted()
                self.status, self.status_at = msg, time.monotonic()
            elif msg.KIND == Kind.TOKENS:
                for item in msg.items:
                    if (q := self.queues.get(item.rid)) is not None:
                        q.put_nowait(item)
            elif msg.KIND in (Kind.PROMPT_LOGPROBS, Kind.REJECT):
                if (q := self.queues.get(msg.rid)) is not None:
                    q.put_nowait(msg)
            else:
                self.log.warning("dropped a message of an unexpected kind", kind=msg.KIND.name)

    def _router_restarted(self) -> None:
        """The new router knows nothing of the requests the old one held: fail them (503)."""
        self.log.warning("the router restarted; failing the requests it held", requests=len(self.queues))
        for rid, q in self.queues.items():
            q.put_nowait(Reject(rid=rid, status=503, message="the router restarted; retry the request"))
        self.queues.clear()

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.sock.close(linger=0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hybridmoe_requests", "Finished HTTP requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.ttft = Histogram("hybridmoe_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("hybridmoe_time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request", registry=r, buckets=_LATENCY_BUCKETS)
        self.queue = Histogram("hybridmoe_queue_time_seconds", "Time a request waited in the router's queue "
                               "before it was placed on a service", registry=r, buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("hybridmoe_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("hybridmoe_generation_tokens", "Tokens generated", registry=r)
        self.kv_usage = Gauge("hybridmoe_kv_cache_usage_ratio", "KV cache reserved / capacity over decode services",
                              registry=r)
        self.queued = Gauge("hybridmoe_requests_queued", "Requests waiting in the router", registry=r)
        self.running = Gauge("hybridmoe_requests_running", "Requests placed on services", registry=r)
        self.services = Gauge("hybridmoe_services", "Live services by role", ["role"], registry=r)

    def update(self, s: RouterStatus) -> None:
        self.kv_usage.set(s.kv_used_tokens / s.kv_total_tokens if s.kv_total_tokens else 0)
        self.queued.set(s.queued)
        self.running.set(s.running)
        self.services.labels("prefill").set(s.prefill)
        self.services.labels("decode").set(s.decode)


@dataclass
class _Choice:
    """One generated sequence: tokens, the text released so far, logprobs, the finish."""

    index: int
    rid: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list = field(default_factory=list)
    text: str = ""  # released text
    sent_tokens: int = 0  # tokens whose text (and logprobs) have been released
    finish: str | None = None
    first_at: float | None = None
    prompt_lp: PromptLogprobs | None = None
    detok: IncrementalDecoder | None = None
    stream_offset: int = 0  # streamed completions: text offset of the next token's logprobs


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.log = logging.setup("gateway", cfg.log_format, cfg.log_level)
        self._init_model()
        self.metrics = Metrics()
        self.app = self._init_app()

    def _init_model(self) -> None:
        from services.weights import model_path

        self.model_path = Path(model_path(self.cfg))
        self.tokenizer = Tokenizer(self.model_path)
        self.model_name = self.cfg.model.name or self.model_path.name
        self.vocab_size = json.loads((self.model_path / "config.json").read_text())["vocab_size"]
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        tpl = self.tokenizer.chat_template
        self.chat_template = env.from_string(tpl) if isinstance(tpl, str) else None

    def _init_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=64 * 2**20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_handler)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self.router = RouterClient(self.cfg, self.log)
        self.router.start()

    async def _stop(self, app: web.Application) -> None:
        await self.router.close()

    # --- middleware --------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ApiError as e:
            self.metrics.requests.labels(request.path, f"error_{e.status}").inc()
            return web.json_response(e.body(), status=e.status)
        except web.HTTPException as e:
            if e.status >= 400:
                err = ApiError(e.status, e.reason or "error", code=str(e.status))
                return web.json_response(err.body(), status=e.status)
            raise

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        key = self.cfg.gateway.api_key or os.environ.get("HYBRIDMOE_API_KEY", "")
        if key and request.path.startswith("/v1/"):
            if request.headers.get("Authorization", "") != f"Bearer {key}":
                raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
        return await handler(request)

    # --- simple endpoints ----------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "hybridmoe",
             "max_model_len": self.router.status.max_context or None}]})

    async def health(self, request: web.Request) -> web.Response:
        s = self.router.status
        ok = self.router.alive and s.decode > 0 and s.prefill > 0
        body = {"status": "ok" if ok else "unavailable", "router": self.router.alive, "prefill": s.prefill,
                "decode": s.decode, "queued": s.queued, "running": s.running}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics_handler(self, request: web.Request) -> web.Response:
        self.metrics.update(self.router.status)
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _json(self, request: web.Request):
        try:
            return json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    # --- completions ---------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req: CompletionRequest = parse_completion(await self._json(request), self.cfg.gateway.max_n, self.vocab_size)
        self._check_model(req.model)
        if len(req.prompts) > 1 and req.sampling.stream:
            raise ApiError(400, "streaming supports one prompt per request", "prompt")
        prompts = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in req.prompts]
        texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in req.prompts]
        return await self._serve(request, "completion", prompts, req.sampling, req.logprobs, req.echo, texts)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req: ChatRequest = parse_chat(await self._json(request), self.cfg.gateway.max_n)
        self._check_model(req.model)
        if self.chat_template is None:
            raise ApiError(400, "this model's tokenizer_config.json has no chat_template; use /v1/completions")
        try:
            text = self.chat_template.render(messages=req.messages, add_generation_prompt=True,
                                             bos_token=self.tokenizer.bos_token or "",
                                             eos_token=self.tokenizer.eos_token or "")
        except TemplateError as e:
            raise ApiError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        prompt = self.tokenizer.encode(text, add_bos=False)
        lp = req.top_logprobs if req.logprobs else None
        return await self._serve(request, "chat", [prompt], req.sampling, lp, False, [text])

    async def _serve(self, request: web.Request, kind: str, prompts: list[list[int]], s: Sampling,
                     logprobs: int | None, echo: bool, texts: list[str]) -> web.StreamResponse:
        if not self.router.alive or self.router.status.decode == 0:
            raise ApiError(503, "the server is not ready: no decode service is running")
        ctx = self.router.status.max_context
        for p in prompts:
            if not p:
                raise ApiError(400, "the prompt is empty", "prompt")
            want = len(p) + (s.max_tokens or 0)
            if len(p) + 1 > ctx or want > ctx:
                raise ApiError(400, f"this model's maximum context is {ctx} tokens; the prompt has {len(p)} and "
                               f"max_tokens is {s.max_tokens}", "max_tokens" if len(p) < ctx else "prompt",
                               "context_length_exceeded")
        base = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        log = self.log.bind(rid=base)
        choices: list[_Choice] = []
        q: asyncio.Queue = asyncio.Queue()
        arrived = time.monotonic()
        for pi, p in enumerate(prompts):
            for j in range(s.n):
                idx = pi * s.n + j
                max_tokens = s.max_tokens if s.max_tokens is not None else min(
                    self.cfg.gateway.default_max_tokens, ctx - len(p))
                params = Params(max_tokens=max(max_tokens, 1), temperature=s.temperature, top_p=s.top_p,
                                top_k=s.top_k, seed=None if s.seed is None else s.seed + j,
                                stop_token_ids=s.stop_token_ids, ignore_eos=s.ignore_eos, logprobs=logprobs)
                c = _Choice(idx, f"{base}-{idx}")
                choices.append(c)
                await self.router.submit(Submit(rid=c.rid, prompt=p, params=params,
                                                prompt_logprobs=logprobs if echo else None,
                                                generate=s.max_tokens != 0), q)
        log.info("request", endpoint=kind, prompts=len(prompts), n=s.n, prompt_tokens=[len(p) for p in prompts],
                 max_tokens=s.max_tokens, stream=s.stream)
        by_rid = {c.rid: c for c in choices}
        try:
            if s.stream:
                return await self._stream(request, kind, base, prompts, choices, by_rid, q, s, logprobs, echo,
                                          texts, arrived)
            await self._collect(request, choices, by_rid, q, s, arrived)
        finally:
            for c in choices:
                if c.finish is None:
                    await self.router.cancel(c.rid)
                else:
                    self.router.done(c.rid)
        body = self._final_body(kind, base, prompts, choices, logprobs, echo, texts)
        self.metrics.requests.labels(request.path, "ok").inc()
        return web.json_response(body)

    async def _next(self, request: web.Request, q: asyncio.Queue):
        """The next event, or None when the client went away or the router is gone."""
        while True:
            try:
                return await asyncio.wait_for(q.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    return None
                if not self.router.alive:
                    raise ApiError(503, "the router stopped answering") from None

    def _on_event(self, ev, by_rid: dict[str, _Choice], s: Sampling, arrived: float) -> _Choice:
        if isinstance(ev, Reject):
            raise ApiError(ev.status, ev.message, code="server_busy" if ev.status == 429 else None)
        c = by_rid[ev.rid]
        if isinstance(ev, PromptLogprobs):
            c.prompt_lp = ev
            return c
        item: TokenItem = ev
        if item.queued_s is not None:
            self.metrics.queue.observe(item.queued_s)
        if item.new and c.finish is None:
            if c.first_at is None:
                c.first_at = time.monotonic()
                self.metrics.ttft.observe(c.first_at - arrived)
            c.tokens.append(item.token)
            c.logprobs.append(item.logprob)
            c.tops.append(item.top)
        if item.finish is not None and c.finish is None:
            c.finish = "length" if item.finish == "length" else "stop"
        self._release_text(c, s.stop)
        if c.finish is not None:
            self.metrics.generation_tokens.inc(len(c.tokens))
            if c.first_at is not None and len(c.tokens) > 1:
                self.metrics.tpot.observe((time.monotonic() - c.first_at) / (len(c.tokens) - 1))
        return c

    def _release_text(self, c: _Choice, stops: list[str]) -> None:
        """Advance ``c.text`` over the tokens that are safe to show: no half of a UTF-8 character,
        no text that might be the start of a stop string; a stop string found ends the choice."""
        if c.detok is None:
            c.detok = IncrementalDecoder(self.tokenizer)
        done = c.finish is not None
        while len(c.detok.ids) < len(c.tokens):
            c.detok.push(c.tokens[len(c.detok.ids)])
        if done:
            c.detok.flush()
        full = c.detok.text
        if stops:
            hit = min((i for i in (full.find(st, max(0, len(c.text) - len(st))) for st in stops) if i >= 0),
                      default=-1)
            if hit >= 0:
                c.text = full[:hit]
                c.finish = "stop"
                c.sent_tokens = len(c.tokens)
                return
        safe = len(full)
        if stops and not done:
            for st in stops:
                for k in range(min(len(st) - 1, len(full)), 0, -1):
                    if full.endswith(st[:k]):
                        safe = min(safe, len(full) - k)
                        break
        if safe > len(c.text) or done:
            c.text = full[:safe] if not done else full
            c.sent_tokens = len(c.tokens)

    async def _collect(self, request, choices, by_rid, q, s, arrived) -> None:
        while any(c.finish is None for c in choices):
            ev = await self._next(request, q)
            if ev is None:
                self.metrics.requests.labels(request.path, "cancelled").inc()
                raise ApiError(499, "the client closed the connection")
            c = self._on_event(ev, by_rid, s, arrived)
            if c.finish is not None:
                await self._finished(c)

    async def _finished(self, c: _Choice) -> None:
        """A choice ended here: a stop string may have ended it while decode still runs it."""
        if c.finish == "stop":
            await self.router.cancel(c.rid)
        else:
            self.router.done(c.rid)

    # --- response bodies ---------------------------------------------------------------------------

    def _token_text(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False)

    def _completion_logprobs(self, c: _Choice, prompt: list[int] | None, lo: int, hi: int, offset0: int) -> dict:
        """Completion-style logprobs of generated tokens [lo, hi) (after the prompt's, with
        ``prompt``); text offsets count from ``offset0``."""
        toks, lps, tops = [], [], []
        if prompt is not None:
            plp = c.prompt_lp
            toks += prompt
            lps += [None] + (plp.logprobs if plp else [None] * (len(prompt) - 1))
            tops += [None] + ([self._top_dict(top) for top in plp.top] if plp and plp.top
                              else [None] * (len(prompt) - 1))
        toks += c.tokens[lo:hi]
        lps += c.logprobs[lo:hi]
        tops += [self._top_dict(top) if top is not None else None for top in c.tops[lo:hi]]
        strs = [self._token_text(t) for t in toks]
        offsets, pos = [], offset0
        for st in strs:
            offsets.append(pos)
            pos += len(st)
        return {"tokens": strs, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _top_dict(self, top: list) -> dict[str, float]:
        """OpenAI keys a completion's top logprobs by token text; where two tokens share a text,
        the more likely one is kept."""
        out: dict[str, float] = {}
        for t, v in top:
            out.setdefault(self._token_text(t), v)
        return out

    def _chat_logprobs(self, c: _Choice, lo: int, hi: int) -> dict:
        def entry(t: int, lp: float | None) -> dict:
            s = self._token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in (top or [])]}
                            for t, lp, top in zip(c.tokens[lo:hi], c.logprobs[lo:hi], c.tops[lo:hi], strict=True)]}

    def _usage(self, prompts: list[list[int]], choices: list[_Choice]) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def _final_body(self, kind, base, prompts, choices, logprobs, echo, texts) -> dict:
        n = len(choices) // len(prompts)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        out = []
        for c in choices:
            pi = c.index // n
            if kind == "chat":
                ch = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                      "finish_reason": c.finish, "logprobs": None}
                if logprobs is not None:
                    ch["logprobs"] = self._chat_logprobs(c, 0, len(c.tokens))
            else:
                text = (texts[pi] if echo else "") + c.text
                ch = {"index": c.index, "text": text, "finish_reason": c.finish, "logprobs": None}
                if logprobs is not None:
                    ch["logprobs"] = self._completion_logprobs(c, prompts[pi] if echo else None, 0, len(c.tokens), 0)
            out.append(ch)
        return {"id": base, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": out,
                "usage": self._usage(prompts, choices)}

    # --- streaming ---------------------------------------------------------------------------------

    async def _stream(self, request, kind, base, prompts, choices, by_rid, q, s, logprobs, echo, texts,
                      arrived) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def send(payload: dict) -> None:
            await resp.write(f"data: {json.dumps(payload)}\n\n".encode())

        def chunk(c: _Choice, text: str, lo: int, hi: int, finish: str | None) -> dict:
            if kind == "chat":
                ch = {"index": c.index, "delta": {"content": text} if text or finish is None else {},
                      "logprobs": self._chat_logprobs(c, lo, hi) if logprobs is not None else None,
                      "finish_reason": finish}
            else:  # only the new tokens' logprobs: their offsets continue from the last chunk's
                lp = self._completion_logprobs(c, None, lo, hi, c.stream_offset) if logprobs is not None else None
                if lp is not None and lp["tokens"]:
                    c.stream_offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
                ch = {"index": c.index, "text": text, "finish_reason": finish, "logprobs": lp}
            return {"id": base, "object": obj, "created": created, "model": self.model_name, "choices": [ch]}

        outcome = "ok"
        try:
            if kind == "chat":
                for c in choices:
                    await send({"id": base, "object": obj, "created": created, "model": self.model_name,
                                "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
            elif echo:
                for c in choices:
                    await send(chunk(c, texts[c.index // s.n], 0, 0, None))
            while any(c.finish is None for c in choices):
                ev = await self._next(request, q)
                if ev is None:
                    self.metrics.requests.labels(request.path, "cancelled").inc()
                    return resp
                try:
                    c = by_rid[ev.rid]
                    c_text, c_sent = c.text, c.sent_tokens
                    self._on_event(ev, by_rid, s, arrived)
                except ApiError as e:  # the status line is sent: the error goes in the stream
                    await send(e.body())
                    outcome = f"error_{e.status}"
                    break
                if c.text != c_text or c.finish is not None:
                    await send(chunk(c, c.text[len(c_text):], c_sent, c.sent_tokens, c.finish))
                if c.finish is not None:
                    await self._finished(c)
            if s.include_usage:
                await send({"id": base, "object": obj, "created": created, "model": self.model_name, "choices": [],
                            "usage": self._usage(prompts, choices)})
            await resp.write(b"data: [DONE]\n\n")
            self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
            self.metrics.requests.labels(request.path, outcome).inc()
        except (ConnectionResetError, asyncio.CancelledError):
            self.metrics.requests.labels(request.path, "cancelled").inc()
        return resp


def run_gateway(cfg: Config, host: str | None = None, port: int | None = None) -> int:
    set_title("hm-gateway")
    try:
        gw = Gateway(cfg)
    except Exception as e:
        logging.setup("gateway", cfg.log_format, cfg.log_level).error("cannot start", error=str(e))
        return 1
    host, port = host or cfg.gateway.host, port if port is not None else cfg.gateway.port

    async def main() -> None:
        runner = web.AppRunner(gw.app, handle_signals=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1] if site._server else port
        gw.log.info("serving", url=f"http://{host}:{bound}")
        notify(f"READY=1\nSTATUS=http://{host}:{bound}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        notify("STOPPING=1")
        await runner.cleanup()
        gw.log.info("stopped")

    asyncio.run(main())
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="override gateway.host")
    p.add_argument("--port", type=int, help="override gateway.port")


def main(cfg: Config, args: argparse.Namespace) -> int:
    return run_gateway(cfg)
