"""The model step both engines run: a flat batch of sequence segments through every layer, with
the KV cache, the routed experts on a pluggable backend, and an optional dual-batch overlap.

A :class:`Segment` is T new tokens of one sequence whose first ``start`` tokens are already in its
cache. The dense parts run batched over all tokens; attention runs one sequence at a time over
that sequence's cache (paged or contiguous: anything with ``write(layer, start, entries)`` and
``read(layer, length)``).

Routed experts go through an :class:`ExpertsBackend`: ``start`` begins one layer's experts for a
batch of tokens and returns a handle, ``finish`` returns their output. With ``overlap`` the batch
is split into two micro-batches and, per layer, one's experts run (on the CPU kernel pool) while
the other's attention runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import cython_kernels
from cython_kernels import api
from shared.deepseek_v3 import MLAttention
from shared.kv_cache import SequenceKV
from shared.layers import (
    LINEAR_OVERRIDE,
    CausalLM,
    DecoderLayer,
    GQAttention,
    Linear,
    MoE,
    QuantLinear,
    RMSNorm,
    RoutedExperts,
    SoftmaxTopKRouter,
    as_quant,
    dense_weight,
)


class KVStore(Protocol):
    def write(self, layer: int, start: int, entries: torch.Tensor) -> None: ...
    def read(self, layer: int, length: int) -> torch.Tensor: ...


@dataclass
class Segment:
    tokens: torch.Tensor  # [T] int64, the new tokens
    start: int  # tokens of this sequence already cached
    kv: KVStore
    all_logits: bool = False  # logits for every new token (prompt scoring), not only the last

    @property
    def end(self) -> int:
        return self.start + self.tokens.shape[0]


class ExpertsBackend(Protocol):
    def start(self, layer: int, experts: RoutedExperts, x: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor) -> Any: ...
    def finish(self, handle: Any) -> torch.Tensor: ...


class TorchExperts:
    """The pure-torch reference (dequantize each chosen expert, F.linear), on the model's device."""

    def start(self, layer, experts, x, ids, weights):
        return experts(x, ids, weights)

    def finish(self, handle):
        return handle


KVHook = Callable[[int, Segment, torch.Tensor], None]  # (layer, segment, its new entries)


class _MicroBatch:
    def __init__(self, segments: list[Segment], device: torch.device) -> None:
        self.segments = segments
        # made on the device: a host-to-device copy here would queue behind the expert streaming's
        # copies and hold the host (and so the GPU's next work) until they are done
        self.positions = torch.cat([torch.arange(s.start, s.end, device=device) for s in segments])
        self.sizes = [s.tokens.shape[0] for s in segments]
        self.x: torch.Tensor | None = None
        self.pending: tuple | None = None  # (handle, shared output or None) of a layer's experts
        self.delta: torch.Tensor | None = None  # the last block's output, not yet added to x (see _add_norm)
        self.tables: dict[int, tuple] = {}  # rotary cos/sin for these positions, by rotary module
        self.paged: _PagedStep | bool | None = None  # see ModelRunner._paged_step (False: not such a batch)


@dataclass
class _PagedStep:
    """A micro-batch of one-token steps of sequences in one paged cache (decode), as every layer's
    attention takes it: made once per step, not per layer."""

    kv: SequenceKV  # one of them: its paged(layer) gives that layer's cache
    tokens: api.PagedTokens  # each sequence's block ids, length after the step and new entry's row


def _amx() -> bool:
    from cython_kernels import _kernels

    return cython_kernels.VARIANT == "avx512_bf16" and _kernels.amx_enabled()


def kernel_linear_max_rows() -> int:
    """Up to this many rows, a CPU BF16 linear (the LM head included) goes through the kernels'
    GEMV: one read of the weight at close to the memory bandwidth. With AMX (avx512_bf16 on a CPU
    that has it) a batch of up to 16 rows costs about one row, so up to 16. Without, torch's GEMM
    is as fast beyond 2 rows (LM head 151936x2048 on 2 cores: kernel 25.9 vs torch 28.3 ms at 1
    row, 33.7 vs 29.7 ms at 4)."""
    return 16 if _amx() else 2


def kernel_quant_max_rows() -> int:
    """Up to this many rows, a CPU linear whose weight is quantized (:class:`QuantLinear`) goes
    through the kernels' GEMV (the weight read once, as stored) rather than torch's GEMM over a
    dequantized copy made for the call. With AMX the kernels stay ahead up to a few hundred rows
    (DeepSeek-V3's o_proj, 7168x16384 FP8, on the 2-core VM of the README's figures: 5.1 against
    119 ms at 16 rows, 71 against 146 at 256, 318 against 224 at 1024); without, their vector
    path computes one row at a time, so up to a call's 64."""
    return 512 if _amx() else api.MAX_TOKENS


def align_for_kernels(model: CausalLM) -> int:
    """The CPU kernels need 64-byte aligned weights; tensors read from a safetensors file are views
    at arbitrary offsets. Copy each misaligned BF16 matrix (and quantized linear weight's data)
    once (a fresh allocation is aligned); shared-memory weights are page-aligned and stay where
    they are. Returns how many were copied."""
    copies: dict[int, torch.Tensor] = {}  # a tied weight stays one tensor
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if (buf is not None and buf.device.type == "cpu" and buf.dim() == 2 and buf.data_ptr() % 64
                    and (buf.dtype == torch.bfloat16 or (isinstance(mod, QuantLinear) and name == "data"))):
                mod._buffers[name] = copies.setdefault(buf.data_ptr(), buf.contiguous().clone())
    return len(copies)


class KernelLinears:
    """The CPU kernels' GEMV for a few rows (decode), bound once to each tuple of weights it meets
    (:class:`cython_kernels.api.Gemv`: their checks are paid once, not at every call of every step).
    BF16 weights up to ``max_rows`` rows (beyond, torch's GEMM is as fast); quantized ones
    (:class:`QuantLinear`, read as stored) up to ``quant_max_rows`` (see kernel_quant_max_rows).
    It holds the weights it has bound: it belongs to one model, whose weights it serves (a few
    tuples a layer; past MAX_BOUND bindings it starts over)."""

    MAX_BOUND = 16384

    def __init__(self, max_rows: int, quant_max_rows: int | None = None) -> None:
        self.max_rows = max_rows
        self.quant_max_rows = max_rows if quant_max_rows is None else quant_max_rows
        self._bound: dict[tuple[int, ...], api.Gemv | None] = {}  # by the weights' ids (the Gemv holds them)

    def f32(self, x: torch.Tensor, ws: tuple[Linear, ...]) -> torch.Tensor | None:
        """x [..., in] against the weights ws, all in one kernel GEMV call: fp32 [rows, sum of
        their outputs], weight i's in its own column range; None where the kernels do not apply
        (too many rows, not on the CPU; weights of different formats, or that are not aligned
        contiguous BF16 or quantized matrices of x's input size). x may be bf16, or fp32 for BF16
        weights: the kernel rounds activations to bf16 (to nearest even, as ``x.to(torch.bfloat16)``
        does)."""
        key = tuple(map(id, ws))
        g = self._bound.get(key, False)
        if g is False:
            if len(self._bound) >= self.MAX_BOUND:  # (weights made per call would otherwise pile up)
                self._bound.clear()
            g = self._bound[key] = self._bind(ws)
        # (is_cpu, not device.type: a device object costs microseconds in a decode step's cold
        # caches, see cython_kernels.api._cpu_rows)
        if g is None or not x.is_cpu or x.dtype not in (torch.bfloat16, torch.float32) or x.shape[-1] != g.cols:
            return None
        rows = x.reshape(-1, g.cols)
        n, dense = rows.shape[0], g.weights[0].fmt == "dense"
        if not 0 < n <= (self.max_rows if dense else self.quant_max_rows) or not (dense or x.dtype == torch.bfloat16):
            return None  # (an fp32 model keeps torch's fp32 products, where the kernels would round x to bf16)
        return g(rows)

    @staticmethod
    def takes(w: Linear) -> bool:
        """Whether the kernels' GEMV can read ``w`` in place: an aligned contiguous CPU matrix, BF16
        or quantized (the kernels' own checks see to the rest when it is bound)."""
        d = w.data if isinstance(w, QuantLinear) else w
        return (d.device.type == "cpu" and (isinstance(w, QuantLinear) or d.dtype == torch.bfloat16)
                and d.dim() == 2 and not d.data_ptr() % 64 and d.is_contiguous())

    @classmethod
    def _bind(cls, ws: tuple[Linear, ...]) -> api.Gemv | None:
        qs = [as_quant(v) if cls.takes(v) else None for v in ws]
        if any(q is None or (q.fmt, q.shape[1]) != (qs[0].fmt, qs[0].shape[1]) for q in qs):
            return None
        return api.Gemv(qs)

    def linear(self, x: torch.Tensor, w: Linear | tuple[Linear, ...]) -> Any:
        """x W^T (for a tuple of weights, all in one call, a tuple back) for bf16 x; None declines
        (torch then): the model code's ``LINEAR_OVERRIDE``."""
        ws = w if isinstance(w, tuple) else (w,)
        y = self.f32(x, ws) if x.dtype == torch.bfloat16 else None
        if y is None:
            return None
        outs = tuple(part.reshape(*x.shape[:-1], part.shape[1])
                     for part in y.to(x.dtype).split([v.shape[0] for v in ws], dim=1))
        return outs if isinstance(w, tuple) else outs[0]


# Up to this many rows (decode batches), the residual add + RMSNorm and GQA's q/k norm + rotary
# run as the kernels' one-call decode ops instead of torch's op sequences (see decode_ops.h).
DECODE_OPS_MAX_ROWS = 64


class ModelRunner:
    def __init__(self, model: CausalLM, experts: ExpertsBackend | None = None, absorbed_mla: bool = False,
                 cpu_lm_head: bool = False) -> None:
        """``cpu_lm_head``: the LM head and the small dense linears of decode run on the CPU
        kernels' BF16 GEMV (misaligned weights are realigned once, here)."""
        self.model = model
        self.experts = experts or TorchExperts()
        self.absorbed_mla = absorbed_mla
        self.cpu_lm_head = cpu_lm_head and model.device.type == "cpu"
        self.max_kernel_rows = kernel_linear_max_rows()
        self.kernel_linears = KernelLinears(self.max_kernel_rows, kernel_quant_max_rows())
        # one-token GQA attention straight from the paged cache, where the kernels have the vector
        # path for it (their portable one is slower than torch's gather and matmuls)
        self.paged_attention = self.cpu_lm_head and cython_kernels.VARIANT in ("avx512_bf16", "avx512f")
        # the decode step's small ops in one kernel call each (decode_ops.h)
        self.decode_ops = self.cpu_lm_head
        # a GQA layer with a softmax router, up to its experts, in one kernel call (decode_layer.h)
        self.fused_layers = self.cpu_lm_head
        self._layers: dict[int, tuple[DecoderLayer, api.DecodeLayer | None]] = {}  # by id(layer)
        if self.cpu_lm_head:
            align_for_kernels(model)

    @torch.inference_mode()
    def forward(self, segments: list[Segment], overlap: bool = False, kv_hook: KVHook | None = None,
                layer_hook: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Run the segments; returns per segment fp32 logits [V] for its last token, or [T, V]
        for every new token when ``all_logits``. ``kv_hook`` sees each layer's new cache entries
        of each segment as soon as they exist; ``layer_hook(layer)`` runs before each layer."""
        token = LINEAR_OVERRIDE.set(self.kernel_linears.linear) if self.cpu_lm_head else None
        try:
            return self._forward(segments, overlap, kv_hook, layer_hook)
        finally:
            if token is not None:
                LINEAR_OVERRIDE.reset(token)

    def _forward(self, segments: list[Segment], overlap: bool, kv_hook: KVHook | None,
                 layer_hook: Callable[[int], None] | None) -> list[torch.Tensor]:
        m = self.model
        if overlap and len(segments) >= 2:
            half = _balanced_split([s.tokens.shape[0] for s in segments])
            mbs = [_MicroBatch(segments[:half], m.device), _MicroBatch(segments[half:], m.device)]
        else:
            mbs = [_MicroBatch(segments, m.device)]
        for mb in mbs:
            mb.x = F.embedding(torch.cat([s.tokens for s in mb.segments]).to(m.device), m.embed)
        for li, layer in enumerate(m.layers):
            if layer_hook is not None:
                layer_hook(li)
            for mb in mbs:  # mb's attention runs while the other's experts of this or the last layer run
                self._finish_ffn(mb)
                if not self._fused_layer(li, layer, mb, kv_hook):
                    self._attention(li, layer, mb, kv_hook)
                    self._start_ffn(li, layer, mb)
        rows, spans = [], []  # the hidden rows that need logits, read through the LM head once
        for mb in mbs:
            self._finish_ffn(mb)
            for s, hs in zip(mb.segments, self._add_norm(mb, m.norm).split(mb.sizes), strict=True):
                spans.append((sum(r.shape[0] for r in rows), hs.shape[0] if s.all_logits else 1))
                rows.append(hs if s.all_logits else hs[-1:])
        logits = self._lm_head(torch.cat(rows))
        return [logits[a : a + n] if seg.all_logits else logits[a]
                for (a, n), seg in zip(spans, [s for mb in mbs for s in mb.segments], strict=True)]

    def _lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits; the CPU kernels' BF16 GEMV when it applies (decode: a few rows on the CPU,
        one read of the LM head at close to the memory bandwidth), else torch."""
        return self._linear_f32(h, (self.model.lm_head,))

    def _decode_ops(self, x: torch.Tensor) -> bool:
        return (self.decode_ops and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and x.shape[0] <= DECODE_OPS_MAX_ROWS)

    def _add_norm(self, mb: _MicroBatch, norm: RMSNorm) -> torch.Tensor:
        """Adds the last block's output (mb.delta) to the residual stream mb.x and returns norm of
        it: the two in one kernel call for decode's few rows."""
        x, delta = mb.x, mb.delta  # (delta may be a block's fp32 sums: rounded to x's dtype, then added)
        mb.delta = None
        if self._decode_ops(x):
            mb.x, h = api.add_rms_norm(x, delta, norm.weight, norm.eps)
            return h
        mb.x = x if delta is None else x + delta.to(x.dtype)
        return norm(mb.x)

    def _fused_qk(self, attn: nn.Module, h: torch.Tensor) -> bool:
        """Whether GQA's projection takes one GEMV and one qk_norm_rope call (see _project)."""
        return isinstance(attn, GQAttention) and self._decode_ops(h) and _qk_kernel_fits(attn)

    def _project(self, attn: nn.Module, h: torch.Tensor, mb: _MicroBatch,
                 step: _PagedStep | None = None, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """attn.project(h, mb.positions); for GQA and decode's few rows (_fused_qk) the linears in
        one kernel GEMV and the q/k norm + rotary in one kernel call, with the rotary tables made
        once per step. With ``step``, the new entries go straight into the layer's paged ``cache``
        (at its tokens' rows) and the second result is that cache."""
        if not self._fused_qk(attn, h):
            return attn.project(h, mb.positions)
        y = self._linear_f32(h, (attn.q_proj, attn.k_proj, attn.v_proj))
        cos, sin = _rotary_tables(mb, attn.rotary, h.dtype)
        norms = {} if attn.q_norm is None else {"q_weight": attn.q_norm.weight, "k_weight": attn.k_norm.weight,
                                                 "eps": attn.q_norm.eps}
        if step is not None:
            norms |= {"kv_out": cache, "kv_rows": step.tokens.rows}
        return api.qk_norm_rope(y, attn.heads, attn.kv_heads, attn.head_dim, cos, sin, h.dtype,
                                interleaved=attn.rotary.interleaved, **norms)

    def _paged_step(self, mb: _MicroBatch) -> _PagedStep | None:
        """The micro-batch as a _PagedStep when it is one (every segment one new token of a
        sequence in the same paged cache, of the model's dtype, on the CPU, with the kernels'
        paged attention on), else None; decided and made once per step."""
        if mb.paged is None:
            segs, mb.paged = mb.segments, False
            if (self.paged_attention and all(n == 1 for n in mb.sizes)
                    and all(isinstance(s.kv, SequenceKV) and s.kv.cache is segs[0].kv.cache for s in segs)
                    and segs[0].kv.cache.dtype == mb.x.dtype and mb.x.device.type == "cpu"):
                rows = torch.tensor([s.kv.slot(s.start) for s in segs], dtype=torch.int64)
                mb.paged = _PagedStep(segs[0].kv, api.PagedTokens(
                    [s.kv.paged(0)[1] for s in segs], [s.end for s in segs], segs[0].kv.cache.block_size, rows))
        return mb.paged or None

    def _fused_layer(self, li: int, layer: DecoderLayer, mb: _MicroBatch, kv_hook: KVHook | None) -> bool:
        """For a decode step (a _PagedStep of at most max_kernel_rows tokens) through a GQA layer
        with a softmax-routed MoE: attention, the post-attention norm and the routing in one kernel
        call (api.DecodeLayer: the same kernels, in the same order, as _attention and _start_ffn's
        decode path), then the experts started. False (nothing done) where it does not apply."""
        if not self.fused_layers or kv_hook is not None or mb.x.shape[0] > self.max_kernel_rows:
            return False
        step = self._paged_step(mb)
        bound = self._bound_layer(layer, mb.x.dtype) if step is not None else None
        if bound is None:
            return False
        tables = _rotary_tables(mb, layer.attn.rotary, mb.x.dtype)
        mb.x, h, ids, weights = bound(mb.x, mb.delta, *tables, step.kv.paged(li)[0], step.tokens)
        mb.delta = None
        self._start_experts(li, layer.ffn, mb, h, ids, weights)
        return True

    def _bound_layer(self, layer: DecoderLayer, dtype: torch.dtype) -> api.DecodeLayer | None:
        """The layer bound for _fused_layer once (None where it does not apply: another attention
        or router, a rotary in pairs of other than half the head, weights the kernels' GEMV does not
        take)."""
        hit = self._layers.get(id(layer))
        if hit is None:
            hit = self._layers[id(layer)] = (layer, self._bind_layer(layer, dtype))
        return hit[1]

    def _bind_layer(self, layer: DecoderLayer, dtype: torch.dtype) -> api.DecodeLayer | None:
        attn, ffn = layer.attn, layer.ffn
        if not (type(attn) is GQAttention and isinstance(ffn, MoE) and type(ffn.router) is SoftmaxTopKRouter
                and _qk_kernel_fits(attn) and self.model.device.type == "cpu"
                and dtype in (torch.float32, torch.bfloat16)):
            return None
        ws = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, ffn.router.weight)
        if not all(KernelLinears.takes(w) for w in ws) or len({as_quant(w).fmt for w in ws[:3]}) != 1:
            return None
        norms = {} if attn.q_norm is None else {"q_norm": attn.q_norm.weight, "k_norm": attn.k_norm.weight,
                                                 "qk_eps": attn.q_norm.eps}
        return api.DecodeLayer(*(as_quant(w) for w in ws), layer.input_norm.weight, layer.input_norm.eps,
                               layer.post_norm.weight, layer.post_norm.eps, heads=attn.heads,
                               kv_heads=attn.kv_heads, head_dim=attn.head_dim, top_k=ffn.router.top_k,
                               norm_topk=ffn.router.norm_topk_prob, dtype=dtype, interleaved=attn.rotary.interleaved,
                               **norms)

    def _route(self, router: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """router(h); a softmax router's linear, softmax and top-k for decode's few rows in one
        kernel GEMV and one kernel call."""
        if not (type(router) is SoftmaxTopKRouter and self._decode_ops(h)):
            return router(h)
        y = self._linear_f32(h, (router.weight,))
        return api.softmax_topk(y, router.top_k, router.norm_topk_prob, h.dtype)

    def _linear_f32(self, h: torch.Tensor, ws: tuple[Linear, ...]) -> torch.Tensor:
        """fp32 [rows, sum of outputs] of h against ws: one kernel GEMV where it applies, else
        torch (whose outputs, rounded to h's dtype, the decode ops round again to no effect)."""
        y = self.kernel_linears.f32(h, ws) if self.cpu_lm_head else None
        if y is None:
            ys = [F.linear(h.to(d.dtype), d) for d in (dense_weight(w, h.dtype) for w in ws)]
            y = (ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)).float()
        return y

    def _attention(self, li: int, layer: DecoderLayer, mb: _MicroBatch, kv_hook: KVHook | None) -> None:
        attn = layer.attn
        h = self._add_norm(mb, layer.input_norm)
        step = self._paged_step(mb) if kv_hook is None and self._fused_qk(attn, h) else None
        if step is not None:  # decode: new entries straight into the paged cache, attention read there
            cache, t = step.kv.paged(li)[0], step.tokens
            q, _ = self._project(attn, h, mb, step, cache)
            o = attn.attend_paged(q, cache, t.blocks, t.block_size, t.lengths)
        else:
            o = self._attend_segments(li, attn, h, mb, kv_hook)
        if isinstance(attn, GQAttention) and self._decode_ops(o):  # its fp32 sums: _add_norm rounds them
            mb.delta = self._linear_f32(o, (attn.o_proj,))
        else:
            mb.delta = attn.output(o)

    def _attend_segments(self, li: int, attn: nn.Module, h: torch.Tensor, mb: _MicroBatch,
                         kv_hook: KVHook | None) -> torch.Tensor:
        """Attention's output for any batch: each segment's entries written to its cache (and shown
        to kv_hook), then its attention over that cache; one-token segments of a paged cache read
        it in place, one kernel call per cache."""
        q, entries = self._project(attn, h, mb)
        kwargs = {"absorbed": True} if self.absorbed_mla and isinstance(attn, MLAttention) else {}
        outs: list[torch.Tensor | None] = []
        paged: dict[int, list] = {}  # one-token segments by cache: one kernel call for each cache
        for s, qs, es in zip(mb.segments, q.split(mb.sizes), entries.split(mb.sizes), strict=True):
            s.kv.write(li, s.start, es)
            if kv_hook is not None:
                kv_hook(li, s, es)
            if self.paged_attention and qs.shape[0] == 1 and isinstance(attn, GQAttention) and hasattr(s.kv, "paged"):
                cache, blocks, block_size = s.kv.paged(li)
                paged.setdefault(cache.data_ptr(), [cache, block_size, []])[2].append((len(outs), qs, blocks, s.end))
                outs.append(None)
            else:
                outs.append(attn.attend(qs, s.kv.read(li, s.end), **kwargs))
        for cache, block_size, seqs in paged.values():
            blocks, lengths = [b for _, _, b, _ in seqs], [n for _, _, _, n in seqs]
            if len(seqs) == len(outs):  # every segment: q's rows in order, o whole
                return attn.attend_paged(q, cache, blocks, block_size, lengths)
            op = attn.attend_paged(torch.cat([qs for _, qs, _, _ in seqs]), cache, blocks, block_size, lengths)
            for (i, *_), oi in zip(seqs, op.split(1), strict=True):
                outs[i] = oi
        return torch.cat(outs)

    def _start_ffn(self, li: int, layer: DecoderLayer, mb: _MicroBatch) -> None:
        h = self._add_norm(mb, layer.post_norm)
        if not isinstance(layer.ffn, MoE):
            mb.delta = layer.ffn(h)
            return
        self._start_experts(li, layer.ffn, mb, h, *self._route(layer.ffn.router, h))

    def _start_experts(self, li: int, ffn: MoE, mb: _MicroBatch, h: torch.Tensor, ids: torch.Tensor,
                       weights: torch.Tensor) -> None:
        handle = self.experts.start(li, ffn.experts, h, ids, weights)
        mb.pending = (handle, ffn.shared(h) if ffn.shared is not None else None)

    def _finish_ffn(self, mb: _MicroBatch) -> None:
        if mb.pending is None:
            return
        handle, shared = mb.pending
        mb.pending = None
        y = self.experts.finish(handle)  # fp32, rounded to x's dtype by _add_norm or here
        mb.delta = y if shared is None else y.to(mb.x.dtype) + shared


def _rotary_tables(mb: _MicroBatch, rotary: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the micro-batch's positions for ``rotary``, made once per step."""
    tables = mb.tables.get(id(rotary))
    if tables is None:
        tables = mb.tables[id(rotary)] = rotary.cos_sin(mb.positions, dtype)
    return tables


def _qk_kernel_fits(attn: GQAttention) -> bool:
    """Whether the kernels' q/k norm + rotary takes this attention's heads (halves of the head)."""
    return 2 * attn.rotary.inv_freq.shape[0] == attn.head_dim <= api.QK_MAX_HEAD_DIM


def _balanced_split(sizes: list[int]) -> int:
    """The index that splits ``sizes`` into two non-empty runs of nearly equal total."""
    total, acc, best, best_gap = sum(sizes), 0, 1, None
    for i in range(1, len(sizes)):
        acc += sizes[i - 1]
        gap = abs(total - 2 * acc)
        if best_gap is None or gap < best_gap:
            best, best_gap = i, gap
    return best
