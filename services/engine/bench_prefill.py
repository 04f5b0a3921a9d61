"""``hybridmoe bench prefill``: stream-loading prefill on a real-shaped checkpoint.

Measured in one run, on the prefill device (a GPU by default, the CPU when there is none):

- the pinned host-to-device copy bandwidth: one plain copy of up to 1 GiB of page-locked memory,
  timed with CUDA events (the ceiling the expert streaming can reach);
- for each chunk size, a prefill of the same prompt three ways: as served (copies overlapping
  compute), compute alone (the copies skipped: the staging slots keep stale weights, so only the
  time means anything) and copies alone (the stream plan run with no compute). Overlap works when
  the first is close to the larger of the other two, not to their sum;
- from the served run's CUDA events: each expert copy's bandwidth, and each layer's time, dense
  and MoE layers apart, which projects the prefill speed of the full-depth model (e.g.
  DeepSeek-V3's 3 dense + 58 MoE layers) from a checkpoint of a few real-shaped layers. A MoE
  layer counts at least its own copies' time there: in a short checkpoint the first MoE layer's
  copies hide behind the dense layers, which a deep model cannot repeat.

On the CPU nothing is copied (the staging slots are the host weights), so only the served run
and the layer times are reported.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import torch

from services.engine.bench import bench_model_path
from services.engine.prefill import PrefillEngine
from shared.layers import MoE
from shared.make_model import preset_config
from shared.model import load_model


class _Clock:
    """Marks on the device's timeline: CUDA events on a GPU, the host clock (after the work is
    done, since the CPU runs it in line) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Time from each mark to the next."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def pinned_copy_gbps(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Host-to-device bandwidth of one copy of ``nbytes`` of page-locked memory (median)."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    src.fill_(0x5A)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        torch.cuda.synchronize(device)
        times.append(a.elapsed_time(b) / 1e3)
    assert torch.equal(dst[:4096].cpu(), src[:4096])
    del src, dst
    return nbytes / statistics.median(times) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn) -> float:
    """Seconds of ``fn()`` with the device's queued work done before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _served(eng: PrefillEngine, ids: torch.Tensor, dense: set[int]) -> dict:
    """One prefill as served; wall time, and per-layer time from marks before each layer."""
    clock = _Clock(eng.device)
    layer_of: list[int] = []
    host: list[float] = []  # when the host reached each mark (a host blocked by the GPU shows here)

    def hook(layer: int) -> None:
        if layer == 0 and layer_of:  # a chunk's end: the LM head of its last token and the next embedding
            layer_of.append(-1)
            host.append(time.perf_counter())
            clock.mark()
        layer_of.append(layer)
        host.append(time.perf_counter())
        clock.mark()

    _sync(eng.device)
    t0 = time.perf_counter()
    ref = _Clock(eng.device)
    ref.mark()
    eng.prefill(ids, layer_hook=hook)
    clock.mark()
    _sync(eng.device)
    wall = time.perf_counter() - t0
    spans = clock.seconds()
    timeline = []
    if clock.cuda:  # (what, layer, GPU ms, host ms) from the start, for reading the overlap
        r0 = ref.marks[0]
        timeline = [("layer", li, r0.elapsed_time(m), (h - t0) * 1e3)
                    for li, m, h in zip(layer_of, clock.marks, host, strict=False)]
        if eng.streamer is not None:
            timeline += [(k, li, r0.elapsed_time(e), None) for k, li, e in eng.streamer.cuda_events]
        timeline.sort(key=lambda t: t[2])
    dense_t = [t for li, t in zip(layer_of, spans, strict=True) if li in dense]
    moe_t = [t for li, t in zip(layer_of, spans, strict=True) if li >= 0 and li not in dense]
    n_moe = len({li for li in layer_of if li >= 0} - dense)
    # one layer's time over the whole prompt (all its chunks)
    out = {"seconds": wall, "tok_s": ids.shape[0] / wall,
           "dense_layer_s": sum(dense_t) / max(len(dense), 1), "moe_layer_s": sum(moe_t) / max(n_moe, 1),
           "timeline": timeline}
    s = eng.streamer
    if s is not None and s.cuda:
        ev = s.cuda_times()
        copies = [ev[i + 1][2] - ev[i][2] for i, (k, _, _) in enumerate(ev) if k == "copy_start"
                  and ev[i + 1][0] == "copy_end"]
        if copies:
            out["copy_s_median"] = statistics.median(copies) / 1e3
            out["h2d_gbps_streaming"] = s.layer_bytes / out["copy_s_median"] / 1e9
    return out


def _compute_alone(eng: PrefillEngine, ids: torch.Tensor) -> float:
    eng.streamer.dry = True
    try:
        return _timed(eng.device, lambda: eng.prefill(ids))
    finally:
        eng.streamer.dry = False


def _copies_alone(eng: PrefillEngine, passes: int) -> float:
    s = eng.streamer

    def stream() -> None:
        s.begin(passes)
        for layer in list(s.schedule):
            s.acquire(layer)
            s.release(layer)
    return _timed(eng.device, stream)


def run(preset: str | None = None, layers: int | None = None, quant: str = "fp8", model_path: str | None = None,
        prompt_len: int | None = None, chunks: tuple[int, ...] | None = None, device: str = "auto",
        json_path: str | None = None) -> dict:
    """Defaults by device: on a GPU DeepSeek-V3 with 5 layers (3 dense, 2 MoE: 26.5 GiB), chunks
    of 4096 and 16384; on the CPU Qwen3-30B-A3B with 4 layers and one chunk of 256."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    preset = preset or ("deepseek-v3" if cuda else "qwen3-30b-a3b")
    layers = layers or (5 if cuda else 4)
    chunks = tuple(chunks or ((4096, 16384) if cuda else (256,)))
    prompt_len = prompt_len or max(chunks)
    path = Path(model_path) if model_path else bench_model_path(preset, layers, quant, device=dev.type)
    t0 = time.perf_counter()
    model = load_model(path)
    dense = {i for i, layer in enumerate(model.layers) if not isinstance(layer.ffn, MoE)}
    n_layers = len(model.layers)
    eng = PrefillEngine(model, dev, chunk_size=max(chunks))
    print(f"model {path}: {n_layers} layers ({len(dense)} dense); on {dev} in {time.perf_counter() - t0:.1f} s")
    report: dict = {"model": str(path), "device": str(dev), "prompt_len": prompt_len, "layers": n_layers,
                    "dense_layers": len(dense), "runs": []}
    if cuda:
        report["gpu"] = torch.cuda.get_device_name(dev)
        s = eng.streamer
        report["expert_bytes_per_layer"] = s.layer_bytes if s else 0
        report["staging_depth"] = s.depth if s else 0
        report["pinned_h2d_gbps"] = pinned_copy_gbps(min(s.layer_bytes if s else 1 << 30, 1 << 30), dev)
        print(f"{report['gpu']}: pinned host-to-device copy {report['pinned_h2d_gbps']:.1f} GB/s; "
              f"{report['expert_bytes_per_layer'] / 1e9:.2f} GB of experts per MoE layer, "
              f"{report['staging_depth']} staging slots")
    full = _full_depth(preset) if not model_path else None
    ids = torch.randint(0, model.embed.shape[0], (prompt_len,), generator=torch.Generator().manual_seed(0))
    for chunk in chunks:
        eng.chunk_size = chunk
        if eng.streamer is not None and cuda:  # warm-up at full size: kernels chosen, memory pools grown
            _compute_alone(eng, ids)
        else:
            eng.prefill(ids[: min(chunk, 256)])
        r = {"chunk": chunk, **_served(eng, ids, dense)}
        timeline = r["timeline"]
        passes = -(-prompt_len // chunk)
        if cuda and eng.streamer is not None:
            r["compute_alone_s"] = _compute_alone(eng, ids)
            r["copies_alone_s"] = _copies_alone(eng, passes)
            r["overlap_vs_max"] = r["seconds"] / max(r["compute_alone_s"], r["copies_alone_s"])
            r["overlap_vs_sum"] = r["seconds"] / (r["compute_alone_s"] + r["copies_alone_s"])
        # In a deep model every MoE layer waits for its own copies (the first one's hide behind the
        # dense layers here), so a layer's steady time is at least its passes' copy time.
        r["moe_layer_steady_s"] = max(r["moe_layer_s"], passes * r.get("copy_s_median", 0.0))
        r["tok_s_per_moe_layer"] = prompt_len / r["moe_layer_steady_s"] if r["moe_layer_steady_s"] else None
        if full:
            r["projected_full_model_tok_s"] = prompt_len / (full[0] * r["dense_layer_s"]
                                                            + full[1] * r["moe_layer_steady_s"])
        report["runs"].append(r)
        print(f"chunk {chunk:6d}: {prompt_len} tokens in {r['seconds']:.2f} s = {r['tok_s']:.0f} tok/s; per layer "
              f"dense {r['dense_layer_s'] * 1e3:.1f} ms, MoE {r['moe_layer_s'] * 1e3:.1f} ms, steady "
              f"{r['moe_layer_steady_s'] * 1e3:.1f} ms ({r['tok_s_per_moe_layer'] or 0:.0f} tok/s per MoE layer)")
        if "compute_alone_s" in r:
            print(f"    compute alone {r['compute_alone_s']:.2f} s, copies alone {r['copies_alone_s']:.2f} s: "
                  f"served/max {r['overlap_vs_max']:.2f}, served/sum {r['overlap_vs_sum']:.2f}; streaming H2D "
                  f"{r.get('h2d_gbps_streaming', 0):.1f} GB/s")
        if full:
            print(f"    projected {full[0]} dense + {full[1]} MoE layers: {r['projected_full_model_tok_s']:.0f} tok/s")
        if timeline and chunk == chunks[-1]:
            print("    timeline (ms from the start; GPU, and for layers the host's): " + "; ".join(
                f"{k} {li} {g:.0f}" + (f"/{h:.0f}" if h is not None else "") for k, li, g, h in r["timeline"]))
        gc.collect()
    eng.close()
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _full_depth(preset: str) -> tuple[int, int] | None:
    """(dense, MoE) layers of the preset at its full depth."""
    try:
        cfg, _ = preset_config(preset)
    except ValueError:
        return None
    n = cfg["num_hidden_layers"]
    dense = cfg.get("first_k_dense_replace", 0) + len(cfg.get("mlp_only_layers", []))
    return dense, n - dense
