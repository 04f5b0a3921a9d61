"""The OpenAI-compatible request schema: parsing and validation of the gateway's JSON bodies.

Every problem is an :class:`ApiError` that the gateway turns into OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_STOP = 4
MAX_LOGPROBS = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param, "invalid_value" if param else None)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"'{key}' must be a number, got {type(v).__name__}", key)
    if not lo <= v <= hi:
        raise _bad(f"'{key}' must lie in [{lo}, {hi}], got {v}", key)
    return float(v)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{key}' must be an integer, got {type(v).__name__}", key)
    if v < lo or (hi is not None and v > hi):
        raise _bad(f"'{key}' must lie in [{lo}, {hi if hi is not None else 'inf'}], got {v}", key)
    return v


def _boolean(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"'{key}' must be true or false, got {type(v).__name__}", key)
    return v


@dataclass
class Sampling:
    max_tokens: int | None  # None: up to the context (chat's default)
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]  # an extension (as vLLM has it): end on any of these tokens
    n: int
    stream: bool
    include_usage: bool
    ignore_eos: bool


def parse_sampling(body: dict, max_n: int, max_tokens_key: tuple[str, ...], default_max_tokens: int | None,
                   allow_zero_tokens: bool) -> Sampling:
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0:
            raise _bad(f"'{key}' is not supported by this server (only 0)", key)
    if body.get("logit_bias"):
        raise _bad("'logit_bias' is not supported by this server", "logit_bias")
    if body.get("best_of") not in (None, 1):
        raise _bad("'best_of' is not supported by this server (only 1)", "best_of")
    max_tokens = default_max_tokens
    for key in max_tokens_key:
        if body.get(key) is not None:
            max_tokens = _integer(body, key, None, 0 if allow_zero_tokens else 1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise _bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                  for t in stop_ids):
        raise _bad("'stop_token_ids' must be a list of token ids", "stop_token_ids")
    stream = _boolean(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = bool(opts and opts.get("include_usage"))
    if include_usage and not stream:
        raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        top_k=_integer(body, "top_k", 0, -1) if body.get("top_k") != -1 else 0,
        seed=seed % (2**63) if seed is not None else None,
        stop=stop, stop_token_ids=stop_ids, n=_integer(body, "n", 1, 1, max_n), stream=stream,
        include_usage=include_usage, ignore_eos=_boolean(body, "ignore_eos", False))


@dataclass
class CompletionRequest:
    model: str
    prompts: list  # each a str or a list of token ids
    sampling: Sampling
    echo: bool
    logprobs: int | None


def parse_completion(body: Any, max_n: int, vocab_size: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(
            isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        prompts = list(prompt)
    else:
        raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                   "prompt")
    for p in prompts:
        if isinstance(p, list) and not all(0 <= t < vocab_size for t in p):
            raise _bad(f"token ids in 'prompt' must lie in [0, {vocab_size})", "prompt")
    sampling = parse_sampling(body, max_n, ("max_tokens",), 16, allow_zero_tokens=True)
    echo = _boolean(body, "echo", False)
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    if sampling.max_tokens == 0 and not echo:
        raise _bad("'max_tokens' 0 is only allowed with 'echo' (prompt scoring)", "max_tokens")
    if sampling.max_tokens == 0 and sampling.stream:
        raise _bad("'max_tokens' 0 (prompt scoring) cannot be streamed", "stream")
    return CompletionRequest(model, prompts, sampling, echo, logprobs)


@dataclass
class ChatRequest:
    model: str
    messages: list[dict] = field(default_factory=list)
    sampling: Sampling | None = None
    logprobs: bool = False
    top_logprobs: int = 0


_ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_chat(body: Any, max_n: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise _bad(f"messages[{i}] must be an object with a 'role' among {', '.join(_ROLES)}", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(c["text"] for c in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    sampling = parse_sampling(body, max_n, ("max_tokens", "max_completion_tokens"), None, allow_zero_tokens=False)
    logprobs = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    if top and not logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return ChatRequest(model, out, sampling, logprobs, top or 0)


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string", "model")
    return model
