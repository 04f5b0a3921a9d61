"""Mixtral (``MixtralForCausalLM``): GQA, top-2 softmax routing renormalised over the chosen
experts, expert projections named w1 (gate), w3 (up), w2 (down). Built by shared.gqa_moe."""

from __future__ import annotations

from shared import gqa_moe
from shared.checkpoint import HFConfig

MODEL_TYPES = ("mixtral",)
ARCHITECTURES = ("MixtralForCausalLM",)
NAMES = gqa_moe.Names(moe="block_sparse_moe", gate_up_down=("w1", "w3", "w2"), qk_norm=False,
                      experts_field="num_local_experts", moe_inter_field="intermediate_size")
Args = gqa_moe.Args
weight_specs = gqa_moe.weight_specs
build = gqa_moe.build


def args_from_config(cfg: HFConfig) -> Args:
    if cfg.get("sliding_window", None) is not None:
        raise cfg.fail("sliding_window attention is not supported (set it to null)")
    inter = cfg.positive("intermediate_size")
    return gqa_moe.check(cfg, Args(
        names=NAMES, **gqa_moe.common_fields(cfg), intermediate_size=inter, moe_intermediate_size=inter,
        num_experts=cfg.positive("num_local_experts"), norm_topk_prob=True, dense_layers=(),
    ))
