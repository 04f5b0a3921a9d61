"""Every message that travels between hybridmoe's daemons, and the one codec that frames them.

A message is a multipart ZeroMQ message:

- frame 0: one byte, the message :class:`Kind` (so a receiver dispatches before it decodes);
- frame 1: the MessagePack header ``{"v": PROTOCOL, "f": {field: value}, "b": [[dtype, shape], ...]}``;
- frames 2..: raw tensor buffers, sent with ``copy=False`` and rebuilt with ``torch.frombuffer``.

Every kind is a frozen dataclass below; nothing else goes on the wire. :func:`decode` validates
the version, the kind, every field's type and every buffer's size, and raises :class:`BadMessage`
with a reason; a service logs that and drops the message (see :func:`try_decode`).

Who sends what (G gateway, R router, P prefill, D decode):

    G->R Heartbeat, Submit, Cancel   R->G Tokens, PromptLogprobs, Reject, RouterStatus
    R->P PrefillTask, Cancel         P->R Heartbeat, FirstToken, PromptLogprobs, Failed
    R->D DecodeTask, Cancel          D->R Heartbeat, Tokens, Failed
    P->D KVChunk, KVDone         (directly: the router only tells prefill where)
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import msgpack
import torch

PROTOCOL = 1

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class BadMessage(ValueError):
    """A message that cannot be decoded; the text says why."""


class Kind(IntEnum):
    HEARTBEAT = 2
    SUBMIT = 3
    CANCEL = 4
    PREFILL_TASK = 5
    DECODE_TASK = 6
    KV_CHUNK = 7
    KV_DONE = 8
    FIRST_TOKEN = 9
    TOKENS = 10
    PROMPT_LOGPROBS = 11
    REJECT = 12
    FAILED = 13
    ROUTER_STATUS = 14


# --- payload pieces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """Sampling parameters as they travel (see shared.sampling.SamplingParams)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    def sampling(self):
        from shared.sampling import SamplingParams

        return SamplingParams(self.max_tokens, self.temperature, self.top_p, self.top_k, self.seed,
                              tuple(self.stop_token_ids), self.ignore_eos, self.logprobs).validate()


@dataclass(frozen=True)
class TokenItem:
    """One generated token of one request. ``new`` is False for a token that an earlier message
    already reported (the prefill's first token, repeated by decode only to carry its finish)."""

    rid: str
    token: int
    logprob: float | None = None
    top: list[list] | None = None  # [[token, logprob], ...]
    finish: str | None = None  # "stop", "length", "abort" or None while running
    new: bool = True
    queued_s: float | None = None  # on a request's first token: its time in the router's queue


# --- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    KIND: ClassVar[Kind]
    tensors: tuple = field(default=(), repr=False, compare=False)  # raw buffers, frames 2..


@dataclass(frozen=True)
class Heartbeat(Message):
    """Every service sends one every ``router.heartbeat_s``; the first one is its handshake (so a
    restarted router learns its peers again without another message)."""

    KIND: ClassVar[Kind] = Kind.HEARTBEAT
    role: str = ""  # "prefill", "decode" or "gateway"
    name: str = ""
    pid: int = 0
    kv_endpoint: str = ""  # decode: where prefill sends KV
    max_context: int = 0  # decode: the longest sequence it can hold
    block_size: int = 1  # decode: KV cache block, in tokens
    total_tokens: int = 0  # decode: KV cache capacity, in tokens
    running: int = 0
    waiting: int = 0


@dataclass(frozen=True)
class Submit(Message):
    KIND: ClassVar[Kind] = Kind.SUBMIT
    rid: str = ""
    prompt: list[int] = field(default_factory=list)
    params: Params = field(default_factory=Params)
    prompt_logprobs: int | None = None  # score the prompt (echo + logprobs)
    generate: bool = True  # False: only score the prompt (max_tokens 0)


@dataclass(frozen=True)
class Cancel(Message):
    KIND: ClassVar[Kind] = Kind.CANCEL
    rid: str = ""


@dataclass(frozen=True)
class PrefillTask(Message):
    KIND: ClassVar[Kind] = Kind.PREFILL_TASK
    rid: str = ""
    prompt: list[int] = field(default_factory=list)
    params: Params = field(default_factory=Params)
    kv_endpoint: str = ""  # the decode service's KV socket; "" when only scoring
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class DecodeTask(Message):
    KIND: ClassVar[Kind] = Kind.DECODE_TASK
    rid: str = ""
    prompt: list[int] = field(default_factory=list)
    params: Params = field(default_factory=Params)
    prefill_here: bool = False  # True: a short prompt the decode engine prefills itself


@dataclass(frozen=True)
class KVChunk(Message):
    """One layer's cache entries for positions [start, start + rows); tensors[0] [rows, width]."""

    KIND: ClassVar[Kind] = Kind.KV_CHUNK
    rid: str = ""
    layer: int = 0
    start: int = 0


@dataclass(frozen=True)
class KVDone(Message):
    KIND: ClassVar[Kind] = Kind.KV_DONE
    rid: str = ""
    tokens: int = 0
    first: TokenItem = field(default_factory=lambda: TokenItem("", 0))


@dataclass(frozen=True)
class FirstToken(Message):
    KIND: ClassVar[Kind] = Kind.FIRST_TOKEN
    item: TokenItem = field(default_factory=lambda: TokenItem("", 0))


@dataclass(frozen=True)
class Tokens(Message):
    KIND: ClassVar[Kind] = Kind.TOKENS
    items: list[TokenItem] = field(default_factory=list)


@dataclass(frozen=True)
class PromptLogprobs(Message):
    """Logprobs of prompt tokens 1..P-1 under the model (token 0 has none), with the top N."""

    KIND: ClassVar[Kind] = Kind.PROMPT_LOGPROBS
    rid: str = ""
    logprobs: list[float] = field(default_factory=list)
    top: list[list] = field(default_factory=list)  # per position [[token, logprob], ...]


@dataclass(frozen=True)
class Reject(Message):
    """The router refuses or ends a request with an HTTP-like status (429 busy, 503 no service,
    500 the request failed where it ran)."""

    KIND: ClassVar[Kind] = Kind.REJECT
    rid: str = ""
    status: int = 503
    message: str = ""


@dataclass(frozen=True)
class Failed(Message):
    """A prefill or decode service could not run a request (bad input it caught, or an error)."""

    KIND: ClassVar[Kind] = Kind.FAILED
    rid: str = ""
    message: str = ""


@dataclass(frozen=True)
class RouterStatus(Message):
    KIND: ClassVar[Kind] = Kind.ROUTER_STATUS
    epoch: str = ""  # changes when the router restarts: requests the old one held are lost
    prefill: int = 0  # live prefill services
    decode: int = 0  # live decode services
    max_context: int = 0  # the longest sequence a live decode service can hold
    queued: int = 0
    running: int = 0
    kv_used_tokens: int = 0
    kv_total_tokens: int = 0


MESSAGES: dict[Kind, type[Message]] = {
    cls.KIND: cls for cls in (Heartbeat, Submit, Cancel, PrefillTask, DecodeTask, KVChunk, KVDone,
                              FirstToken, Tokens, PromptLogprobs, Reject, Failed, RouterStatus)
}
_KIND_BYTES = frozenset(int(k) for k in MESSAGES)
_NESTED = {"Params": Params, "TokenItem": TokenItem}
# Received buffers are read-only views of the ZeroMQ frames: receivers copy what they keep.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


# --- codec ---------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def encode(msg: Message) -> list:
    """msg -> frames [kind byte, header, *buffers]; buffers are views of the tensors, no copy."""
    fields = {f.name: _plain(getattr(msg, f.name)) for f in dataclasses.fields(msg) if f.name != "tensors"}
    bufs, specs = [], []
    for t in msg.tensors:
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{type(msg).__name__}: tensors of dtype {t.dtype} cannot be sent")
        t = t.detach().cpu().contiguous()
        specs.append([_DTYPE_NAMES[t.dtype], list(t.shape)])
        bufs.append(t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b"")
    header = msgpack.packb({"v": PROTOCOL, "f": fields, "b": specs}, use_bin_type=True)
    return [bytes([msg.KIND]), header, *bufs]


def _check(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to ``tp`` (dataclasses from maps) or BadMessage."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check(value, inner[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise BadMessage(f"{where}: expected a list, got {type(value).__name__}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_check(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BadMessage(f"{where}: expected a map, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is Any or tp is list:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise BadMessage(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def _build(cls: type, data: dict, where: str, tensors: tuple = ()) -> Any:
    hints = typing.get_type_hints(cls, localns=_NESTED)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name == "tensors":
            continue
        if f.name in data:
            kwargs[f.name] = _check(data[f.name], hints[f.name], f"{where}.{f.name}")
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise BadMessage(f"{where}: unknown fields {sorted(unknown)}")
    if tensors:
        kwargs["tensors"] = tensors
    return cls(**kwargs)


def decode(frames: list) -> Message:
    """frames (bytes or zmq.Frame) -> the typed message; BadMessage says what is wrong."""
    if len(frames) < 2:
        raise BadMessage(f"{len(frames)} frame(s); a message has a kind byte and a header")
    raw = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    kind_b = bytes(raw[0])
    if len(kind_b) != 1 or kind_b[0] not in _KIND_BYTES:
        raise BadMessage(f"unknown message kind {kind_b[:8]!r}")
    cls = MESSAGES[Kind(kind_b[0])]
    try:
        header = msgpack.unpackb(bytes(raw[1]), raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise BadMessage(f"{cls.__name__}: header is not MessagePack ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict) or not isinstance(header.get("f"), dict):
        raise BadMessage(f"{cls.__name__}: header is not a map with fields")
    if header.get("v") != PROTOCOL:
        raise BadMessage(f"{cls.__name__}: protocol version {header.get('v')!r}, this service speaks {PROTOCOL}")
    specs = header.get("b", [])
    if not isinstance(specs, list) or len(specs) != len(raw) - 2:
        raise BadMessage(f"{cls.__name__}: header names {len(specs) if isinstance(specs, list) else '?'} "
                         f"buffers, the message has {len(raw) - 2}")
    tensors = []
    for i, (spec, buf) in enumerate(zip(specs, raw[2:], strict=True)):
        if (not isinstance(spec, list) or len(spec) != 2 or spec[0] not in _DTYPES
                or not isinstance(spec[1], list) or not all(isinstance(d, int) and d >= 0 for d in spec[1])):
            raise BadMessage(f"{cls.__name__}: buffer {i} has a bad spec {spec!r}")
        dtype, shape = _DTYPES[spec[0]], spec[1]
        n = 1
        for d in shape:
            n *= d
        mv = memoryview(buf)
        if mv.nbytes != n * dtype.itemsize:
            raise BadMessage(f"{cls.__name__}: buffer {i} has {mv.nbytes} bytes, {spec[0]} {shape} needs "
                             f"{n * dtype.itemsize}")
        tensors.append(torch.frombuffer(mv, dtype=dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype))
    try:
        return _build(cls, header["f"], cls.__name__, tuple(tensors))
    except TypeError as e:
        raise BadMessage(f"{cls.__name__}: {e}") from e


def try_decode(frames: list, log: Any) -> Message | None:
    """decode, or log the reason and return None (the message is dropped)."""
    try:
        return decode(frames)
    except BadMessage as e:
        log.warning("dropped a malformed message", reason=str(e))
        return None
