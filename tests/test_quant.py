"""FP8 and INT4 formats: round-trip bounds, layouts, and FP8 checkpoints against dequantized ones."""

from __future__ import annotations

import pytest
import torch

from shared.checkpoint import Checkpoint, ShardWriter
from shared.model import load_model
from shared.quant import (
    FP8_MAX,
    dequantize,
    fp8_scale_shape,
    quantize,
    quantize_fp8_b128,
    quantize_int4,
    unpack_int4,
)

SHAPES = [(128, 256), (200, 300), (7, 130), (3, 64, 96)]  # multiples of the block, odd, stacked


def _weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[::97] *= 50  # outliers, so that blocks have very different scales
    return w


@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_round_trip_within_e4m3_bound(shape):
    w = _weights(shape)
    q = quantize_fp8_b128(w)
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == w.shape
    assert q.scale.dtype == torch.float32 and q.scale.shape == (*shape[:-2], *fp8_scale_shape(*shape[-2:]))
    back = dequantize(q)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals; subnormals (below 2^-6 of the
    # scale) have an absolute step of 2^-9 of the scale.
    scale = q.scale.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]]
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) * 1.0001
    assert ((back - w).abs() <= bound).all()
    assert back.abs().max() <= w.abs().max() * (1 + 2**-4)
    # Every block's largest magnitude maps onto the top of the e4m3 range.
    assert (q.data.float().abs().amax() <= FP8_MAX).item()


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("shape", [(64, 256), (5, 384), (2, 16, 128)])
def test_int4_round_trip_within_half_step(shape, group):
    w = _weights(shape, seed=1)
    q = quantize_int4(w, group)
    assert q.fmt == f"int4_g{group}" and q.data.dtype == torch.uint8
    assert q.data.shape == (*shape[:-1], shape[-1] // 2)
    assert q.scale.dtype == torch.bfloat16 and q.scale.shape == (*shape[:-1], shape[-1] // group)
    back = dequantize(q)
    step = q.scale.float().repeat_interleave(group, -1)
    assert ((back - w).abs() <= step * 0.5 + 1e-7).all()


def test_int4_nibble_layout():
    """Element 2j sits in the low nibble of byte j, 2j+1 in the high one, each as q + 8."""
    w = torch.tensor([[1.0, -2.0] + [0.0] * 30]) * (7 / 7)  # one group of 32, scale = 2/7
    q = quantize_int4(w, 32)
    lo, hi = int(q.data[0, 0]) & 0xF, int(q.data[0, 0]) >> 4
    assert (lo - 8, hi - 8) == (4, -7)  # round(1 / (2/7)) = 4 (3.5 rounds to even), -2 -> -7
    assert unpack_int4(q.data)[0, :2].tolist() == [4, -7]


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of the group"):
        quantize_int4(torch.randn(4, 48), 32)
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(torch.randn(4, 64), 64)
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize(torch.randn(4, 64), "int8")


def _dequantized_copy(src, dst):
    """Write ``src`` again with every FP8/INT4 weight replaced by its fp32 dequantization."""
    ckpt = Checkpoint(src)
    writer = ShardWriter(dst)
    for name in ckpt.names():
        if name.endswith((".weight_scale_inv", ".weight_scale")):
            continue
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and (ckpt.has(prefix + ".weight_scale_inv") or ckpt.has(prefix + ".weight_scale")):
            shape = ckpt.shape(name)
            if ckpt.has(prefix + ".weight_scale"):
                shape = (shape[0], shape[1] * 2)
            writer.add(name, dequantize(ckpt.linear(prefix, shape, "test")).float())
        else:
            writer.add(name, ckpt.get(name))
    writer.close()
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-qwen3-moe", "tiny-mixtral"])
@pytest.mark.parametrize("quant", ["fp8", "int4_g32"])
def test_quantized_checkpoint_matches_its_dequantized_weights(tiny_models, tmp_path, preset, quant):
    src = tiny_models[preset, quant]
    if quant == "fp8":  # DeepSeek's release layout: attention and dense layers are FP8 too
        ckpt = Checkpoint(src)
        assert ckpt.get("model.layers.0.self_attn.o_proj.weight").dtype == torch.float8_e4m3fn
        assert ckpt.has("model.layers.0.self_attn.o_proj.weight_scale_inv")
    model = load_model(src, dtype=torch.float32)
    experts = next(layer.ffn.experts for layer in model.layers if hasattr(layer.ffn, "experts"))
    assert experts.fmt == {"fp8": "fp8_b128", "int4_g32": "int4_g32"}[quant]  # kept quantized in memory
    reference = load_model(_dequantized_copy(src, tmp_path), dtype=torch.float32)
    ids = torch.randint(0, 258, (2, 20), generator=torch.Generator().manual_seed(0))
    assert (model(ids) - reference(ids)).abs().max().item() < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_fp8_dequantization_equals_torch(dtype):
    """The one-pass Triton dequantization of prefill on a GPU gives torch's values bit for bit,
    on stacked experts with negative, tiny and large weights."""
    from shared import quant_triton

    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 256, 384, generator=g) * torch.logspace(-4, 2, 384)
    q = quantize(w, "fp8_b128").to("cuda")
    assert quant_triton.available(q.data)  # CUDA builds of torch bring Triton
    got = quant_triton.dequantize_fp8_b128(q.data, q.scale, dtype)
    assert got.dtype == dtype and torch.equal(got, q.dequantize(dtype))
    assert torch.equal(quant_triton.dequantize_fp8_b128(q.data[1], q.scale[1], dtype), q[1].dequantize(dtype))
    with pytest.raises(ValueError, match="whole 128x128 blocks"):
        quant_triton.dequantize_fp8_b128(q.data[:, :100], q.scale, dtype)
