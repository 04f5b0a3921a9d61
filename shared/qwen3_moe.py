"""Qwen3-MoE (``Qwen3MoeForCausalLM``): GQA with per-head q/k RMSNorm, softmax top-k routing,
optional dense layers (``mlp_only_layers``, ``decoder_sparse_step``). Built by shared.gqa_moe."""

from __future__ import annotations

from shared import gqa_moe
from shared.checkpoint import HFConfig

MODEL_TYPES = ("qwen3_moe",)
ARCHITECTURES = ("Qwen3MoeForCausalLM",)
NAMES = gqa_moe.Names(moe="mlp", gate_up_down=("gate_proj", "up_proj", "down_proj"), qk_norm=True,
                      experts_field="num_experts", moe_inter_field="moe_intermediate_size")
Args = gqa_moe.Args
weight_specs = gqa_moe.weight_specs
build = gqa_moe.build


def args_from_config(cfg: HFConfig) -> Args:
    if cfg.get("use_sliding_window", False, bool):
        raise cfg.fail("use_sliding_window = true is not supported")
    # Released checkpoints say num_experts; transformers 5 writes num_local_experts.
    num_experts = cfg.positive("num_experts") if "num_experts" in cfg.data else cfg.positive("num_local_experts")
    layers = cfg.positive("num_hidden_layers")
    step = cfg.positive("decoder_sparse_step", 1)
    mlp_only = cfg.get("mlp_only_layers", [], list)
    dense = tuple(i for i in range(layers) if i in mlp_only or (i + 1) % step != 0)
    return gqa_moe.check(cfg, Args(
        names=NAMES, **gqa_moe.common_fields(cfg),
        intermediate_size=cfg.positive("intermediate_size") if dense else cfg.get("intermediate_size", 0, int),
        moe_intermediate_size=cfg.positive("moe_intermediate_size"),
        num_experts=num_experts, norm_topk_prob=cfg.get("norm_topk_prob", False, bool), dense_layers=dense,
    ))
