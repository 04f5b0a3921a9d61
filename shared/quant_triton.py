"""FP8 block dequantization on CUDA in one pass (Triton), for stream-loading prefill.

Prefill on a GPU dequantizes each chosen expert's three FP8 matrices before its GEMMs: 768
matrices per DeepSeek-V3 layer and pass. Through torch's elementwise kernels (widen, then a
broadcast multiply by the block scale) that took 97 ms per layer on an H100 while the GEMMs took
24 ms; the kernels ran at about 1 TB/s. Here one program reads a 128x128 block of e4m3 bytes once,
multiplies by its fp32 scale and rounds once to the output dtype: the same values as
:func:`shared.quant.dequantize_fp8_b128`. Triton is optional (CUDA builds of torch bring it):
:func:`available` says whether this path can run.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK = 128


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


if triton is not None:

    @triton.jit
    def _dequant_fp8_b128(q_ptr, s_ptr, out_ptr, cols, nb_cols, BLOCK: tl.constexpr):
        rb = tl.program_id(0)  # block row over all leading dims: the scale is [rows / 128, cols / 128]
        cb = tl.program_id(1)
        s = tl.load(s_ptr + rb * nb_cols + cb)
        rows = rb * BLOCK + tl.arange(0, BLOCK)[:, None]
        offs = rows.to(tl.int64) * cols + cb * BLOCK + tl.arange(0, BLOCK)[None, :]
        q = tl.load(q_ptr + offs).to(tl.float32)
        tl.store(out_ptr + offs, (q * s).to(out_ptr.dtype.element_ty))


def dequantize_fp8_b128(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """data [..., out, in] e4m3 with out and in multiples of 128, scale [..., out/128, in/128] fp32,
    both contiguous on CUDA -> [..., out, in] in ``dtype``."""
    *lead, rows, cols = data.shape
    if rows % BLOCK or cols % BLOCK or not (data.is_contiguous() and scale.is_contiguous()):
        raise ValueError("the Triton FP8 dequantization takes whole 128x128 blocks of contiguous tensors")
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    n_rows = data.numel() // cols
    _dequant_fp8_b128[(n_rows // BLOCK, cols // BLOCK)](data, scale.float(), out, cols, cols // BLOCK, BLOCK=BLOCK)
    return out
