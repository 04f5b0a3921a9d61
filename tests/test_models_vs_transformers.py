"""The model families against transformers' own implementations, on the same weights."""

from __future__ import annotations

import pytest
import torch
from hf_models import CONFIGS, build_hf

from shared.model import load_model

CASES = [
    ("deepseek_v3", {}),  # q_lora_rank, grouped routing, dense-first layer, YaRN
    ("deepseek_v3", {"q_lora_rank": None}),  # the V2-Lite-style attention without q compression
    ("deepseek_v3", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False, "rope_scaling": None,
                     "n_shared_experts": 2}),
    ("qwen3_moe", {}),  # with a dense layer (mlp_only_layers)
    ("qwen3_moe", {"norm_topk_prob": False, "mlp_only_layers": [], "tie_word_embeddings": True}),
    ("mixtral", {}),
]


def _ids(seed: int, batch: int = 2, tokens: int = 48) -> torch.Tensor:
    # 48 tokens is past the tiny YaRN config's original context (32): the scaling is exercised.
    return torch.randint(0, 128, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,over", CASES, ids=lambda c: str(c))
def test_fp32_logits_match_transformers(tmp_path, family, over):
    hf = build_hf(CONFIGS[family](**over), seed=3)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    assert model.family == family
    ids = _ids(4)
    with torch.no_grad():
        ref = hf(ids).logits
    out = model(ids)
    assert out.shape == ref.shape == (2, 48, 128)
    err = (out - ref).abs().max().item()
    assert err < 1e-4, f"max abs logit error {err}"


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_bf16_logits_within_bf16_tolerance(tmp_path, family):
    """In bf16 a near-tie in routing can flip an expert for one token in either implementation,
    so the fair reference is fp32 on the same (bf16-rounded) weights: our bf16 run must be as
    close to it as transformers' own bf16 run is."""
    hf = build_hf(CONFIGS[family](), seed=5, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)  # the checkpoint says bfloat16
    assert model.dtype == torch.bfloat16
    ids = _ids(6, batch=2, tokens=32)
    with torch.no_grad():
        hf_bf16 = hf(ids).logits.float()
        ref = hf.float()(ids).logits
    ours = model(ids)
    ours_err, hf_err = (ours - ref).abs().mean().item(), (hf_bf16 - ref).abs().mean().item()
    assert ours_err <= 1.5 * hf_err + 1e-3, f"mean error {ours_err} vs transformers' bf16 {hf_err}"
    agree = lambda x: (x.argmax(-1) == ref.argmax(-1)).float().mean().item()  # noqa: E731
    assert agree(ours) >= agree(hf_bf16) - 0.05 and agree(ours) > 0.8


def test_batch_rows_are_independent(tmp_path):
    hf = build_hf(CONFIGS["deepseek_v3"](), seed=7)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    ids = _ids(8, batch=3, tokens=16)
    together = model(ids)
    for b in range(3):
        alone = model(ids[b : b + 1])
        assert torch.allclose(together[b : b + 1], alone, atol=1e-5)
