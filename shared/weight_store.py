"""The model's weights in POSIX shared memory: published once, mapped by every service.

:func:`publish` reads a checkpoint spec by spec (the tensors exactly as the model uses them:
non-expert weights in the compute dtype, routed experts stacked ``[E, out, in]`` in their format),
writes one segment per layer (plus one for the rest) and a JSON manifest naming, for each tensor,
its segment, offset, dtype and shape. Offsets are 4096-aligned, so the CPU kernels' alignment
checks pass and CUDA can register the pages for DMA.

:func:`attach` maps the segments read-only and returns tensors that are views of the mapping:
one copy of the weights in RAM however many services map it, nothing copied at attach, and a
restarted service attaches in the time it takes to map. Segments are created mode 0600 (the
service user only) and :func:`unlink` removes them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import posix_ipc
import torch

from shared.checkpoint import Checkpoint, CheckpointError, HFConfig, WeightSpec, load_spec
from shared.model import DTYPES, build_model, config_dtype, family_of
from shared.quant import QuantWeight, checkpoint_format, quantize

# 2: a checkpoint's quantized linear layers (not only its routed experts) are published as stored
MANIFEST_VERSION = 2
ALIGN = 4096
_DTYPES = {**DTYPES, "float8_e4m3fn": torch.float8_e4m3fn, "uint8": torch.uint8}
_NAMES = {v: k for k, v in _DTYPES.items()}
_LAYER = re.compile(r"^(model\.layers\.\d+)\.")
# The mapping is read-only on purpose (a stray write faults instead of corrupting every service's
# weights); torch warns that it cannot mark such tensors read-only.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class StoreError(RuntimeError):
    """The shared-memory weights are missing, stale or unreadable; the message says which."""


def default_namespace(model_path: str | Path, quant: str = "") -> str:
    """A stable name for a checkpoint's segments: its folder name and a hash of its real path."""
    p = Path(model_path).resolve()
    digest = hashlib.sha1(f"{p}|{quant}".encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "", p.name)[:24] or "model"
    return f"{stem}-{digest}"


def _signature(model_path: Path) -> dict:
    """What must not change for published weights to stay valid: the files and their mtimes."""
    files = sorted(model_path.glob("*.safetensors")) + [model_path / "config.json"]
    return {"path": str(model_path.resolve()),
            "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}


@dataclass
class _Entry:
    name: str
    value: Any  # torch.Tensor or QuantWeight


class _Experts:
    """A layer's routed experts of one projection, written into their segment expert by expert.

    Loading the whole stack first (as :func:`load_spec` does) held a second copy of every layer's
    experts in private memory while the segment was written: 11.7 GB at a DeepSeek-V3 layer, and
    quantizing a dense stack at publish time made an fp32 copy of it (15 GB). Here one expert is
    read (and quantized) at a time; the first one fixes the stack's format and layout."""

    def __init__(self, ckpt: Checkpoint, spec: WeightSpec, dtype: torch.dtype, fmt: str) -> None:
        self.spec, self.dtype, self.fmt, self.name = spec, dtype, fmt, spec.name
        self.prefixes = spec.expert_prefixes()
        self._each = ckpt.each_expert(self.prefixes, spec.shape[1:], spec.why)  # checks their formats as stored
        self.first = self._converted(next(self._each))

    def _converted(self, w: QuantWeight) -> QuantWeight:
        if w.fmt == "dense":
            w = QuantWeight("dense", w.data.to(self.dtype), None, w.shape)
            if self.fmt:
                w = quantize(w.data, self.fmt)
        return w

    def parts(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        n, f = len(self.prefixes), self.first
        out = [(f"{self.name}#data", f.data.dtype, (n, *f.data.shape))]
        if f.scale is not None:
            out.append((f"{self.name}#scale", f.scale.dtype, (n, *f.scale.shape)))
        return out

    def write(self, views: dict[str, torch.Tensor]) -> None:
        data, scale = views[f"{self.name}#data"], views.get(f"{self.name}#scale")
        for e, w in enumerate(itertools.chain([self.first], map(self._converted, self._each))):
            data[e].copy_(w.data)
            if scale is not None:
                scale[e].copy_(w.scale)


def _tensors_of(entry: _Entry) -> list[tuple[str, torch.Tensor]]:
    v = entry.value
    if isinstance(v, QuantWeight):
        out = [(f"{entry.name}#data", v.data)]
        if v.scale is not None:
            out.append((f"{entry.name}#scale", v.scale))
        return out
    return [(entry.name, v)]


def shm_huge_pages(mounts: str | Path = "/proc/mounts", where: str = "/dev/shm") -> str:
    """The ``huge=`` mode of the tmpfs at ``where`` (where POSIX shared memory lives): "never" when
    the mount does not set it or cannot be read. Under "advise" (or "within_size", "always") the
    segments get 2 MB pages, which the CPU kernels read faster; see README, "Huge pages"."""
    mode = "never"
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return mode
    for line in lines:  # the last mount at `where` is the one in effect
        fields = line.split()
        if len(fields) >= 4 and fields[1] == where and fields[2] == "tmpfs":
            mode = next((o[5:] for o in fields[3].split(",") if o.startswith("huge=")), "never")
    return mode


def _advise_huge(mm: mmap.mmap) -> None:
    """Ask for 2 MB pages on a segment's mapping: the writer's, so that the tmpfs allocates them
    (under huge=advise), and each reader's, so that it maps them whole. A no-op where the mount
    does not allow them; where the kernel refuses the advice, nothing is lost but speed."""
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass


def _segment_name(namespace: str, i: int) -> str:
    return f"/hm-{namespace}-{i:04d}"


def _fill_segment(shm: posix_ipc.SharedMemory, size: int, parts: list, offsets: list[int],
                  group: list[_Entry | _Experts]) -> None:
    with mmap.mmap(shm.fd, max(size, ALIGN)) as mm:
        _advise_huge(mm)  # (before the first write: the pages are allocated then)
        dst = torch.frombuffer(mm, dtype=torch.uint8)
        views: dict[str, torch.Tensor] = {}
        for (n, dt, shape, src), off in zip(parts, offsets, strict=True):
            nbytes = torch.Size(shape).numel() * dt.itemsize
            views[n] = dst[off:off + nbytes].view(dt).view(shape)
            if isinstance(src, torch.Tensor) and nbytes:
                views[n].copy_(src)
        for e in group:
            if isinstance(e, _Experts):
                e.write(views)
        del dst, views


def _write_segment(name: str, group: list[_Entry | _Experts], manifest: dict, index: int) -> None:
    """One segment holding the group's tensors at 4096-aligned offsets; routed experts are written
    straight into it, one expert at a time."""
    parts: list[tuple[str, torch.dtype, tuple[int, ...], Any]] = []  # (name, dtype, shape, entry)
    for e in group:
        if isinstance(e, _Experts):
            parts += [(n, dt, shape, e) for n, dt, shape in e.parts()]
        else:
            parts += [(n, t.dtype, tuple(t.shape), t) for n, t in _tensors_of(e)]
    size, offsets = 0, []
    for _, dt, shape, _ in parts:
        offsets.append(size)
        size += -(-(torch.Size(shape).numel() * dt.itemsize) // ALIGN) * ALIGN
    try:
        posix_ipc.unlink_shared_memory(name)  # a stale segment of ours, left by a crash
    except posix_ipc.ExistentialError:
        pass
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=max(size, ALIGN))
    try:
        _fill_segment(shm, size, parts, offsets, group)
    except BaseException:  # (an expert read after the segment was made failed: the segment goes too)
        shm.unlink()
        raise
    finally:
        shm.close_fd()
    manifest["segments"].append({"name": name, "size": max(size, ALIGN)})
    for e in group:
        if isinstance(e, _Experts):
            manifest["tensors"][e.name] = {"fmt": e.first.fmt, "shape": [len(e.prefixes), *e.spec.shape[1:]]}
        elif isinstance(e.value, QuantWeight):
            manifest["tensors"][e.name] = {"fmt": e.value.fmt, "shape": list(e.value.shape)}
    for (n, dt, shape, _), off in zip(parts, offsets, strict=True):
        manifest["tensors"].setdefault(n, {}).update(
            {"segment": index, "offset": off, "dtype": _NAMES[dt], "shape": list(shape)})


def publish(model_path: str | Path, manifest_path: str | Path, namespace: str = "", dtype: str = "",
            quant: str = "", progress: Callable[[int, int], None] | None = None) -> dict:
    """Publish ``model_path`` into shared memory and write the manifest; returns it.

    If the manifest already describes this checkpoint (same files, dtype and quantization) and
    its segments exist, they are reused as they are: a restarted weights service does not reload.
    ``progress(done, total)`` is called after each segment (a layer), counting tensor specs.
    """
    model_path = Path(model_path)
    ckpt = Checkpoint(model_path)
    fam = family_of(ckpt.config)
    torch_dtype = DTYPES[dtype] if dtype else config_dtype(ckpt.config)
    namespace = namespace or default_namespace(model_path, quant)
    sig = {**_signature(model_path), "dtype": _NAMES[torch_dtype], "quant": quant, "namespace": namespace}
    manifest_path = Path(manifest_path)
    if (old := _reusable(manifest_path, sig)) is not None:
        return old
    specs = fam.weight_specs(fam.args_from_config(ckpt.config))
    fmt = checkpoint_format(quant) if quant else ""
    manifest: dict = {"version": MANIFEST_VERSION, "model": str(model_path.resolve()), "signature": sig,
                      "published": time.time(), "segments": [], "tensors": {}}
    groups: list[tuple[str, list[WeightSpec]]] = []
    for s in specs:
        m = _LAYER.match(s.name)
        key = m.group(1) if m else "model"
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        groups[-1][1].append(s)
    done = 0
    try:
        for i, (_, group_specs) in enumerate(groups):
            entries: list[_Entry | _Experts] = []
            for s in group_specs:
                if s.role == "experts":
                    entries.append(_Experts(ckpt, s, torch_dtype, fmt))
                else:
                    entries.append(_Entry(s.name, load_spec(ckpt, s, torch_dtype)))
            _write_segment(_segment_name(namespace, i), entries, manifest, i)
            done += len(group_specs)
            if progress:
                progress(done, len(specs))
    except BaseException:
        unlink(manifest)
        raise
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest))
    os.chmod(tmp, 0o600)
    tmp.rename(manifest_path)  # atomic: a reader sees no manifest or a whole one
    return manifest


def _reusable(manifest_path: Path, sig: dict) -> dict | None:
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("signature") != sig:
        return None
    for seg in manifest["segments"]:
        try:
            shm = posix_ipc.SharedMemory(seg["name"])
        except posix_ipc.ExistentialError:
            return None
        ok = shm.size >= seg["size"]
        shm.close_fd()
        if not ok:
            return None
    return manifest


def read_manifest(manifest_path: str | Path) -> dict:
    path = Path(manifest_path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: no weight manifest (is the weights service running?)") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: cannot read the weight manifest ({e})") from e
    if manifest.get("version") != MANIFEST_VERSION:
        raise StoreError(f"{path}: manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    return manifest


class AttachedWeights:
    """The published weights, mapped read-only: ``weights`` is what :func:`build_model` takes."""

    def __init__(self, manifest: dict) -> None:
        self.manifest = manifest
        self.maps: list[mmap.mmap] = []
        self._pinned: set[int] = set()
        for seg in manifest["segments"]:
            try:
                shm = posix_ipc.SharedMemory(seg["name"])
            except posix_ipc.ExistentialError:
                self.close()
                raise StoreError(f"shared-memory segment {seg['name']} is gone (the weights service "
                                 "stopped or was restarted with other weights)") from None
            try:
                self.maps.append(mmap.mmap(shm.fd, seg["size"], prot=mmap.PROT_READ))
                _advise_huge(self.maps[-1])
            finally:
                shm.close_fd()
        raw = {}
        for name, t in manifest["tensors"].items():
            if "segment" in t:
                raw[name] = self._view(t)
        self.weights: dict[str, Any] = {}
        for name, t in manifest["tensors"].items():
            if "fmt" in t:
                self.weights[name] = QuantWeight(t["fmt"], raw[f"{name}#data"], raw.get(f"{name}#scale"),
                                                 tuple(t["shape"]))
            elif "#" not in name:
                self.weights[name] = raw[name]

    def _view(self, t: dict) -> torch.Tensor:
        dtype = _DTYPES[t["dtype"]]
        n = 1
        for d in t["shape"]:
            n *= d
        if n == 0:
            return torch.empty(t["shape"], dtype=dtype)
        flat = torch.frombuffer(self.maps[t["segment"]], dtype=torch.uint8, count=n * dtype.itemsize,
                                offset=t["offset"])
        return flat.view(dtype).reshape(t["shape"])

    def contains(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory lies inside one of the mapped segments (zero-copy check)."""
        p = tensor.data_ptr()
        for mm in self.maps:
            base = _address(mm)
            if base <= p < base + len(mm):
                return True
        return False

    def pin_for_cuda(self) -> None:
        """Register the mapped pages with CUDA (read-only), so that copies from them to a GPU are
        DMA without a staging copy, and without a second copy of the weights in pinned memory."""
        cudart = torch.cuda.cudart()
        read_only = 8  # cudaHostRegisterReadOnly: the mapping is PROT_READ
        for mm in self.maps:
            if id(mm) in self._pinned:
                continue
            err = cudart.cudaHostRegister(_address(mm), len(mm), read_only)
            if int(err) != 0:
                raise StoreError(f"cudaHostRegister of a {len(mm) / 2**20:.0f} MiB weight segment failed "
                                 f"(CUDA error {int(err)}); raise the memlock limit (LimitMEMLOCK=infinity)")
            self._pinned.add(id(mm))

    def build(self, device: str | torch.device = "cpu"):
        """The model over the mapped weights (CPU tensors are used in place)."""
        cfg = HFConfig.read(Path(self.manifest["model"]))
        return build_model(cfg, self.weights, device)

    def close(self) -> None:
        self.weights = {}
        for mm in self.maps:
            if id(mm) in self._pinned:
                torch.cuda.cudart().cudaHostUnregister(_address(mm))
            try:
                mm.close()
            except BufferError:  # tensors still view it; the mapping goes when they do
                pass
        self.maps = []
        self._pinned.clear()


def _address(mm: mmap.mmap) -> int:
    return torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()


def attach(manifest_path: str | Path, wait_s: float = 0.0) -> AttachedWeights:
    """Map the weights the manifest describes; wait up to ``wait_s`` for the manifest to appear."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return AttachedWeights(read_manifest(manifest_path))
        except StoreError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def unlink(manifest: dict) -> int:
    """Remove the manifest's segments (the memory is freed when the last mapping goes)."""
    n = 0
    for seg in manifest.get("segments", []):
        try:
            posix_ipc.unlink_shared_memory(seg["name"])
            n += 1
        except posix_ipc.ExistentialError:
            pass
    return n


__all__ = ["publish", "attach", "unlink", "read_manifest", "default_namespace", "AttachedWeights",
           "StoreError", "CheckpointError"]
