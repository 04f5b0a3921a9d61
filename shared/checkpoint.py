"""Hugging Face checkpoint folders: read (config.json + sharded safetensors), validate, write.

Reading never loads the whole checkpoint: tensors come one at a time from memory-mapped
safetensors files. Every problem is reported as one :class:`CheckpointError` that names the file
and the tensor or config field at fault.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.quant import QuantWeight, dequantize, fp8_scale_shape

INDEX_FILE = "model.safetensors.index.json"
_MISSING = object()


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be served as it is; the message names file and field."""


class HFConfig:
    """config.json with typed, clearly-failing field access."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data = data
        self.path = path

    @classmethod
    def read(cls, folder: Path) -> HFConfig:
        path = folder / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a checkpoint folder needs config.json)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object at the top level")
        return cls(data, path)

    def get(self, key: str, default: Any = _MISSING, kind: type | tuple[type, ...] | None = None) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: missing field {key!r}")
            return default
        value = self.data[key]
        if kind is not None and not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise CheckpointError(f"{self.path}: field {key!r} = {value!r} should be {_kind_name(kind)}")
        return value

    def positive(self, key: str, default: Any = _MISSING) -> int:
        value = self.get(key, default, int)
        if value <= 0:
            raise CheckpointError(f"{self.path}: field {key!r} = {value} must be positive")
        return value

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")


def _kind_name(kind: type | tuple[type, ...] | None) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds if k is not None)


class Checkpoint:
    """A Hugging Face checkpoint folder, read tensor by tensor."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint folder")
        self.config = HFConfig.read(self.path)
        self._files = self._index()
        self._handles: dict[str, Any] = {}

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
            for file in set(weight_map.values()):
                if not (self.path / file).is_file():
                    raise CheckpointError(f"{index}: names {file}, which is missing from {self.path}")
            return dict(weight_map)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        names: dict[str, str] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                names.update(dict.fromkeys(f.keys(), file.name))
        return names

    def _handle(self, name: str) -> Any:
        if name not in self._files:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the safetensors files")
        file = self._files[name]
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(self.path / file, framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.path / file}: cannot be read as safetensors ({e})") from e
        return self._handles[file]

    def names(self) -> Iterable[str]:
        return self._files.keys()

    def has(self, name: str) -> bool:
        return name in self._files

    def file_of(self, name: str) -> Path:
        return self.path / self._files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def expect(self, name: str, shape: tuple[int, ...], why: str) -> torch.Tensor:
        """The tensor ``name``, after checking that its shape is the one config.json implies."""
        actual = self.shape(name)
        if actual != tuple(shape):
            raise CheckpointError(
                f"{self.file_of(name)}: tensor {name!r} has shape {list(actual)}, but "
                f"{self.config.path.name} ({why}) implies {list(shape)}"
            )
        return self.get(name)

    def linear(self, prefix: str, shape: tuple[int, int], why: str) -> QuantWeight:
        """The weight ``prefix.weight`` of a linear layer, in whatever format it is stored."""
        out_f, in_f = shape
        weight = f"{prefix}.weight"
        if self.has(f"{prefix}.weight_scale_inv"):
            data = self.expect(weight, shape, why)
            if data.dtype != torch.float8_e4m3fn:
                raise CheckpointError(
                    f"{self.file_of(weight)}: {weight!r} has a weight_scale_inv but dtype {data.dtype} "
                    "(FP8 block-scaled weights must be float8_e4m3fn)"
                )
            scale = self.expect(f"{prefix}.weight_scale_inv", fp8_scale_shape(out_f, in_f),
                                f"128x128 blocks of {why}")
            return QuantWeight("fp8_b128", data, scale.float(), shape)
        if self.has(f"{prefix}.weight_scale"):
            data = self.expect(weight, (out_f, in_f // 2), f"{why}; INT4 packs two per byte")
            groups = self.shape(f"{prefix}.weight_scale")[-1]
            group = in_f // groups if groups else 0
            if data.dtype != torch.uint8 or group not in (32, 128) or groups * group != in_f:
                raise CheckpointError(
                    f"{self.file_of(weight)}: {weight!r} with weight_scale is not INT4 with groups "
                    f"of 32 or 128 (dtype {data.dtype}, {groups} scale groups over {in_f} inputs)"
                )
            scale = self.expect(f"{prefix}.weight_scale", (out_f, groups), f"groups of {group} of {why}")
            return QuantWeight(f"int4_g{group}", data, scale.to(torch.bfloat16), shape)
        return QuantWeight("dense", self.expect(weight, shape, why), None, shape)

    def dense(self, prefix: str, shape: tuple[int, int], why: str, dtype: torch.dtype) -> torch.Tensor:
        """A linear layer's weight as a plain tensor (FP8/INT4 storage is dequantized)."""
        return dequantize(self.linear(prefix, shape, why), dtype)

    def each_expert(self, prefixes: list[str], shape: tuple[int, int], why: str) -> Iterator[QuantWeight]:
        """The routed experts' weights of one projection, one at a time as stored, each checked to
        share the first's format (the weight store writes them so, never holding a whole stack)."""
        first = None
        for prefix in prefixes:
            w = self.linear(prefix, shape, why)
            if first is None:
                first = w
            elif w.fmt != first.fmt:
                raise CheckpointError(
                    f"{self.file_of(prefix + '.weight')}: expert weight {prefix!r} is {w.fmt} but "
                    f"{prefixes[0]!r} is {first.fmt}; a layer's experts must share one format"
                )
            yield w

    def experts(self, prefixes: list[str], shape: tuple[int, int], why: str,
                dtype: torch.dtype) -> QuantWeight:
        """The routed experts' weights of one projection, stacked [E, out, in] in one buffer.

        Quantized experts stay quantized; dense ones are converted to ``dtype``.
        """
        each = self.each_expert(prefixes, shape, why)
        first = next(each)
        n = len(prefixes)
        data = torch.empty((n, *first.data.shape),
                           dtype=dtype if first.fmt == "dense" else first.data.dtype)
        scale = None if first.scale is None else torch.empty((n, *first.scale.shape), dtype=first.scale.dtype)
        for e, w in enumerate(itertools.chain([first], each)):
            data[e].copy_(w.data)
            if scale is not None:
                scale[e].copy_(w.scale)
        return QuantWeight(first.fmt, data, scale, (n, *shape))


class ShardWriter:
    """Writes tensors into safetensors shards named as Hugging Face names them, plus the index."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 4 << 30) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.cpu().contiguous()  # made on a GPU (make-model --device): to host
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def add_linear(self, prefix: str, w: QuantWeight) -> None:
        if w.fmt == "fp8_b128":
            self.add(f"{prefix}.weight", w.data)
            self.add(f"{prefix}.weight_scale_inv", w.scale)
        elif w.fmt.startswith("int4"):
            self.add(f"{prefix}.weight", w.data)
            self.add(f"{prefix}.weight_scale", w.scale)
        else:
            self.add(f"{prefix}.weight", w.data)

    def _flush(self) -> None:
        path = self.out / f".shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        final: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._shards):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(self.out / name)
            final.append(self.out / name)
            weight_map.update(dict.fromkeys(names, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return final


class WeightSpec:
    """One tensor (or one stack of routed experts) that a model family expects in a checkpoint.

    ``role`` says how it is read and how ``make-model`` initialises it: ``vector`` (norm weights),
    ``bias`` (fp32 vectors), ``embed``, ``linear`` (a linear layer, ``name`` is its prefix),
    ``router`` (kept unquantized), ``experts`` (``name`` is a prefix with ``{e}``, shape
    ``[E, out, in]``). ``why`` names the config.json fields that imply the shape.
    """

    __slots__ = ("name", "shape", "role", "why")
    ROLES = ("vector", "bias", "embed", "linear", "router", "experts")

    def __init__(self, name: str, shape: tuple[int, ...], role: str, why: str) -> None:
        if role not in self.ROLES:
            raise ValueError(f"unknown weight role {role!r}")
        self.name, self.shape, self.role, self.why = name, tuple(shape), role, why

    def expert_prefixes(self) -> list[str]:
        return [self.name.format(e=e) for e in range(self.shape[0])]

    def __repr__(self) -> str:
        return f"WeightSpec({self.name!r}, {list(self.shape)}, {self.role})"


def load_spec(ckpt: Checkpoint, s: WeightSpec, dtype: torch.dtype) -> Any:
    """One spec's tensor, validated: routed experts as a stacked :class:`QuantWeight`; other linear
    layers as the checkpoint stores them, a :class:`QuantWeight` when quantized (FP8, INT4: decode's
    kernels read them so, the torch paths dequantize them per call), else a ``dtype`` tensor;
    routers and the LM head as ``dtype`` tensors whatever their storage."""
    if s.role == "experts":
        return ckpt.experts(s.expert_prefixes(), s.shape[1:], s.why, dtype)
    if s.role == "linear":
        w = ckpt.linear(s.name, s.shape, s.why)
        return w if w.fmt != "dense" else w.data.to(dtype)
    if s.role == "router":
        return ckpt.dense(s.name, s.shape, s.why, dtype)
    if s.role == "bias":
        return ckpt.expect(s.name, s.shape, s.why).float()
    return ckpt.expect(s.name, s.shape, s.why).to(dtype)


def load_weights(ckpt: Checkpoint, specs: list[WeightSpec], dtype: torch.dtype) -> dict[str, Any]:
    """Every tensor the specs name (see :func:`load_spec`)."""
    return {s.name: load_spec(ckpt, s, dtype) for s in specs}
