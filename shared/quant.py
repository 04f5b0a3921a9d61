"""Weight formats and their pure-torch reference (de)quantizers.

Every format keeps the canonical layout: row-major ``[out, in]`` (a leading expert dimension
``[E, out, in]`` for a layer's routed experts).

- ``bf16`` (or any float dtype): the weight itself.
- ``fp8_b128``: float8 e4m3 weights and one fp32 scale per 128x128 block, exactly as DeepSeek
  releases them: ``weight`` (float8_e4m3fn) and ``weight_scale_inv`` [ceil(out/128), ceil(in/128)];
  the real weight is ``weight * weight_scale_inv`` (the name says "inv", the value multiplies).
- ``int4_g32`` / ``int4_g128``: symmetric 4-bit integers, one bf16 scale per group of 32 or 128
  along the input dimension: ``weight`` uint8 [out, in/2] (element 2j in the low nibble of byte j,
  2j+1 in the high one, each stored as q + 8 with q in [-8, 7]) and ``weight_scale`` bf16
  [out, in/group]; the real weight is ``q * scale``.

These functions are the reference that the CPU kernels are tested against; they favour clarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT4_GROUPS = (32, 128)

FORMATS = ("dense", "fp8_b128", "int4_g32", "int4_g128")


@dataclass
class QuantWeight:
    """A weight (or a stack of expert weights) in one of the formats above.

    ``data`` is the stored tensor, ``scale`` the block/group scales (None for ``dense``) and
    ``shape`` the logical shape ``[..., out, in]`` of the real-valued weight.
    """

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor | None
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown weight format {self.fmt!r}; expected one of {FORMATS}")

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    def __getitem__(self, i: int) -> QuantWeight:
        """The weight of one expert of a stacked ``[E, out, in]`` weight."""
        scale = None if self.scale is None else self.scale[i]
        return QuantWeight(self.fmt, self.data[i], scale, self.shape[1:])

    def experts(self, start: int, end: int) -> QuantWeight:
        """Experts ``start .. end - 1`` of a stacked weight (a view, no copy)."""
        scale = None if self.scale is None else self.scale[start:end]
        return QuantWeight(self.fmt, self.data[start:end], scale, (end - start, *self.shape[1:]))

    def to(self, device: torch.device | str) -> QuantWeight:
        scale = None if self.scale is None else self.scale.to(device)
        return QuantWeight(self.fmt, self.data.to(device), scale, self.shape)


def int4_group(fmt: str) -> int:
    return int(fmt.split("_g")[1])


# --- FP8 e4m3, 128x128 block scales -------------------------------------------------------------


def fp8_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK))


def _expand_blocks(scale: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """[..., ceil(out/128), ceil(in/128)] -> [..., out, in] (each scale repeated over its block)."""
    s = scale.repeat_interleave(FP8_BLOCK, dim=-2).repeat_interleave(FP8_BLOCK, dim=-1)
    return s[..., :out_features, :in_features]


def quantize_fp8_b128(w: torch.Tensor) -> QuantWeight:
    """w [..., out, in] (any float dtype) -> FP8 e4m3 with one fp32 scale per 128x128 block."""
    *lead, out_f, in_f = w.shape
    nb_o, nb_i = fp8_scale_shape(out_f, in_f)
    wf = w.float()
    pad = torch.zeros(*lead, nb_o * FP8_BLOCK, nb_i * FP8_BLOCK, dtype=torch.float32, device=w.device)
    pad[..., :out_f, :in_f] = wf
    blocks = pad.unflatten(-2, (nb_o, FP8_BLOCK)).unflatten(-1, (nb_i, FP8_BLOCK))  # [..,bo,128,bi,128]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., bo, bi]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (wf / _expand_blocks(scale, out_f, in_f)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantWeight("fp8_b128", q, scale, tuple(w.shape))


def dequantize_fp8_b128(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    *lead, out_f, in_f = data.shape
    if out_f % FP8_BLOCK == 0 and in_f % FP8_BLOCK == 0:  # whole blocks: broadcast, nothing expanded
        # e4m3 values are exact in bf16/fp16/fp32; the product is taken in fp32 (the scale's dtype)
        # and rounded once into the output: the same values as float(w) * s -> dtype, in two passes
        # over the weight instead of four (it matters on a GPU, where prefill dequantizes 768
        # matrices per DeepSeek-V3 layer).
        out = data.to(dtype)
        blocks = out.unflatten(-1, (-1, FP8_BLOCK)).unflatten(-3, (-1, FP8_BLOCK))
        torch.mul(blocks, scale.float()[..., :, None, :, None], out=blocks)
        return out
    return (data.float() * _expand_blocks(scale.float(), out_f, in_f)).to(dtype)


# --- INT4 symmetric, per-group scales -----------------------------------------------------------


def quantize_int4(w: torch.Tensor, group: int) -> QuantWeight:
    """w [..., out, in] -> INT4 symmetric with one bf16 scale per ``group`` inputs."""
    if group not in INT4_GROUPS:
        raise ValueError(f"INT4 group size must be one of {INT4_GROUPS}, got {group}")
    *lead, out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"INT4 needs the input dimension ({in_f}) to be a multiple of the group ({group})")
    g = w.float().unflatten(-1, (in_f // group, group))  # [..., out, G, group]
    amax = g.abs().amax(dim=-1)
    # The scale is rounded to bf16 first and the integers computed from the rounded scale, so
    # that dequantization error stays within half a step.
    scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax)).to(torch.bfloat16)
    q = torch.round(g / scale.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int16) + 8
    q = q.flatten(-2).to(torch.uint8)  # [..., out, in], values 0..15
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return QuantWeight(f"int4_g{group}", packed.contiguous(), scale.contiguous(), tuple(w.shape))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., out, in/2] -> int8 [..., out, in] with values in [-8, 7]."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = unpack_int4(packed).float()
    group = q.shape[-1] // scale.shape[-1]
    return (q.unflatten(-1, (scale.shape[-1], group)) * scale.float().unsqueeze(-1)).flatten(-2).to(dtype)


# --- common -------------------------------------------------------------------------------------


def quantize(w: torch.Tensor, fmt: str) -> QuantWeight:
    if fmt == "dense":
        return QuantWeight("dense", w, None, tuple(w.shape))
    if fmt == "fp8_b128":
        return quantize_fp8_b128(w)
    if fmt.startswith("int4_g"):
        return quantize_int4(w, int4_group(fmt))
    raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")


def dequantize(qw: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if qw.fmt == "dense":
        return qw.data.to(dtype)
    if qw.fmt == "fp8_b128":
        return dequantize_fp8_b128(qw.data, qw.scale, dtype)
    return dequantize_int4(qw.data, qw.scale, dtype)


def dequantize_fast(w: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize(w, dtype)``, the same values, faster where it can: FP8 to BF16 on the CPU
    through the kernels' table lookup (~5x torch's conversion), on a GPU in one Triton pass where
    Triton is installed. Either falls back to :func:`dequantize` (partial blocks, strided or
    misaligned views, no kernels)."""
    if w.fmt == "fp8_b128":
        from shared import quant_triton

        if quant_triton.available(w.data):
            try:
                return quant_triton.dequantize_fp8_b128(w.data, w.scale, dtype)
            except ValueError:
                pass
        elif dtype == torch.bfloat16 and w.data.device.type == "cpu":
            try:
                from cython_kernels import api  # (the kernels are optional for the model code)

                return api.dequantize_fp8(w)
            except (ImportError, ValueError):
                pass
    return dequantize(w, dtype)


def checkpoint_format(quant: str) -> str:
    """Map a user-facing ``--quant`` name (bf16, fp8, int4, int4_g32, ...) to a weight format."""
    names = {"bf16": "dense", "fp8": "fp8_b128", "int4": "int4_g128", "int4_g32": "int4_g32",
             "int4_g128": "int4_g128", "fp8_b128": "fp8_b128"}
    if quant not in names:
        raise ValueError(f"unknown quantization {quant!r}; expected one of {sorted(names)}")
    return names[quant]
