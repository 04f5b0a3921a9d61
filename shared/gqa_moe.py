"""The common shape of Qwen3-MoE and Mixtral: grouped-query attention with RoPE, softmax top-k
routing over routed experts with no shared expert. The two families differ only in config field
names, tensor names and Qwen3's per-head q/k RMSNorm; their modules say so and build through here.

Shape legend: D = hidden, H = query heads, K = key/value heads, Dh = head dim, E = experts,
I = expert intermediate size, F = dense-layer intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.checkpoint import HFConfig, WeightSpec
from shared.layers import (
    CausalLM,
    DecoderLayer,
    DenseMLP,
    GQAttention,
    MoE,
    RMSNorm,
    Rotary,
    RoutedExperts,
    SoftmaxTopKRouter,
    rope_parameters,
)


@dataclass(frozen=True)
class Names:
    """Where a family keeps things in its checkpoint and config.json."""

    moe: str  # the MoE block under a layer: "mlp" or "block_sparse_moe"
    gate_up_down: tuple[str, str, str]  # expert projection names
    qk_norm: bool
    experts_field: str  # config field for the number of experts, as written in errors
    moe_inter_field: str


@dataclass(frozen=True)
class Args:
    names: Names
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense layers (Qwen3's mlp_only_layers)
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    dense_layers: tuple[int, ...]
    rms_norm_eps: float
    rope: dict
    tie_word_embeddings: bool

    def is_moe(self, layer: int) -> bool:
        return layer not in self.dense_layers


def common_fields(cfg: HFConfig) -> dict:
    """The fields both families spell the same way, validated."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise cfg.fail(f"hidden_act {cfg.get('hidden_act')!r} is not supported (expected silu)")
    if cfg.get("attention_bias", False):
        raise cfg.fail("attention_bias = true is not supported")
    heads = cfg.positive("num_attention_heads")
    kv_heads = cfg.positive("num_key_value_heads", heads)
    if heads % kv_heads:
        raise cfg.fail(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    hidden = cfg.positive("hidden_size")
    head_dim = cfg.get("head_dim", None, int)
    if head_dim is None:
        if hidden % heads:
            raise cfg.fail(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
        head_dim = hidden // heads
    return dict(
        vocab_size=cfg.positive("vocab_size"), hidden_size=hidden,
        num_hidden_layers=cfg.positive("num_hidden_layers"), num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim,
        num_experts_per_tok=cfg.positive("num_experts_per_tok"),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6, (int, float))), rope=rope_parameters(cfg),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False, bool),
    )


def check(cfg: HFConfig, a: Args) -> Args:
    if a.num_experts_per_tok > a.num_experts:
        raise cfg.fail(f"num_experts_per_tok={a.num_experts_per_tok} exceeds {a.names.experts_field}={a.num_experts}")
    return a


def weight_specs(a: Args) -> list[WeightSpec]:
    D, H, K, Dh, E, I = (a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                         a.num_experts, a.moe_intermediate_size)
    nm = a.names
    specs = [WeightSpec("model.embed_tokens.weight", (a.vocab_size, D), "embed", "vocab_size, hidden_size")]
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}"
        s = f"{p}.self_attn"
        specs += [
            WeightSpec(f"{p}.input_layernorm.weight", (D,), "vector", "hidden_size"),
            WeightSpec(f"{p}.post_attention_layernorm.weight", (D,), "vector", "hidden_size"),
            WeightSpec(f"{s}.q_proj", (H * Dh, D), "linear", "num_attention_heads * head_dim, hidden_size"),
            WeightSpec(f"{s}.k_proj", (K * Dh, D), "linear", "num_key_value_heads * head_dim, hidden_size"),
            WeightSpec(f"{s}.v_proj", (K * Dh, D), "linear", "num_key_value_heads * head_dim, hidden_size"),
            WeightSpec(f"{s}.o_proj", (D, H * Dh), "linear", "hidden_size, num_attention_heads * head_dim"),
        ]
        if nm.qk_norm:
            specs += [WeightSpec(f"{s}.q_norm.weight", (Dh,), "vector", "head_dim"),
                      WeightSpec(f"{s}.k_norm.weight", (Dh,), "vector", "head_dim")]
        if not a.is_moe(i):
            F = a.intermediate_size
            specs += [WeightSpec(f"{p}.mlp.gate_proj", (F, D), "linear", "intermediate_size, hidden_size"),
                      WeightSpec(f"{p}.mlp.up_proj", (F, D), "linear", "intermediate_size, hidden_size"),
                      WeightSpec(f"{p}.mlp.down_proj", (D, F), "linear", "hidden_size, intermediate_size")]
            continue
        m = f"{p}.{nm.moe}"
        g, u, d = nm.gate_up_down
        fields = f"{nm.experts_field}, {nm.moe_inter_field}"
        specs += [
            WeightSpec(f"{m}.gate", (E, D), "router", f"{nm.experts_field}, hidden_size"),
            WeightSpec(f"{m}.experts.{{e}}.{g}", (E, I, D), "experts", f"{fields}, hidden_size"),
            WeightSpec(f"{m}.experts.{{e}}.{u}", (E, I, D), "experts", f"{fields}, hidden_size"),
            WeightSpec(f"{m}.experts.{{e}}.{d}", (E, D, I), "experts", f"{nm.experts_field}, hidden_size, "
                       f"{nm.moe_inter_field}"),
        ]
    specs.append(WeightSpec("model.norm.weight", (D,), "vector", "hidden_size"))
    if not a.tie_word_embeddings:
        specs.append(WeightSpec("lm_head", (a.vocab_size, D), "router", "vocab_size, hidden_size"))
    return specs


def build(a: Args, w: dict) -> CausalLM:
    rotary = Rotary(a.rope, a.head_dim, interleaved=False)
    nm = a.names
    layers = []
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}"
        if a.is_moe(i):
            m = f"{p}.{nm.moe}"
            experts = RoutedExperts(*(w[f"{m}.experts.{{e}}.{n}"] for n in nm.gate_up_down))
            router = SoftmaxTopKRouter(w[f"{m}.gate"], a.num_experts_per_tok, a.norm_topk_prob)
            ffn = MoE(router, experts)
        else:
            ffn = DenseMLP(*(w[f"{p}.mlp.{n}"] for n in ("gate_proj", "up_proj", "down_proj")))
        attn = GQAttention(w, f"{p}.self_attn", a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                           rotary, a.rms_norm_eps if nm.qk_norm else None)
        layers.append(DecoderLayer(attn, ffn, RMSNorm(w[f"{p}.input_layernorm.weight"], a.rms_norm_eps),
                                   RMSNorm(w[f"{p}.post_attention_layernorm.weight"], a.rms_norm_eps)))
    embed = w["model.embed_tokens.weight"]
    lm_head = embed if a.tie_word_embeddings else w["lm_head"]
    return CausalLM(embed, layers, RMSNorm(w["model.norm.weight"], a.rms_norm_eps), lm_head, a)
