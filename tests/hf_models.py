"""Tiny models built with transformers' own classes: the independent reference for the families."""

from __future__ import annotations

from pathlib import Path

import torch

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}


def deepseek_config(**over):
    from transformers import DeepseekV3Config

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
              n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
              q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
              routed_scaling_factor=2.5, rope_scaling=dict(YARN), max_position_embeddings=128)
    kw.update(over)
    return DeepseekV3Config(**kw)


def qwen3_config(**over):
    from transformers import Qwen3MoeConfig

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
              num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[1])
    kw.update(over)
    return Qwen3MoeConfig(**kw)


def mixtral_config(**over):
    from transformers import MixtralConfig

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    kw.update(over)
    return MixtralConfig(**kw)


CONFIGS = {"deepseek_v3": deepseek_config, "qwen3_moe": qwen3_config, "mixtral": mixtral_config}


def build_hf(config, seed: int = 0, dtype=torch.float32):
    """A transformers model with every weight random (norms near 1, routing biases non-zero)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model.to(dtype).eval()


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path
