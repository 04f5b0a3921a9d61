"""The checked Python API over the C kernels.

Every call checks dtypes, shapes, contiguity, alignment and expert ids and raises a clear
``ValueError`` before any pointer reaches C. Weights are :class:`shared.quant.QuantWeight` in the
canonical layout: ``dense`` (bfloat16), ``fp8_b128`` or ``int4_g32``/``int4_g128``, row-major
``[out, in]`` (``[E, out, in]`` for a layer's experts), 64-byte aligned.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

import cython_kernels
from cython_kernels import _kernels
from shared.quant import QuantWeight, fp8_scale_shape, int4_group

ALIGN = 64
MAX_TOKENS = 64  # the kernels' token segment (GEMV and MoE calls take any number, in segments of this many)
# The most scratch memory one C MoE call asks for: DeepSeek-V3's experts take 609 tokens of top-8
# a call within it (about 19 an expert), Qwen3-30B-A3B's 1872.
MOE_SCRATCH_BYTES = 256 << 20
_FMT = {"dense": 0, "fp8_b128": 1, "int4_g32": 2, "int4_g128": 2}
_DATA_DTYPE = {"dense": torch.bfloat16, "fp8_b128": torch.float8_e4m3fn, "int4_g32": torch.uint8,
               "int4_g128": torch.uint8}


def default_threads() -> int:
    return len(os.sched_getaffinity(0))


_SUPPORTED = frozenset(cython_kernels.supported_variants())  # (CPUID's answer does not change)


def _variant_code(variant: str | None) -> int:
    variant = variant or cython_kernels.VARIANT
    if variant not in _SUPPORTED:
        raise ValueError(f"kernel variant {variant!r} is not supported here; this CPU runs "
                         f"{cython_kernels.supported_variants()}")
    return _kernels.VARIANT_CODES[variant]


def _check_weight(w: QuantWeight, what: str, stacked: bool) -> tuple:
    """The weight as the C struct's tuple (fmt, group, rows, cols, data, scale) after checks."""
    if not isinstance(w, QuantWeight):
        raise ValueError(f"{what}: expected a QuantWeight, got {type(w).__name__}")
    if w.fmt not in _FMT:
        raise ValueError(f"{what}: format {w.fmt!r} has no CPU kernel")
    want = 3 if stacked else 2
    if len(w.shape) != want:
        raise ValueError(f"{what}: expected a {'stacked [E, out, in]' if stacked else '[out, in]'} weight, "
                         f"got shape {list(w.shape)}")
    *lead, rows, cols = w.shape
    d = w.data
    if d.device.type != "cpu":
        raise ValueError(f"{what}: weights must be in CPU memory, not on {d.device}")
    if d.dtype != _DATA_DTYPE[w.fmt]:
        raise ValueError(f"{what}: {w.fmt} data must be {_DATA_DTYPE[w.fmt]}, got {d.dtype}")
    packed_cols = cols // 2 if w.fmt.startswith("int4") else cols
    if tuple(d.shape) != (*lead, rows, packed_cols):
        raise ValueError(f"{what}: data shape {list(d.shape)} does not match {w.fmt} of {list(w.shape)}")
    if not d.is_contiguous():
        raise ValueError(f"{what}: weight data must be contiguous (row-major)")
    if d.data_ptr() % ALIGN:
        raise ValueError(f"{what}: weight data must be {ALIGN}-byte aligned (address {d.data_ptr():#x})")
    group, scale_ptr = 0, 0
    if w.fmt == "fp8_b128":
        _check_scale(w.scale, (*lead, *fp8_scale_shape(rows, cols)), torch.float32, what)
        scale_ptr = w.scale.data_ptr()
    elif w.fmt.startswith("int4"):
        group = int4_group(w.fmt)
        if cols % group:
            raise ValueError(f"{what}: input size {cols} is not a multiple of the INT4 group {group}")
        _check_scale(w.scale, (*lead, rows, cols // group), torch.bfloat16, what)
        scale_ptr = w.scale.data_ptr()
    return (_FMT[w.fmt], group, rows, cols, d.data_ptr(), scale_ptr)


def _check_scale(s: torch.Tensor | None, shape: tuple, dtype: torch.dtype, what: str) -> None:
    if s is None or tuple(s.shape) != tuple(shape) or s.dtype != dtype:
        got = None if s is None else f"{s.dtype} {list(s.shape)}"
        raise ValueError(f"{what}: scales must be {dtype} {list(shape)}, got {got}")
    if not s.is_contiguous() or s.device.type != "cpu":
        raise ValueError(f"{what}: scales must be contiguous CPU memory")


def _cpu_rows(t: torch.Tensor, cols: int, dtype: torch.dtype) -> int:
    """t's row count if it is a CPU [rows >= 1, cols] tensor of ``dtype``, else 0, in three tensor
    attributes. A decode step's calls run right after kernels that streamed megabytes through the
    caches, where each torch call costs microseconds: a 16 x 7168 FP8 GEMV called right after a
    64 MB read took 38-50 us with the former checks (``x.float().contiguous()``, ``device.type``,
    a ``torch.empty`` for the prepared activations, which now go in the C side's arena), 24-29 us
    with these, 19-23 us for the C call alone (warm: 14.0, 11.5, 10.2)."""
    shape = t.shape
    return shape[0] if (t.dtype is dtype and len(shape) == 2 and shape[1] == cols and shape[0] >= 1
                        and t.is_cpu) else 0


def _is_f32_matrix(t: torch.Tensor, cols: int, rows: int | None = None) -> bool:
    """Whether t is a contiguous CPU float32 [rows, cols] tensor (any rows >= 1 where None)."""
    n = _cpu_rows(t, cols, torch.float32)
    return n > 0 and (rows is None or n == rows) and t.is_contiguous()


def _activations(x: torch.Tensor, cols: int, what: str, max_tokens: int | None = MAX_TOKENS) -> torch.Tensor:
    """x [T, cols] (or [cols]) fp32/bf16 -> a contiguous fp32 [T, cols] tensor; 1 to ``max_tokens``
    rows (None: any number).

    A well-formed 2-D CPU x, decode's usual case, is checked with the fewest tensor attributes
    (an fp32 contiguous one handed back as it is, a bf16 one widened in one call): each torch call
    costs microseconds when a kernel that streamed megabytes has just evicted the interpreter's
    working set (see :func:`_cpu_rows`). Anything else takes the full checks below."""
    n = _cpu_rows(x, cols, x.dtype) if x.dtype in (torch.float32, torch.bfloat16) else 0
    if n and (max_tokens is None or n <= max_tokens):
        if x.dtype is torch.float32:  # (to() with the same dtype hands back x, strides and all)
            return x.contiguous()
        return x.to(torch.float32, memory_format=torch.contiguous_format)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2 or x.shape[1] != cols:
        raise ValueError(f"{what}: activations must be [tokens, {cols}], got {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{what}: activations must be float32 or bfloat16, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"{what}: activations must be on the CPU, not {x.device}")
    if x.shape[0] < 1 or (max_tokens is not None and x.shape[0] > max_tokens):
        raise ValueError(f"{what}: 1 to {max_tokens or 'any number of'} tokens per call, got {x.shape[0]}")
    return x.float().contiguous()


def gemv(x: torch.Tensor, w: QuantWeight, out: torch.Tensor | None = None, *, variant: str | None = None,
         threads: int | None = None) -> torch.Tensor:
    """y = x @ W^T for x [T, in] and W [out, in]: returns y [T, out] float32.

    The weights are read from memory once whatever T (past 64 tokens each tile of rows goes
    through the tokens 64 at a time while it is in cache); activations are rounded to bf16 for
    the products (at one token on avx512_bf16: FP8 with AVX512-FP16, times the block scales, to
    fp16; BF16 not at all), sums are fp32.
    """
    return Gemv([w], what="gemv", variant=variant, threads=threads)(x, out)


def gemv_multi(x: torch.Tensor, ws: list[QuantWeight] | tuple[QuantWeight, ...], *, variant: str | None = None,
               threads: int | None = None) -> torch.Tensor:
    """``gemv`` of several weights (1 to 16, one format and input size) against the same x in one
    call: returns [T, sum of their rows] float32, weight i's outputs in its own column range. The
    activations are prepared once and the threads forked once (decode's q, k and v)."""
    return Gemv(ws, what="gemv_multi", variant=variant, threads=threads)(x)


class Gemv:
    """:func:`gemv_multi` bound to its weights, which are checked once, here: a call checks only
    its activations. For a caller that runs the same weights again and again (a decode step's
    linears: the weights' checks cost as much as a small GEMV's Python). It holds the weights, so
    what it points C at stays alive; ``variant`` and ``threads`` left None are read at each call."""

    def __init__(self, ws: list[QuantWeight] | tuple[QuantWeight, ...], *, what: str = "gemv_multi",
                 variant: str | None = None, threads: int | None = None) -> None:
        if not isinstance(ws, (list, tuple)) or not 1 <= len(ws) <= 16:
            raise ValueError(f"{what}: expected a list of 1 to 16 weights, got {type(ws).__name__}")
        self.what, self.weights = what, tuple(ws)
        self._wts = [_check_weight(w, f"{what} weight" + (f" {i}" if len(ws) > 1 else ""), stacked=False)
                     for i, w in enumerate(ws)]
        if len({(w.fmt, w.shape[1]) for w in ws}) != 1:
            raise ValueError(f"{what}: the weights differ in format or input size: "
                             f"{[(w.fmt, list(w.shape)) for w in ws]}")
        self.cols, self.rows = ws[0].shape[1], sum(w.shape[0] for w in ws)
        if variant is not None:
            _variant_code(variant)
        self.variant, self.threads = variant, threads

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """y [T, rows] float32 for x [T, cols] (or [cols]) float32 or bfloat16, any T >= 1."""
        code = _variant_code(self.variant)
        xf = _activations(x, self.cols, self.what, max_tokens=None)
        T = xf.shape[0]
        if out is None:
            out = torch.empty(T, self.rows, dtype=torch.float32)
        elif not _is_f32_matrix(out, self.rows, T):
            raise ValueError(f"{self.what}: out must be a contiguous CPU float32 [{T}, {self.rows}] tensor")
        _kernels.gemv_multi(code, self._wts, xf.data_ptr(), T, out.data_ptr(), 0, self.threads or default_threads())
        return out


def _check_block_tables(what: str, blocks: list, lengths: list[int], block_size: int, min_length: int) -> None:
    """Each sequence's block ids: a contiguous CPU int64 vector covering its length. (Their values
    are checked by the kernels against the cache's rows before they read: no torch op per
    sequence in decode's path.)"""
    if block_size < 1 or min(lengths) < min_length:
        raise ValueError(f"{what}: block_size must be >= 1 and lengths >= {min_length}, got {block_size}, {lengths}")
    for b, length in zip(blocks, lengths, strict=True):
        nb = -(-length // block_size)
        if not isinstance(b, torch.Tensor) or b.dim() != 1 or b.dtype != torch.int64 or b.device.type != "cpu" \
                or not b.is_contiguous() or b.shape[0] < nb:
            got = f"{b.dtype} {list(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"{what}: blocks must be a contiguous CPU int64 vector of at least {nb} ids "
                             f"(length {length}, block_size {block_size}), got {got}")


def _attention_vector_path(code: int, dk: int, dv: int) -> bool:
    """Whether decode attention takes the AVX-512 item (its heads in whole vectors)."""
    return code in (_kernels.VARIANT_CODES["avx512_bf16"], _kernels.VARIANT_CODES["avx512f"]) \
        and dk % 16 == 0 and dv % 16 == 0


def decode_attention(q: torch.Tensor, cache: torch.Tensor, blocks: torch.Tensor, block_size: int, length: int, *,
                     kv_heads: int, k_off: int, k_head: int, v_off: int, v_head: int, dv: int, scale: float,
                     variant: str | None = None, threads: int | None = None) -> torch.Tensor:
    """One new token's attention over a sequence's cached positions, read in place from a paged
    cache: returns [heads, dv] float32.

    ``q`` [heads, dk] (float32 or bfloat16); ``cache`` [rows, width] (float32 or bfloat16,
    contiguous): position p is row ``blocks[p // block_size] * block_size + p % block_size``.
    Query head h reads kv head ``j = h // (heads // kv_heads)``, whose key is ``dk`` elements at
    ``k_off + j * k_head`` of the entry and whose value ``dv`` elements at ``v_off + j * v_head``.
    Scores, softmax and sums are fp32 whatever the cache's dtype. The AVX-512 variants take the
    vector path when dk and dv are multiples of 16; every other case the portable one."""
    if q.dim() != 2:
        raise ValueError(f"decode_attention: q must be a CPU float32/bfloat16 [heads, dk] tensor, got "
                         f"{q.dtype} {list(q.shape)} on {q.device}")
    return decode_attention_batch(q[None], cache, [blocks], block_size, [length], kv_heads=kv_heads, k_off=k_off,
                                  k_head=k_head, v_off=v_off, v_head=v_head, dv=dv, scale=scale, variant=variant,
                                  threads=threads)[0]


def decode_attention_batch(q: torch.Tensor, cache: torch.Tensor, blocks: list[torch.Tensor], block_size: int,
                           lengths: list[int], *, kv_heads: int, k_off: int, k_head: int, v_off: int, v_head: int,
                           dv: int, scale: float, variant: str | None = None,
                           threads: int | None = None) -> torch.Tensor:
    """:func:`decode_attention` for n sequences of one cache in one call (decode's one-token steps
    of a layer): ``q`` [n, heads, dk], ``blocks`` and ``lengths`` one per sequence; returns
    [n, heads, dv] float32. One fork of the threads for all of them, items spread over every
    sequence's positions."""
    code = _variant_code(variant)
    if q.dim() != 3 or q.dtype not in (torch.float32, torch.bfloat16) or q.device.type != "cpu":
        raise ValueError(f"decode_attention: q must be a CPU float32/bfloat16 [sequences, heads, dk] tensor, got "
                         f"{q.dtype} {list(q.shape)} on {q.device}")
    n, heads, dk = q.shape
    if n < 1 or len(blocks) != n or len(lengths) != n:
        raise ValueError(f"decode_attention: {n} queries need as many block tables and lengths, got "
                         f"{len(blocks)} and {len(lengths)}")
    if cache.dim() != 2 or cache.dtype not in (torch.float32, torch.bfloat16) or cache.device.type != "cpu" \
            or not cache.is_contiguous():
        raise ValueError(f"decode_attention: cache must be a contiguous CPU float32/bfloat16 [rows, width] tensor, "
                         f"got {cache.dtype} {list(cache.shape)} on {cache.device}")
    rows, width = cache.shape
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"decode_attention: {heads} query heads do not split over {kv_heads} kv heads")
    if dv < 1 or dk < 1 or min(k_off, v_off, k_head, v_head) < 0 \
            or k_off + (kv_heads - 1) * k_head + dk > width or v_off + (kv_heads - 1) * v_head + dv > width:
        raise ValueError(f"decode_attention: keys ({dk} at {k_off} + j * {k_head}) or values ({dv} at {v_off} + "
                         f"j * {v_head}) of {kv_heads} kv heads overrun entries of {width}")
    _check_block_tables("decode_attention", blocks, lengths, block_size, 0)
    qf = q.float().contiguous()
    out = torch.empty(n, heads, dv, dtype=torch.float32)
    avx512 = _attention_vector_path(code, dk, dv)
    _kernels.decode_attention(cache.data_ptr(), cache.dtype == torch.bfloat16, rows, width,
                              [b.data_ptr() for b in blocks], block_size, [int(x) for x in lengths], heads, kv_heads,
                              dk, dv, k_off, k_head, v_off, v_head, scale, qf.data_ptr(), out.data_ptr(), avx512,
                              threads or default_threads())
    return out


_GLUE_DTYPES = (torch.float32, torch.bfloat16)
QK_MAX_HEAD_DIM = 1024


def _check_rows(t: torch.Tensor, what: str, shape: tuple | None = None, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype not in _GLUE_DTYPES \
            or not t.is_contiguous() or (dtype is not None and t.dtype != dtype) \
            or (shape is not None and tuple(t.shape) != tuple(shape)):
        want = f"{dtype or 'float32/bfloat16'} {list(shape) if shape is not None else ''}".strip()
        got = f"{t.dtype} {list(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what}: expected a contiguous CPU {want} tensor, got {got}")


def _check_heads(what: str, heads: int, kv_heads: int, head_dim: int) -> None:
    if min(heads, kv_heads) < 1 or heads % kv_heads or head_dim < 2 or head_dim % 2 or head_dim > QK_MAX_HEAD_DIM:
        raise ValueError(f"{what}: {heads} heads over {kv_heads} kv heads of dim {head_dim} (even, at most "
                         f"{QK_MAX_HEAD_DIM})")


def _check_cache(what: str, name: str, cache: torch.Tensor, width: int, dtype: torch.dtype) -> None:
    """A paged cache that new entries of ``width`` elements are written into."""
    if not isinstance(cache, torch.Tensor) or cache.dim() != 2 or cache.shape[1] < width:
        raise ValueError(f"{what}: {name} must be a [rows, width >= {width}] tensor")
    _check_rows(cache, f"{what} {name}", None, dtype)


def _check_ids(what: str, t: torch.Tensor, n: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (n,) \
            or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous CPU int64 [{n}] tensor")


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it, for a few rows (decode): returns ``(s, y)`` with
    ``s = x + delta.to(x.dtype)`` (``x`` itself when ``delta`` is None) and
    ``y = weight * F.rms_norm(s.float(), eps).to(dtype)``, rounded as torch rounds them.

    ``x``: [N, D] float32 or bfloat16; ``delta``: [N, D] of x's dtype or float32 (a block's fp32
    sums, rounded to x's dtype here); ``weight`` [D] of x's dtype. One scalar pass
    on the calling thread: for the few rows of a decode step, where torch's five to seven ops cost
    their dispatch (see decode_ops.h); a prefill's thousands of rows belong to torch."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"add_rms_norm: x must be a [rows, dim] tensor, got "
                         f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    _check_rows(x, "add_rms_norm x")
    N, D = x.shape
    if delta is not None:
        _check_rows(delta, "add_rms_norm delta", (N, D), None if delta.dtype == torch.float32 else x.dtype)
    _check_rows(weight, "add_rms_norm weight", (D,), x.dtype)
    s = x if delta is None else torch.empty_like(x)
    y = torch.empty_like(x)
    if N and D:
        d, dbf16 = (0, False) if delta is None else (delta.data_ptr(), delta.dtype == torch.bfloat16)
        _kernels.add_rms_norm(x.data_ptr(), d, dbf16, 0 if delta is None else s.data_ptr(), y.data_ptr(),
                              weight.data_ptr(), N, D, float(eps), x.dtype == torch.bfloat16)
    return s, y


def qk_norm_rope(y: torch.Tensor, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
                 dtype: torch.dtype, *, q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                 eps: float = 0.0, interleaved: bool = False, kv_out: torch.Tensor | None = None,
                 kv_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA's q/k/v projections of a few tokens -> (queries [N, heads, head_dim], cache entries
    [N, 2 kv_heads head_dim], k then v), in ``dtype``: what ``GQAttention.project`` computes after
    its linears, in one call.

    ``y``: float32 [N, (heads + 2 kv_heads) head_dim], each token's q, k and v projections side by
    side (``gemv_multi``'s output), first rounded to ``dtype`` as the linears' outputs are. q's and
    k's heads go through the per-head RMSNorm with ``q_weight`` / ``k_weight`` ([head_dim], both
    or neither) and the rotary embedding with ``cos``/``sin`` [N, head_dim / 2] (``dtype``;
    ``interleaved``: pairs (x0, x1)... rather than halves, put out in halves as Rotary.apply
    does).

    With ``kv_out`` (a contiguous [rows, width] tensor of ``dtype``, width >= 2 kv_heads head_dim:
    a paged cache) and ``kv_rows`` (int64 [N]), token t's entry is written at the start of row
    ``kv_rows[t]`` of ``kv_out`` instead (decode's new entries, straight into the cache), and the
    second result is ``kv_out``. A row outside the cache raises before anything is written."""
    if dtype not in _GLUE_DTYPES:
        raise ValueError(f"qk_norm_rope: dtype must be float32 or bfloat16, got {dtype}")
    _check_heads("qk_norm_rope", heads, kv_heads, head_dim)
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ValueError("qk_norm_rope: y must be a float32 [tokens, (heads + 2 kv_heads) head_dim] tensor")
    N = y.shape[0]
    _check_rows(y, "qk_norm_rope y", (N, (heads + 2 * kv_heads) * head_dim), torch.float32)
    _check_rows(cos, "qk_norm_rope cos", (N, head_dim // 2), dtype)
    _check_rows(sin, "qk_norm_rope sin", (N, head_dim // 2), dtype)
    if (q_weight is None) != (k_weight is None):
        raise ValueError("qk_norm_rope: give both norm weights or neither")
    if q_weight is not None:
        _check_rows(q_weight, "qk_norm_rope q_weight", (head_dim,), dtype)
        _check_rows(k_weight, "qk_norm_rope k_weight", (head_dim,), dtype)
    if (kv_out is None) != (kv_rows is None):
        raise ValueError("qk_norm_rope: give kv_out and kv_rows together, or neither")
    q = torch.empty(N, heads, head_dim, dtype=dtype)
    rows, nrows, ld = 0, 0, 0
    if kv_out is None:
        kv = torch.empty(N, 2 * kv_heads * head_dim, dtype=dtype)
    else:
        _check_cache("qk_norm_rope", "kv_out", kv_out, 2 * kv_heads * head_dim, dtype)
        _check_ids("qk_norm_rope: kv_rows", kv_rows, N)
        kv, (nrows, ld), rows = kv_out, kv_out.shape, kv_rows.data_ptr()
    if N:
        _kernels.qk_norm_rope(y.data_ptr(), N, heads, kv_heads, head_dim,
                              0 if q_weight is None else q_weight.data_ptr(),
                              0 if k_weight is None else k_weight.data_ptr(), float(eps), cos.data_ptr(),
                              sin.data_ptr(), interleaved, dtype == torch.bfloat16, q.data_ptr(), kv.data_ptr(),
                              rows, nrows, ld)
    return q, kv


def softmax_topk(logits: torch.Tensor, k: int, norm: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A softmax router's choice for a few tokens in one call: ``logits`` float32 [N, E] (the gate
    linear's sums, first rounded to ``dtype`` as that linear's output is) -> expert ids [N, k]
    int64 and their softmax probabilities [N, k] float32, renormalized to sum 1 when ``norm``;
    largest first, ties to the lower id (``SoftmaxTopKRouter``'s softmax, topk and division)."""
    if dtype not in _GLUE_DTYPES:
        raise ValueError(f"softmax_topk: dtype must be float32 or bfloat16, got {dtype}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("softmax_topk: logits must be a float32 [tokens, experts] tensor")
    N, E = logits.shape
    _check_rows(logits, "softmax_topk logits", (N, E), torch.float32)
    if not 1 <= k <= E:
        raise ValueError(f"softmax_topk: k must lie in [1, {E}], got {k}")
    ids = torch.empty(N, k, dtype=torch.int64)
    w = torch.empty(N, k, dtype=torch.float32)
    if N:
        _kernels.softmax_topk(logits.data_ptr(), N, E, k, bool(norm), dtype == torch.bfloat16, ids.data_ptr(),
                              w.data_ptr())
    return ids, w


class PagedTokens:
    """One new token per sequence of a paged cache, as a decode step's layers all take them
    (checked once a step): ``blocks`` each sequence's block ids (contiguous CPU int64), ``lengths``
    its positions after the step (>= 1), ``rows`` (int64 [n]) the cache row of its new entry."""

    def __init__(self, blocks: list[torch.Tensor], lengths: list[int], block_size: int, rows: torch.Tensor) -> None:
        n = len(lengths)
        if not 1 <= n <= MAX_TOKENS or len(blocks) != n:
            raise ValueError(f"PagedTokens: 1 to {MAX_TOKENS} sequences, each with a block table and a length; got "
                             f"{len(blocks)} tables and {n} lengths")
        _check_block_tables("PagedTokens", blocks, lengths, block_size, 1)
        _check_ids("PagedTokens: rows", rows, n)
        self.blocks, self.lengths, self.block_size, self.rows = blocks, [int(n) for n in lengths], block_size, rows
        self.block_ptrs = [b.data_ptr() for b in blocks]


class DecodeLayer:
    """A GQA decoder layer's attention block and softmax routing for decode's few tokens, in one
    call (``decode_layer.h``): the residual add + input RMSNorm, the q/k/v GEMV, the q/k norm and
    rotary with the new entries written into the paged cache, attention over the cache, the o
    GEMV, the residual add + post-attention RMSNorm, the router GEMV and its softmax top-k. The
    same kernels in the same order as the one-op calls (:func:`add_rms_norm`, :func:`gemv_multi`,
    :func:`qk_norm_rope`, :func:`decode_attention_batch`, :func:`softmax_topk`), so the same results
    to the bit, without the Python between them. Weights are checked once, here (64-byte aligned, in
    any of the kernels' formats: q, k and v in one, o and the router each in its own, as an FP8
    checkpoint has them; norms in ``dtype``); the variant is fixed here too."""

    def __init__(self, q: QuantWeight, k: QuantWeight, v: QuantWeight, o: QuantWeight, router: QuantWeight,
                 norm1: torch.Tensor, eps1: float, norm2: torch.Tensor, eps2: float, *, heads: int, kv_heads: int,
                 head_dim: int, top_k: int, norm_topk: bool, dtype: torch.dtype, q_norm: torch.Tensor | None = None,
                 k_norm: torch.Tensor | None = None, qk_eps: float = 0.0, interleaved: bool = False,
                 variant: str | None = None, threads: int | None = None) -> None:
        if dtype not in _GLUE_DTYPES:
            raise ValueError(f"DecodeLayer: dtype must be float32 or bfloat16, got {dtype}")
        _check_heads("DecodeLayer", heads, kv_heads, head_dim)
        self.qkv, self.o, self.router = Gemv([q, k, v], what="DecodeLayer q/k/v"), Gemv([o], what="DecodeLayer o"), \
            Gemv([router], what="DecodeLayer router")
        D, HD, KD = self.qkv.cols, heads * head_dim, kv_heads * head_dim
        if (q.shape[0], k.shape[0], v.shape[0]) != (HD, KD, KD) or tuple(o.shape) != (D, HD) \
                or router.shape[1] != D:
            raise ValueError(f"DecodeLayer: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, o {list(o.shape)} "
                             f"and router {list(router.shape)} do not fit {heads} x {kv_heads} heads of {head_dim} "
                             "over one hidden size")
        E = router.shape[0]
        if not 1 <= top_k <= E:
            raise ValueError(f"DecodeLayer: top_k must lie in [1, {E}], got {top_k}")
        _check_rows(norm1, "DecodeLayer norm1", (D,), dtype)
        _check_rows(norm2, "DecodeLayer norm2", (D,), dtype)
        if (q_norm is None) != (k_norm is None):
            raise ValueError("DecodeLayer: give both q/k norm weights or neither")
        if q_norm is not None:
            _check_rows(q_norm, "DecodeLayer q_norm", (head_dim,), dtype)
            _check_rows(k_norm, "DecodeLayer k_norm", (head_dim,), dtype)
        self.code = _variant_code(variant)
        avx512 = _attention_vector_path(self.code, head_dim, head_dim)
        self.held = (norm1, norm2, q_norm, k_norm)  # what C points at stays alive
        self.D, self.E, self.top_k, self.dtype, self.threads = D, E, top_k, dtype, threads
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self._layer = _kernels.GQALayer(
            tuple(self.qkv._wts), self.o._wts[0], self.router._wts[0], norm1.data_ptr(), norm2.data_ptr(),
            float(eps1), float(eps2), 0 if q_norm is None else q_norm.data_ptr(),
            0 if k_norm is None else k_norm.data_ptr(), float(qk_eps), heads, kv_heads, head_dim, interleaved,
            dtype == torch.bfloat16, top_k, bool(norm_topk), avx512, head_dim**-0.5)

    def __call__(self, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 cache: torch.Tensor, tokens: PagedTokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
        """x [N, D] (the residual stream, ``dtype``), delta None or [N, D] (the last block's output,
        ``dtype`` or float32 sums), cos / sin [N, head_dim / 2] (``dtype``), the layer's paged
        ``cache`` [rows, width >= 2 kv_heads head_dim] (``dtype``) and the step's ``tokens`` ->
        ``(x, h, ids, w)``: the residual stream after attention, its post-attention norm (the
        experts' input), the chosen experts int64 [N, top_k] and their weights float32."""
        if not isinstance(tokens, PagedTokens):
            raise ValueError(f"DecodeLayer: tokens must be PagedTokens, got {type(tokens).__name__}")
        N, dt = len(tokens.lengths), self.dtype
        _check_rows(x, "DecodeLayer x", (N, self.D), dt)
        if delta is not None:
            _check_rows(delta, "DecodeLayer delta", (N, self.D), None if delta.dtype == torch.float32 else dt)
        _check_rows(cos, "DecodeLayer cos", (N, self.head_dim // 2), dt)
        _check_rows(sin, "DecodeLayer sin", (N, self.head_dim // 2), dt)
        _check_cache("DecodeLayer", "cache", cache, 2 * self.kv_heads * self.head_dim, dt)
        x_out, h = torch.empty_like(x), torch.empty_like(x)
        ids = torch.empty(N, self.top_k, dtype=torch.int64)
        w = torch.empty(N, self.top_k, dtype=torch.float32)
        self._layer.run(self.code, N, x.data_ptr(), 0 if delta is None else delta.data_ptr(),
                        delta is not None and delta.dtype == torch.bfloat16, x_out.data_ptr(), h.data_ptr(),
                        cos.data_ptr(), sin.data_ptr(), cache.data_ptr(), cache.shape[0], cache.shape[1],
                        tokens.rows.data_ptr(), tokens.block_ptrs, tokens.lengths, tokens.block_size, ids.data_ptr(),
                        w.data_ptr(), self.threads or default_threads())
        return x_out, h, ids, w


def dequantize_fp8(w: QuantWeight, *, threads: int | None = None) -> torch.Tensor:
    """An FP8 weight ([out, in] or stacked [E, out, in]) as bfloat16, equal to
    ``shared.quant.dequantize(w, torch.bfloat16)`` and many times faster than torch's conversion
    (a table lookup per element over all threads): the CPU prefill's expert path."""
    if not isinstance(w, QuantWeight) or w.fmt != "fp8_b128":
        raise ValueError(f"dequantize_fp8: expected an fp8_b128 QuantWeight, got {getattr(w, 'fmt', type(w).__name__)}")
    stacked = len(w.shape) == 3
    wt = _check_weight(w, "dequantize_fp8 weight", stacked=stacked)
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    _kernels.dequant_fp8(wt, w.shape[0] if stacked else 1, out.data_ptr(), threads or default_threads())
    return out


def moe_forward(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: QuantWeight, up: QuantWeight,
                down: QuantWeight, *, variant: str | None = None, threads: int | None = None) -> torch.Tensor:
    """One layer's routed experts: out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]), with
    expert(x) = down(silu(gate x) * up x). x [T, D], ids/weights [T, k]; returns [T, D] float32.
    An id of -1 is no expert: that pair adds nothing (an expert-parallel rank so passes the pairs
    that other ranks' experts serve).

    Any number of tokens (decode's few, a prefill chunk's thousands): each expert's tokens run in
    groups of up to 64 against its weights while they are in cache, so that a call reads each
    chosen expert's weights from memory once. Its scratch memory is bounded: tokens beyond what
    ``MOE_SCRATCH_BYTES`` holds go in further calls. Tiles of (expert, block of rows) are spread
    over ``threads`` threads; no GIL is held.
    """
    return Experts(gate, up, down, variant=variant, threads=threads)(x, ids, weights)


class Experts:
    """One layer's routed experts bound for :func:`moe_forward`: the stacked weights (gate and up
    [E, I, D], down [E, D, I]) are checked once, here, and a call checks only its activations,
    ids and routing weights (decode calls each layer's experts every step). It holds the weights;
    ``variant`` and ``threads`` left None are read at each call."""

    def __init__(self, gate: QuantWeight, up: QuantWeight, down: QuantWeight, *, variant: str | None = None,
                 threads: int | None = None) -> None:
        self.g = _check_weight(gate, "experts' gate", stacked=True)
        self.u = _check_weight(up, "experts' up", stacked=True)
        self.d = _check_weight(down, "experts' down", stacked=True)
        E, I, D = gate.shape
        if tuple(up.shape) != (E, I, D) or tuple(down.shape) != (E, D, I):
            raise ValueError(f"experts: gate {list(gate.shape)}, up {list(up.shape)} and down {list(down.shape)} "
                             "must be [E, I, D], [E, I, D], [E, D, I]")
        if variant is not None:
            _variant_code(variant)
        self.weights, self.E, self.D = (gate, up, down), E, D
        self.variant, self.threads = variant, threads

    def check(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple:
        """The call's checked arguments (see :meth:`run`): bad input raises here."""
        xf = _activations(x, self.D, "moe_forward", max_tokens=None)
        T = xf.shape[0]
        if ids.dim() != 2 or ids.shape[0] != T or ids.dtype != torch.int64 or ids.device.type != "cpu":
            raise ValueError(f"moe_forward: expert ids must be CPU int64 [{T}, k], got {ids.dtype} "
                             f"{list(ids.shape)}")
        if weights.shape != ids.shape or weights.dtype != torch.float32 or weights.device.type != "cpu":
            raise ValueError(f"moe_forward: routing weights must be CPU float32 {list(ids.shape)}, got "
                             f"{weights.dtype} {list(weights.shape)}")
        # (the ids' range, [-1, E), is checked by the C call before it reads: no torch reduction in
        # decode's path)
        return _variant_code(self.variant), xf, ids.contiguous(), weights.contiguous()

    def tokens_per_call(self, k: int, code: int) -> int:
        """How many tokens of top-``k`` routing one C call takes within ``MOE_SCRATCH_BYTES``: its
        scratch is each token's prepared row and, per (token, expert) pair, the gathered row with
        gate's and up's outputs in fp32 (whose room the pair's down output in fp32 takes over),
        the SiLU product prepared, and the inputs in the AMX layout (bf16). Bounded so that a
        16K-token prefill chunk of DeepSeek-V3 does not ask for 20 GB at once; the C side keeps the
        scratch from call to call (one arena per calling thread)."""
        esz = _kernels.xp_bytes_per_element(code)
        D, I = self.D, self.weights[0].shape[1]
        pair = max(D * esz + 8 * I, 4 * D) + I * esz + 2 * (D + I)
        return max(1, MOE_SCRATCH_BYTES // (D * esz + k * pair))

    def run(self, checked: tuple, threads: int | None = None) -> torch.Tensor:
        """The call on :meth:`check`'s result (on ``threads`` when given, else the binding's)."""
        code, xf, ids, weights = checked
        out = torch.empty_like(xf)
        T, k = ids.shape
        step = self.tokens_per_call(k, code)
        threads = threads or self.threads or default_threads()
        for t in range(0, T, step):  # (row slices of contiguous tensors: pointers into them)
            n = min(step, T - t)
            _kernels.moe_forward(code, self.g, self.u, self.d, self.E, xf[t].data_ptr(), n, k, ids[t].data_ptr(),
                                 weights[t].data_ptr(), out[t].data_ptr(), threads)
        return out

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[T, D] float32: see :func:`moe_forward`."""
        return self.run(self.check(x, ids, weights))


class MoEPool:
    """``submit()``/``sync()`` around :func:`moe_forward`: the call runs on a background thread
    (the C code holds no GIL) so that the caller can compute attention meanwhile."""

    def __init__(self, threads: int | None = None, cpus: list[int] | None = None) -> None:
        self.threads = threads or (len(cpus) if cpus else default_threads())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridmoe-moe")
        if cpus:  # pin the OpenMP team that the worker thread will use
            self._executor.submit(_kernels.pin_threads, list(cpus), self.threads).result()

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: QuantWeight | Experts,
               up: QuantWeight | None = None, down: QuantWeight | None = None, *,
               variant: str | None = None) -> Future:
        """Start ``moe_forward``; returns a future. ``gate`` may be the layer's bound
        :class:`Experts` instead of its three weights (then ``up``, ``down`` and ``variant`` are
        left out: the binding has them). Dtypes, shapes and weights are checked here, so such bad
        input fails at submit; expert ids outside [0, E) are found by the call itself, before it
        reads anything, and raise at sync. The future holds the checked tensors until the call
        returns. The pool's thread count overrides the binding's."""
        if isinstance(gate, Experts):
            if up is not None or down is not None or variant is not None:
                raise ValueError("MoEPool.submit: bound Experts carry their weights and variant")
            ex = gate
        else:
            ex = Experts(gate, up, down, variant=variant)
        checked = ex.check(x, ids, weights)
        return self._executor.submit(ex.run, checked, self.threads)

    @staticmethod
    def sync(future: Future) -> torch.Tensor:
        return future.result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
