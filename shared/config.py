"""The serving configuration: one frozen dataclass per daemon, composed into :class:`Config`,
read from one TOML file (``deploy/hybridmoe.toml`` documents every key) and overridden by flags.

Every value is validated when the config is built, so a daemon fails at start with a message
that names the key, not later with a traceback.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# A ZeroMQ ipc:// path must fit in sockaddr_un.sun_path (108 bytes with its NUL).
MAX_IPC_PATH = 100


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # a Hugging Face checkpoint folder; "" serves the built-in demo model
    name: str = ""  # the model id clients ask for (default: the folder's name)
    dtype: str = ""  # compute dtype: bfloat16, float16, float32 ("" the checkpoint's)

    def __post_init__(self) -> None:
        _require(self.dtype in ("", "bfloat16", "float16", "float32"), "model.dtype",
                 f"{self.dtype!r} is not one of bfloat16, float16, float32")


@dataclass(frozen=True)
class WeightsConfig:
    namespace: str = ""  # shared-memory segment names start with /hm-<namespace> (default from the model)
    quant: str = ""  # quantize bf16 routed experts when publishing: fp8, int4, int4_g32 ("" keep)

    def __post_init__(self) -> None:
        _require(self.quant in ("", "fp8", "int4", "int4_g32", "int4_g128"), "weights.quant",
                 f"{self.quant!r} is not one of fp8, int4, int4_g32, int4_g128")
        _require(all(c.isalnum() or c in "-_." for c in self.namespace), "weights.namespace",
                 "letters, digits, '-', '_' and '.' only")


@dataclass(frozen=True)
class RouterConfig:
    max_queue: int = 256  # requests waiting for a service; more are refused with 429
    max_running: int = 256  # requests placed on services at once
    short_prompt: int = 64  # prompts up to this many tokens are prefilled by decode itself
    heartbeat_s: float = 0.5  # how often every service reports
    dead_after_s: float = 5.0  # a service silent this long is dead: its requests are re-homed

    def __post_init__(self) -> None:
        for k in ("max_queue", "max_running"):
            _require(getattr(self, k) >= 1, f"router.{k}", "must be >= 1")
        _require(self.short_prompt >= 0, "router.short_prompt", "must be >= 0")
        _require(0 < self.heartbeat_s < self.dead_after_s, "router.heartbeat_s",
                 "must be > 0 and below router.dead_after_s")


@dataclass(frozen=True)
class PrefillConfig:
    device: str = "auto"  # "auto" (the first GPU, else the CPU), "cpu", "cuda", "cuda:1"
    chunk_size: int = 16384  # DeepSeek-V3 on an H100: 4.5x the tok/s of 4K chunks (README, "On a GPU")
    threads: int = 0  # CPU threads when it runs on the CPU (0: all)
    nice: int = 10  # on the CPU, run below decode's priority (0: the same)
    experts: str = "auto"  # on the CPU: "kernel", "torch" or "auto" (the kernels for a bf16 model)

    def __post_init__(self) -> None:
        _require(0 <= self.nice <= 19, "prefill.nice", "must lie in [0, 19]")
        _require(self.experts in ("auto", "kernel", "torch"), "prefill.experts", "auto, kernel or torch")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 "prefill.device", f"{self.device!r} is not auto, cpu or cuda[:N]")
        _require(self.chunk_size >= 1, "prefill.chunk_size", "must be >= 1")
        _require(self.threads >= 0, "prefill.threads", "must be >= 0")


@dataclass(frozen=True)
class DecodeConfig:
    numa_nodes: list[int] = field(default_factory=lambda: [0])  # one decode service per entry
    device: str = "cpu"  # attention and dense parts: "cpu" or "cuda[:N]"
    num_blocks: int = 2048
    block_size: int = 16
    max_batch: int = 32
    max_context: int = 0  # 0: the cache size or the model's limit, whichever is smaller
    threads: int = 0  # 0: every core of the NUMA node
    overlap: bool = False  # dual-batch overlap of attention and experts
    experts: str = "auto"  # "kernel", "torch" or "auto"

    def __post_init__(self) -> None:
        _require(len(self.numa_nodes) >= 1 and all(n >= 0 for n in self.numa_nodes), "decode.numa_nodes",
                 "a non-empty list of node numbers")
        for k in ("num_blocks", "block_size", "max_batch"):
            _require(getattr(self, k) >= 1, f"decode.{k}", "must be >= 1")
        _require(self.max_context >= 0 and self.threads >= 0, "decode.max_context", "must be >= 0")
        _require(self.experts in ("auto", "kernel", "torch"), "decode.experts", "auto, kernel or torch")


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""  # when set, every /v1 request needs "Authorization: Bearer <key>"
    default_max_tokens: int = 256
    max_n: int = 8

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, "gateway.port", "must lie in [0, 65535]")
        _require(self.default_max_tokens >= 1 and self.max_n >= 1, "gateway.default_max_tokens", "must be >= 1")


@dataclass(frozen=True)
class Config:
    run_dir: str = ""  # socket files and the weight manifest (default: a private folder under /tmp)
    log_format: str = "auto"  # "json", "console", or "auto" (console on a terminal, else JSON)
    log_level: str = "info"
    model: ModelConfig = field(default_factory=ModelConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    prefill: PrefillConfig = field(default_factory=PrefillConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)

    def __post_init__(self) -> None:
        _require(self.log_format in ("auto", "json", "console"), "log_format", "auto, json or console")
        _require(self.log_level in ("debug", "info", "warning", "error"), "log_level",
                 "debug, info, warning or error")

    # --- endpoints: every socket lives in run_dir ----------------------------------------------

    def run_path(self) -> Path:
        if not self.run_dir:
            raise ConfigError("run_dir: not set (hybridmoe serve makes one; daemons run alone need it)")
        return Path(self.run_dir)

    def endpoint(self, name: str) -> str:
        path = self.run_path() / f"{name}.sock"
        _require(len(str(path)) <= MAX_IPC_PATH, "run_dir",
                 f"{path} is longer than {MAX_IPC_PATH} characters, too long for a Unix socket")
        return f"ipc://{path}"

    @property
    def router_endpoint(self) -> str:
        return self.endpoint("router")

    def kv_endpoint(self, decode_name: str) -> str:
        return self.endpoint(f"kv-{decode_name}")

    @property
    def manifest(self) -> Path:
        return self.run_path() / "weights.json"

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> Config:
        """The TOML file at ``path`` (or the defaults), then ``overrides`` given as dotted keys
        (``{"gateway.port": 8080}``; a value of None is ignored)."""
        data: dict = {}
        if path:
            try:
                data = tomllib.loads(Path(path).read_text())
            except FileNotFoundError as e:
                raise ConfigError(f"{path}: no such config file") from e
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: not valid TOML ({e})") from e
        for key, value in overrides.items():
            if value is None:
                continue
            *parents, leaf = key.split(".")
            node = data
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return _from_dict(cls, data, "")

    def to_toml(self) -> str:
        """The config as TOML (what ``hybridmoe serve`` hands its children)."""
        lines, tables = [], []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                tables.append((f.name, value))
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        for name, table in tables:
            lines.append(f"\n[{name}]")
            lines += [f"{f.name} = {_toml_value(getattr(table, f.name))}" for f in dataclasses.fields(table)]
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _from_dict(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, key)
            continue
        kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # from a flag: "0,1"
            value = [v for v in value.split(",") if v.strip()]
        _require(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        _require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = tp(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and (tp is float or
                 isinstance(value, int)), key, f"expected {tp.__name__}, got {value!r}")
        return tp(value)
    _require(isinstance(value, str), key, f"expected a string, got {value!r}")
    return value


def private_run_dir() -> Path:
    """A new folder only this user can enter, short enough for socket paths."""
    return Path(tempfile.mkdtemp(prefix="hybridmoe-", dir="/tmp"))
